"""Rooms get a topic (``room:update``): ``room.topic``, empty for every room so far.

The column is NOT NULL with a database default of '' rather than only the
model's Python default: nodes still running the previous code during a
rolling upgrade on a shared database insert rooms without naming it.
"""
from peewee import *


def up(migrator, db):
    topic = CharField(max_length=200, default='', constraints=[SQL("DEFAULT ''")])
    # One ADD COLUMN ... NOT NULL DEFAULT '' (both SQLite and PostgreSQL fill
    # existing rows with the default), not peewee's add-null/fill/set-not-null.
    migrator.migrate(migrator.add_column('room', 'topic', topic, allow_not_null=True))


def down(migrator, db):
    migrator.migrate(migrator.drop_column('room', 'topic'))
