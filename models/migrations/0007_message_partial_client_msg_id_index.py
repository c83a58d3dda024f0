"""The unique (sender_id, client_msg_id) index on message holds only rows with a clientMsgId.

It is there to make a retry (same sender, same clientMsgId) find its
original and to stop a racing one from storing twice; a message sent
without a clientMsgId (NULL) never collides with anything, so its entry
only cost every such send one more index page written at commit. Both
SQLite and PostgreSQL use the partial index for every lookup that names a
clientMsgId (``=`` and ``IN`` imply IS NOT NULL). One transaction: the
index is never missing in between.
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(
        migrator.drop_index('message', 'message_sender_id_client_msg_id'),
        migrator.add_index('message', ('sender_id', 'client_msg_id'), True,
                           where=SQL('"client_msg_id" IS NOT NULL')))


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index('message', 'message_sender_id_client_msg_id'),
        migrator.add_index('message', ('sender_id', 'client_msg_id'), True))
