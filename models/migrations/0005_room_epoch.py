"""Rooms get an epoch (``room:resume``): ``room.epoch``, a random value per room.

The column is NOT NULL with a database default of '' (like 0003's topic):
nodes still running the previous code during a rolling upgrade insert rooms
without naming it, and '' is then that room's epoch. Every existing room is
given a random epoch of its own here, so that a room recreated later under
the same id (or the database restored from a backup and migrated again)
cannot share one with it.
"""
import secrets

from peewee import *

EPOCH_BYTES = 6


def up(migrator, db):
    epoch = CharField(max_length=16, default='', constraints=[SQL("DEFAULT ''")])
    migrator.migrate(migrator.add_column('room', 'epoch', epoch, allow_not_null=True))
    room = Table('room', ('id', 'epoch')).bind(db)
    for row in list(room.select(room.id).tuples()):
        room.update(epoch=secrets.token_hex(EPOCH_BYTES)).where(room.id == row[0]).execute()


def down(migrator, db):
    migrator.migrate(migrator.drop_column('room', 'epoch'))
