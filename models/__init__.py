"""peewee models of what must last: users, rooms, members, messages, bans, ...

Models are unbound here; :class:`server.store.db.Database` binds them to the
configured SQLite or PostgreSQL database at start-up. Every query runs in
the database's worker threads, never on the event loop; the functions that
belong to a model live beside it (``models/chat.py`` for rooms and messages).
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Sequence
from typing import Any

import orjson
import peewee as pw


def utcnow() -> dt.datetime:
    """Naive UTC (what both SQLite and PostgreSQL store without surprises).

    The epoch plus the system clock's microseconds: the same value as
    ``datetime.now(UTC).replace(tzinfo=None)`` at a third of its cost (that
    makes an aware datetime, converts it, then parses ``replace``'s keyword
    to copy it; a send's job pays it on the writer thread). Not
    ``datetime.utcnow()``, deprecated since Python 3.12.
    """
    return _UNIX_EPOCH + dt.timedelta(0, 0, time.time_ns() // 1000)


_UNIX_EPOCH = dt.datetime(1970, 1, 1)


class JSONField(pw.TextField):
    """JSON stored as text, portable across SQLite and PostgreSQL."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()

    def python_value(self, value: Any) -> Any:
        return None if value is None else orjson.loads(value)


def new_epoch() -> str:
    """A room epoch: random, so that no two incarnations of a room id share one."""
    return secrets.token_hex(EPOCH_BYTES)


#: Random bytes of a room epoch (hex: twice as many characters).
EPOCH_BYTES = 6


class BaseModel(pw.Model):
    class Meta:
        legacy_table_names = False


class User(BaseModel):
    """Users come from token claims; upserted on every connect."""

    id = pw.CharField(primary_key=True, max_length=128)
    username = pw.CharField(max_length=64, index=True)
    display_name = pw.CharField(max_length=128)
    roles = pw.CharField(max_length=256, default="user")  # comma separated
    created_at = pw.DateTimeField(default=utcnow)
    last_seen_at = pw.DateTimeField(default=utcnow)


class Room(BaseModel):
    id = pw.CharField(primary_key=True, max_length=64)
    name = pw.CharField(max_length=100)
    type = pw.CharField(max_length=16, default="public")  # public | private
    description = pw.CharField(max_length=500, default="")
    # Since migration 0003; the column has a database default too, so a node
    # of older code inserting rooms during a rolling upgrade still works.
    topic = pw.CharField(max_length=200, default="")
    password_hash = pw.CharField(max_length=256, null=True)
    owner_id = pw.CharField(max_length=128)
    # Highest seq handed out; bumped in the same transaction as the insert.
    last_seq = pw.BigIntegerField(default=0)
    # Which history the seqs count in (migration 0005): a room recreated under
    # its id or a database restored from a backup has another one, so that a
    # client's sinceSeq from before is answered "reset", never trusted
    # (room:resume). Rows inserted by a node of older code get '' (the
    # column's database default), an epoch like any other.
    epoch = pw.CharField(max_length=16, default=new_epoch)
    created_at = pw.DateTimeField(default=utcnow)
    last_activity_at = pw.DateTimeField(default=utcnow)
    deleted_at = pw.DateTimeField(null=True)


class RoomMember(BaseModel):
    room = pw.ForeignKeyField(Room, backref="members", on_delete="CASCADE")
    user_id = pw.CharField(max_length=128, index=True)
    role = pw.CharField(max_length=16, default="member")  # owner | moderator | member
    joined_at = pw.DateTimeField(default=utcnow)
    last_read_seq = pw.BigIntegerField(default=0)
    # The table still has a ``muted_until`` column (migration 0001); nothing
    # reads it since 0002 moved mutes to RoomMute, so that they outlive
    # membership. Kept, not dropped, so a node still running the old code
    # during a rolling upgrade does not fail on every membership query.

    class Meta:
        indexes = ((("room", "user_id"), True),)


class RoomMute(BaseModel):
    """A user's mute in one room, the only record of it (``admin:mute``).

    Not part of the membership: leaving and rejoining does not lift it, and a
    moderator may mute someone before they join. One row per (room, user); a
    new mute replaces the terms; an expired row is inert (every check
    compares ``until`` with now) until the next mute overwrites it.
    """

    room = pw.ForeignKeyField(Room, backref="mutes", on_delete="CASCADE")
    user_id = pw.CharField(max_length=128)
    until = pw.DateTimeField()
    muted_by = pw.CharField(max_length=128)
    reason = pw.CharField(max_length=500, default="")
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("room", "user_id"), True),)


