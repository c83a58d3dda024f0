"""History by date: an index on message (room_id, created_at, seq).

``room:get_messages {before|after}`` turns a date into a position in the
room's order with one seek of this index (the first message created at or
after the date, ties by seq), then pages by seq on the (room_id, seq) one.
Without it the date filter scans every message on one side of the date.
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(
        migrator.add_index('message', ('room_id', 'created_at', 'seq'), False))


def down(migrator, db):
    migrator.migrate(migrator.drop_index('message', 'message_room_id_created_at_seq'))
