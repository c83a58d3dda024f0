"""The message table's index on room_id alone goes: (room_id, seq) serves it.

peewee gave the foreign key its own index in 0001, beside the unique
(room_id, seq) one whose leading column is the same: every lookup by room
(and the foreign key's cascade) seeks the latter just as well. The former
only cost every send one more index page written to the log at commit (six
pages a message on SQLite, now five). A node of older code still finds its
queries served by (room_id, seq) during a rolling upgrade.
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(migrator.drop_index('message', 'message_room_id'))


def down(migrator, db):
    migrator.migrate(migrator.add_index('message', ('room_id',), False))