class Message(BaseModel):
    id = pw.BigAutoField()
    # No index of its own (dropped by migration 0006): (room, seq) below serves it.
    room = pw.ForeignKeyField(Room, backref="messages", on_delete="CASCADE", index=False)
    seq = pw.BigIntegerField()
    sender_id = pw.CharField(max_length=128)
    sender_name = pw.CharField(max_length=128)
    content = pw.TextField()
    type = pw.CharField(max_length=16, default="text")
    parent_id = pw.BigIntegerField(null=True)
    attachments = JSONField(default=list)
    metadata = JSONField(default=dict)
    client_msg_id = pw.CharField(max_length=64, null=True)
    created_at = pw.DateTimeField(default=utcnow)
    edited_at = pw.DateTimeField(null=True)
    deleted_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = (
            (("room", "seq"), True),
            # History by date (migration 0003): a date's position in the room's order.
            (("room", "created_at", "seq"), False),
        )


# A retry's (sender, clientMsgId), unique; partial since migration 0007: a send
# without a clientMsgId has no entry (one index page fewer written at commit).
Message.add_index(
    Message.index(
        Message.sender_id, Message.client_msg_id, unique=True,
        where=Message.client_msg_id.is_null(False),
    )
)  # fmt: skip


class Reaction(BaseModel):
    message = pw.ForeignKeyField(Message, backref="reactions", on_delete="CASCADE")
    user_id = pw.CharField(max_length=128)
    emoji = pw.CharField(max_length=32)
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("message", "user_id", "emoji"), True),)


class Notification(BaseModel):
    id = pw.BigAutoField()
    user_id = pw.CharField(max_length=128, index=True)
    type = pw.CharField(max_length=32, default="info")
    category = pw.CharField(max_length=32, default="system")
    title = pw.CharField(max_length=200)
    message = pw.TextField(default="")
    data = JSONField(default=dict)
    action_url = pw.CharField(max_length=500, null=True)
    priority = pw.CharField(max_length=16, default="normal")
    read = pw.BooleanField(default=False)
    # Coalescing key, e.g. "missed:<roomId>": one live notification per key.
    group_key = pw.CharField(max_length=200, null=True, index=True)
    created_at = pw.DateTimeField(default=utcnow)


class Ban(BaseModel):
    user_id = pw.CharField(max_length=128, unique=True)
    reason = pw.CharField(max_length=500, default="")
    banned_by = pw.CharField(max_length=128)
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField(null=True)


class AuditLog(BaseModel):
    id = pw.BigAutoField()
    actor_id = pw.CharField(max_length=128)
    action = pw.CharField(max_length=64)
    target = pw.CharField(max_length=200)
    reason = pw.CharField(max_length=500, default="")
    details = JSONField(default=dict)
    created_at = pw.DateTimeField(default=utcnow)


MODELS: list[type[BaseModel]] = [
    User, Room, RoomMember, RoomMute, Message, Reaction, Notification, Ban, AuditLog,
]  # fmt: skip


def active_ban(user_id: str) -> Ban | None:
    """The user's ban in force now, if any (expired bans are ignored)."""
    now = utcnow()
    return (
        Ban.select()
        .where(
            (Ban.user_id == user_id) & ((Ban.expires_at.is_null()) | (Ban.expires_at > now))
        )
        .first()
    )


# -- plain SQL: where peewee's query builder costs more than the query runs ------------


def sql_mark() -> str:
    """The bound-parameter mark of the database in use (``?`` SQLite, ``%s`` PostgreSQL)."""
    return str(Message._meta.database.param)


def sql_marks(values: Sequence[Any]) -> str:
    """One mark per value, comma-separated (for ``IN (...)`` and ``VALUES (...)``)."""
    return ", ".join([sql_mark()] * len(values))


#: Turns a DB-API driver's exception into peewee's (``pw.IntegrityError``, ...), as
#: ``execute_sql`` does: callers catch those (``send_messages``, ``Database._finish``).
#: Not in peewee's ``__all__`` but the module's own wrapper class and table, the
#: only way to get the same exceptions without copying the table;
#: tests/test_chat.py::test_plain_sql_raises_peewees_exceptions guards it.
_PEEWEE_ERRORS = pw.ExceptionWrapper(pw.EXCEPTIONS)


def sql_execute(sql: str, params: Sequence[Any]) -> Any:
    """Run ``sql`` on the database the models are bound to; the cursor.

    Straight on the DB-API cursor of ``connection()``, not through
    ``execute_sql``, whose layers (query log, hooks, the closed check of
    ``cursor()``) cost a few µs per statement of a lone send's job, on the
    writer thread the next send waits for. Errors are peewee's all the same,
    translated only once one was raised: entering and leaving the wrapper on
    every statement cost two Python calls each, a cold µs or more apiece.
    """
    try:
        cursor = Message._meta.database.connection().cursor()
        cursor.execute(sql, params)
    except Exception:
        with _PEEWEE_ERRORS:
            raise
    return cursor


def sql_rows(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Every row of ``sql`` as a tuple (both drivers' own rows are: no copy)."""
    rows: list[tuple[Any, ...]] = sql_execute(sql, params).fetchall()
    return rows
