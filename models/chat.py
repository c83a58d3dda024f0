"""Rooms, members, messages and reactions: the queries chat needs.

Every function here runs inside one transaction in a database worker
thread (see :meth:`server.store.db.Database.run`) and returns plain dicts in the
wire shape, never model instances, so nothing lazily touches the database
from the event loop.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson
import peewee as pw

from models import (
    Message,
    Reaction,
    Room,
    RoomMember,
    RoomMute,
    User,
    new_epoch,
    sql_execute,
    sql_mark,
    sql_marks,
    sql_rows,
    utcnow,
)
from models.moderation import bans_in_force, mute_in_force
from server.core import errors
from server.core.protocol import iso

RECOVERY_LIMIT = 500
#: Missed messages one room:resume answer carries over all its rooms; the
#: rooms beyond are resumed with ``recovered: false`` (the client pages), so
#: one ack stays a bounded frame however many rooms a client comes back to.
RESUME_MISSED_LIMIT = 2000
_PASSWORD_ITERATIONS = 120_000


# -- users ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """One connection's admission, as :func:`connect_users` takes it: its token's claims."""

    user_id: str
    username: str
    display_name: str
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """What an admitted connection needs: the live rooms its user is a member of."""

    room_ids: list[str]


def connect_users(requests: list[ConnectRequest]) -> list[ConnectInfo | errors.GatewayError]:
    """Admit a batch of connections in one transaction, each with its own outcome.

    Group commit (``server.store.batch.Batcher``, op ``user.connect``): the
    connections that arrive while the previous batch is in the database come
    here together. Every user is recorded from its token's claims with one
    multi-row upsert (a banned user too, as a lone connect always did); then
    one query finds the bans in force and one the member rooms. A banned user's
    outcome is its ``BANNED`` error; the others are admitted.

    The same user twice in a batch (two devices, a reconnect racing its old
    socket) is one row: the claims of the request that arrived last win, as
    they would have had the two connects run one after the other, and both get
    the same outcome. Rows go in sorted by user id, so batches upserting the
    same users on two nodes lock them in one order and never deadlock.
    """
    now = utcnow()
    latest = {r.user_id: r for r in requests}  # dict order: the last request of a user wins
    rows = [
        {
            "id": r.user_id, "username": r.username, "display_name": r.display_name,
            "roles": ",".join(sorted(r.roles)), "created_at": now, "last_seen_at": now,
        }
        for _, r in sorted(latest.items())
    ]  # fmt: skip
    (
        User.insert_many(rows)
        .on_conflict(
            conflict_target=[User.id],
            preserve=[User.username, User.display_name, User.roles, User.last_seen_at],
        )
        .execute()
    )
    user_ids = sorted(latest)
    bans = bans_in_force(user_ids)
    rooms: dict[str, list[str]] = defaultdict(list)
    query = (
        RoomMember.select(RoomMember.user_id, RoomMember.room)
        .join(Room)
        .where(RoomMember.user_id.in_(user_ids) & Room.deleted_at.is_null())
    )
    for m in query:
        rooms[m.user_id].append(m.room_id)
    return [
        errors.Banned(details=ban) if (ban := bans.get(r.user_id)) is not None
        else ConnectInfo(list(rooms[r.user_id]))  # its own list: a connection edits it
        for r in requests
    ]  # fmt: skip


def member_room_ids(user_id: str) -> list[str]:
    query = (
        RoomMember.select(RoomMember.room)
        .join(Room)
        .where((RoomMember.user_id == user_id) & Room.deleted_at.is_null())
    )
    return [m.room_id for m in query]


def user_names(user_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{userId: (username, displayName)}`` of the known users among ``user_ids``."""
    if not user_ids:
        return {}
    query = User.select(User.id, User.username, User.display_name).where(User.id.in_(user_ids))
    return {u.id: (u.username, u.display_name) for u in query}


# -- passwords (CPU-bound: call from a thread, never the loop) ---------------


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _PASSWORD_ITERATIONS)
    return f"pbkdf2_sha256${_PASSWORD_ITERATIONS}${salt.hex()}${digest.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, iterations, salt, digest = encoded.split("$")
        candidate = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), bytes.fromhex(salt), int(iterations)
        )
    except ValueError:
        return False
    return hmac.compare_digest(candidate.hex(), digest)


# -- rooms ------------------------------------------------------------------


def room_dict(room: Room, member_count: int | None = None) -> dict[str, Any]:
    out = {
        "id": room.id,
        "name": room.name,
        "type": room.type,
        "description": room.description,
        "topic": room.topic,
        "ownerId": room.owner_id,
        "hasPassword": room.password_hash is not None,
        "lastSeq": room.last_seq,
        "epoch": room.epoch,
        "createdAt": iso(room.created_at),
        "lastActivityAt": iso(room.last_activity_at),
    }
    if member_count is not None:
        out["memberCount"] = member_count
    return out


def _live_room(room_id: str) -> Room:
    room = Room.get_or_none((Room.id == room_id) & Room.deleted_at.is_null())
    if room is None:
        raise errors.RoomNotFound(details={"roomId": room_id})
    return room


def create_room(
    room_id: str,
    owner_id: str,
    name: str,
    room_type: str,
    description: str,
    topic: str,
    password_hash: str | None,
    members: list[str],
) -> dict[str, Any]:
    if Room.get_or_none(Room.id == room_id) is not None:
        raise errors.Conflict("A room with this id exists", {"roomId": room_id})
    now = utcnow()
    room = Room.create(
        id=room_id, name=name, type=room_type, description=description, topic=topic,
        password_hash=password_hash, owner_id=owner_id, created_at=now, last_activity_at=now,
    )  # fmt: skip
    RoomMember.create(room=room, user_id=owner_id, role="owner", joined_at=now)
    for user_id in dict.fromkeys(members):
        if user_id != owner_id:
            RoomMember.create(room=room, user_id=user_id, role="member", joined_at=now)
    return room_dict(room, member_count=1 + len(set(members) - {owner_id}))


def list_rooms(user_id: str, q: str | None, limit: int, offset: int) -> dict[str, Any]:
    """Public rooms plus the user's own, by most recent activity."""
    mine = RoomMember.select(RoomMember.room).where(RoomMember.user_id == user_id)
    where = Room.deleted_at.is_null() & ((Room.type == "public") | Room.id.in_(mine))
    if q:
        where &= pw.fn.LOWER(Room.name).contains(q.lower())
    total = Room.select().where(where).count()
    rooms = list(
        Room.select().where(where).order_by(Room.last_activity_at.desc(), Room.id)
        .limit(limit).offset(offset)
    )  # fmt: skip
    counts = _member_counts([r.id for r in rooms])
    return {"rooms": [room_dict(r, counts.get(r.id, 0)) for r in rooms], "total": total}


def _member_counts(room_ids: list[str]) -> dict[str, int]:
    if not room_ids:
        return {}
    query = (
        RoomMember.select(RoomMember.room, pw.fn.COUNT(RoomMember.id).alias("n"))
        .where(RoomMember.room.in_(room_ids))
        .group_by(RoomMember.room)
    )
    return {row.room_id: row.n for row in query}


@dataclass(frozen=True)
class RoomAccess:
    room: dict[str, Any]
    is_member: bool
    room_type: str
    password_hash: str | None


def room_access(room_id: str, user_id: str) -> RoomAccess:
    room = _live_room(room_id)
    member = RoomMember.get_or_none((RoomMember.room == room) & (RoomMember.user_id == user_id))
    return RoomAccess(room_dict(room), member is not None, room.type, room.password_hash)


def join_room(room_id: str, user_id: str, since_seq: int | None) -> dict[str, Any]:
    """Make the user a member (idempotent); return members and missed messages."""
    room = _live_room(room_id)
    RoomMember.insert(room=room, user_id=user_id, role="member").on_conflict_ignore().execute()
    result: dict[str, Any] = {
        "room": room_dict(room),
        "members": room_members(room_id),
        "recovered": False,
        "missed": [],
    }
    if since_seq is not None:
        missed = _missed_since(room_id, since_seq, RECOVERY_LIMIT)
        if missed is not None:
            result["recovered"] = True
            result["missed"] = missed
    return result


def _missed_since(room_id: str, since_seq: int, limit: int) -> list[dict[str, Any]] | None:
    """The room's messages after ``since_seq`` in seq order; None if more than ``limit``."""
    missed = _after(room_id, since_seq, limit + 1)
    return _message_dicts(missed) if len(missed) <= limit else None


def _after(room_id: str, seq: int, limit: int) -> list[Message]:
    """Up to ``limit`` of the room's messages after ``seq``, in seq order."""
    query = (
        Message.select()
        .where((Message.room == room_id) & (Message.seq > seq))
        .order_by(Message.seq)
        .limit(limit)
    )
    return list(query)


def messages_after(after: dict[str, int], limit: int) -> dict[str, list[dict[str, Any]]]:
    """Per room of ``after``, up to ``limit`` of its messages above the seq given, in order.

    A node's catch-up (``server/services/catch_up.py``): one read for every
    room it has members in, whatever their membership (the node delivers
    to the members it has).
    """
    return {room_id: _message_dicts(_after(room_id, seq, limit)) for room_id, seq in after.items()}


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """One room of a ``room:resume``: where the client's contiguous history ends."""

    room_id: str
    since_seq: int
    epoch: str


def resume_rooms(user_id: str, requests: list[ResumeRequest]) -> list[dict[str, Any]]:
    """Per room, in request order, ``{roomId, status, recovered, missed}``.

    ``status`` is ``gone`` when the room does not exist (or was deleted),
    ``forbidden`` when the user is no longer a member, ``reset`` when the
    client's history is not this room's: another epoch (the id was given to
    a new room, the database was restored), or a ``sinceSeq`` beyond the
    room's last seq (restored from a backup older than what the client saw);
    otherwise ``resumed`` with the messages after ``sinceSeq`` as
    :func:`join_room` gives them (``recovered: false`` and none beyond
    :data:`RECOVERY_LIMIT`, or once :data:`RESUME_MISSED_LIMIT` is spent).
    Unlike :func:`join_room` it makes nobody a member: resuming is coming
    back to rooms, not joining new ones.
    """
    room_ids = [r.room_id for r in requests]
    rooms = {
        room.id: room
        for room in Room.select(Room.id, Room.epoch, Room.last_seq)
        .where(Room.id.in_(room_ids) & Room.deleted_at.is_null())
    }  # fmt: skip
    member_of = {
        m.room_id
        for m in RoomMember.select(RoomMember.room)
        .where(RoomMember.room.in_(room_ids) & (RoomMember.user_id == user_id))
    }  # fmt: skip
    budget = RESUME_MISSED_LIMIT
    out = []
    for r in requests:
        answer: dict[str, Any] = {"roomId": r.room_id, "recovered": False, "missed": []}
        room = rooms.get(r.room_id)
        if room is None:
            answer["status"] = "gone"
        elif r.room_id not in member_of:
            answer["status"] = "forbidden"
        elif room.epoch != r.epoch or r.since_seq > room.last_seq:
            answer["status"] = "reset"
        else:
            answer["status"] = "resumed"
            missed = _missed_since(r.room_id, r.since_seq, min(RECOVERY_LIMIT, budget))
            if missed is not None:
                budget -= len(missed)
                answer["recovered"] = True
                answer["missed"] = missed
        out.append(answer)
    return out


def renew_epochs() -> int:
    """Give every room a new epoch; returns how many (``switchboard renew-epochs``).

    For a database restored from a backup: its rooms' seqs count again from
    where the backup stood, so a client's ``sinceSeq`` from before means
    other messages; a new epoch makes ``room:resume`` answer ``reset``.
    """
    room_ids = [room.id for room in Room.select(Room.id)]
    for room_id in room_ids:
        Room.update(epoch=new_epoch()).where(Room.id == room_id).execute()
    return len(room_ids)


def leave_room(room_id: str, user_id: str) -> None:
    """Leave membership; owners stay members of the room they own."""
    room = _live_room(room_id)
    (
        RoomMember.delete()
        .where(
            (RoomMember.room == room) & (RoomMember.user_id == user_id)
            & (RoomMember.role != "owner")
        )
        .execute()
    )  # fmt: skip


def room_members(room_id: str) -> list[dict[str, Any]]:
    query = (
        RoomMember.select(RoomMember, User)
        .join(User, pw.JOIN.LEFT_OUTER, on=(RoomMember.user_id == User.id))
        .where(RoomMember.room == room_id)
        .order_by(RoomMember.joined_at, RoomMember.id)
    )
    out = []
    for m in query:
        user = getattr(m, "user", None)
        out.append({
            "userId": m.user_id,
            "username": user.username if user else m.user_id,
            "displayName": user.display_name if user else m.user_id,
            "role": m.role,
            "lastReadSeq": m.last_read_seq,
            "joinedAt": iso(m.joined_at),
        })  # fmt: skip
    return out


def require_member(room_id: str, user_id: str) -> RoomMember:
    room = _live_room(room_id)
    member = RoomMember.get_or_none((RoomMember.room == room) & (RoomMember.user_id == user_id))
    if member is None:
        if room.type == "private":
            raise errors.RoomAccessDenied(details={"roomId": room_id})
        raise errors.NotInRoom(details={"roomId": room_id})
    return member


def _require_unmuted(room_id: str, user_id: str) -> None:
    """MUTED while the user's mute in the room (``models.moderation.mute_user``) is in force.

    A mute is read-only membership: the member still reads, marks read and
    deletes their own messages, but does not send, edit, react or type. It
    is looked up on its own, not on the membership row, because it outlives
    membership (leave and rejoin, or muted before joining).
    """
    until = mute_in_force(room_id, user_id)
    if until is not None:
        raise errors.Muted(details={"roomId": room_id, "until": iso(until)})


def require_voice(room_id: str, user_id: str) -> None:
    """Raise unless the user may speak in the room now (``typing:start``).

    The errors of :func:`require_member`, or MUTED.
    """
    require_member(room_id, user_id)
    _require_unmuted(room_id, user_id)


def members_of(room_id: str, user_id: str) -> list[dict[str, Any]]:
    """Members of a room; a private room shows them to its members only."""
    room = _live_room(room_id)
    if room.type == "private":
        require_member(room_id, user_id)
    return room_members(room_id)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One ``room:read``, as :func:`mark_read_many` takes it."""

    room_id: str
    user_id: str
    seq: int


def mark_read_many(requests: list[ReadRequest]) -> list[dict[str, Any] | errors.GatewayError]:
    """Move read markers for a batch of ``room:read`` in one transaction, each with its outcome.

    Group commit (``server.store.batch.Batcher``, op ``room.read``): every member
    of a busy room marks it read as messages arrive, so reads come in
    numbers. One query finds the live rooms, one the memberships; a request
    that fails :func:`require_member`'s checks gets its error alone. A
    marker only moves forward, to at most the room's last seq; the requests
    apply in arrival order (two of one user in one batch: the second sees
    the first), and each changed membership is written once, never
    backwards (another node may have moved it meanwhile).
    """
    room_ids = sorted({r.room_id for r in requests})
    user_ids = sorted({r.user_id for r in requests})
    rooms = {room_id: (room_type, last_seq) for room_id, room_type, last_seq in sql_rows(
        f'SELECT "id", "type", "last_seq" FROM "room" WHERE "id" IN ({sql_marks(room_ids)})'
        ' AND "deleted_at" IS NULL', room_ids,
    )}  # fmt: skip
    read = {key: row[0] for key, row in _memberships(room_ids, user_ids, "last_read_seq").items()}
    moved: dict[tuple[str, str], int] = {}
    out: list[dict[str, Any] | errors.GatewayError] = []
    for r in requests:
        key = (r.room_id, r.user_id)
        if r.room_id not in rooms:
            out.append(errors.RoomNotFound(details={"roomId": r.room_id}))
        elif key not in read:
            private = rooms[r.room_id][0] == "private"
            out.append((errors.RoomAccessDenied if private else errors.NotInRoom)(
                details={"roomId": r.room_id}))  # fmt: skip
        else:
            last_seq = rooms[r.room_id][1]
            new_seq = max(read[key], min(r.seq, last_seq))
            if new_seq != read[key]:
                read[key] = moved[key] = new_seq
            out.append({"roomId": r.room_id, "lastReadSeq": new_seq, "unread": last_seq - new_seq})
    mark = sql_mark()
    for (room_id, user_id), seq in sorted(moved.items()):  # one order on every node
        sql_execute(
            f'UPDATE "room_member" SET "last_read_seq" = {mark} WHERE "room_id" = {mark}'
            f' AND "user_id" = {mark} AND "last_read_seq" < {mark}', [seq, room_id, user_id, seq],
        )  # fmt: skip
    return out


def _owned_room(room_id: str, user_id: str, is_admin: bool, verb: str) -> Room:
    """The live room, if ``user_id`` owns it or ``is_admin``; FORBIDDEN otherwise.

    Who may delete or update a room: its owner or a token with role admin
    (moderators and room moderators may not).
    """
    room = _live_room(room_id)
    if room.owner_id != user_id and not is_admin:
        raise errors.Forbidden(f"Only the room's owner or an admin {verb} a room")
    return room


#: The room columns :func:`update_room` changes, by the name ``changes`` reports.
UPDATABLE_ROOM_FIELDS = {
    "name": Room.name,
    "topic": Room.topic,
    "description": Room.description,
    "type": Room.type,
    "password": Room.password_hash,
}


@dataclass(frozen=True)
class RoomUpdated:
    """What :func:`update_room` did."""

    #: The room as it is now, with ``memberCount``.
    room: dict[str, Any]
    #: The fields whose value changed (names of :data:`UPDATABLE_ROOM_FIELDS`).
    changes: list[str]
    #: Every member's user id.
    members: list[str]


def update_room(room_id: str, user_id: str, is_admin: bool, values: dict[str, Any]) -> RoomUpdated:
    """Set some of a room's fields (its owner or an admin).

    ``values`` maps names of :data:`UPDATABLE_ROOM_FIELDS` to new values;
    ``password`` carries the new hash, None to remove the password. A field
    set to what it holds is not a change, except a password (a new hash
    every time; comparing would mean a PBKDF2 round here). Memberships stay
    as they are: making a room private or adding a password binds only
    people who join later.
    """
    room = _owned_room(room_id, user_id, is_admin, "updates")
    changes = {
        name: value for name, value in values.items()
        if getattr(room, UPDATABLE_ROOM_FIELDS[name].name) != value or (
            name == "password" and value is not None
        )
    }  # fmt: skip
    if changes:
        updated = (
            Room.update({UPDATABLE_ROOM_FIELDS[name]: value for name, value in changes.items()})
            .where((Room.id == room_id) & Room.deleted_at.is_null())
            .execute()
        )
        if not updated:  # deleted by someone else since it was read
            raise errors.RoomNotFound(details={"roomId": room_id})
        room = Room.get_by_id(room_id)
    members = [m.user_id for m in RoomMember.select().where(RoomMember.room == room_id)]
    return RoomUpdated(room_dict(room, member_count=len(members)), list(changes), members)


def delete_room(room_id: str, user_id: str, is_admin: bool) -> list[str]:
    """Soft-delete a room (its owner or an admin); returns its member ids.

    Its mutes go with it: a deleted room's id is never reused (``create_room``
    refuses it), so they could only ever be dead rows.
    """
    _owned_room(room_id, user_id, is_admin, "deletes")
    Room.update(deleted_at=utcnow()).where(Room.id == room_id).execute()
    RoomMute.delete().where(RoomMute.room == room_id).execute()
    return [m.user_id for m in RoomMember.select().where(RoomMember.room == room_id)]


# -- messages ---------------------------------------------------------------


def _message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    if not messages:
        return []
    reactions: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    query = (
        Reaction.select()
        .where(Reaction.message.in_([m.id for m in messages]))
        .order_by(Reaction.created_at, Reaction.id)
    )
    for r in query:
        reactions[r.message_id][r.emoji].append(r.user_id)
    return [message_dict(m, reactions.get(m.id, {})) for m in messages]


def message_dict(m: Message, reactions: dict[str, list[str]]) -> dict[str, Any]:
    deleted = m.deleted_at is not None
    return _wire_message(
        m.id, m.room_id, m.seq, m.sender_id, m.sender_name,
        "" if deleted else m.content, m.type, m.parent_id,
        [] if deleted else m.attachments, {} if deleted else m.metadata,
        {} if deleted else dict(reactions), iso(m.created_at), iso(m.edited_at), deleted,
    )  # fmt: skip


def _wire_message(
    message_id: int, room_id: str, seq: int, sender_id: str, sender_name: str, content: str,
    msg_type: str, parent_id: int | None, attachments: list[str], metadata: dict[str, Any],
    reactions: dict[str, list[str]], created_at: str | None, edited_at: str | None,
    deleted: bool,
) -> dict[str, Any]:  # fmt: skip
    """The message object of the wire protocol (docs/protocol.md), from its fields."""
    return {
        "id": str(message_id),
        "roomId": room_id,
        "seq": seq,
        "senderId": sender_id,
        "senderName": sender_name,
        "content": content,
        "type": msg_type,
        "parentMessageId": str(parent_id) if parent_id is not None else None,
        "attachments": attachments,
        "metadata": metadata,
        "reactions": reactions,
        "createdAt": created_at,
        "editedAt": edited_at,
        "deleted": deleted,
    }


def _reactions_of(message_id: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    query = (
        Reaction.select()
        .where(Reaction.message == message_id)
        .order_by(Reaction.created_at, Reaction.id)
    )
    for r in query:
        out[r.emoji].append(r.user_id)
    return dict(out)


@dataclass(frozen=True)
class Sent:
    message: dict[str, Any]
    duplicate: bool


def send_message(
    room_id: str,
    sender_id: str,
    sender_name: str,
    content: str,
    msg_type: str,
    parent_id: int | None,
    attachments: list[str],
    metadata: dict[str, Any],
    client_msg_id: str | None,
) -> Sent:
    """Store a message with the room's next ``seq`` (one transaction).

    The seq bump and the insert commit together, so seqs have no gaps; the
    row lock on the room (PostgreSQL) or the single writer (SQLite) makes
    concurrent senders queue rather than collide.
    """
    if client_msg_id is not None:
        existing = Message.get_or_none(
            (Message.sender_id == sender_id) & (Message.client_msg_id == client_msg_id)
        )
        if existing is not None:
            return _raise_or_return(_retry_outcome(room_id, client_msg_id, existing))
    require_member(room_id, sender_id)
    _require_unmuted(room_id, sender_id)
    if parent_id is not None:
        parent = Message.get_or_none((Message.id == parent_id) & (Message.room == room_id))
        if parent is None:
            raise errors.MessageNotFound(
                "Parent message not found in this room", {"parentMessageId": str(parent_id)}
            )
    now = utcnow()
    try:
        # A savepoint: a retry racing its original (PostgreSQL, two connections)
        # loses on the unique (sender, clientMsgId) index; undo its seq bump too.
        with Message._meta.database.atomic():
            updated = (
                Room.update(last_seq=Room.last_seq + 1, last_activity_at=now)
                .where((Room.id == room_id) & Room.deleted_at.is_null())
                .execute()
            )
            if not updated:
                raise errors.RoomNotFound(details={"roomId": room_id})
            seq = Room.select(Room.last_seq).where(Room.id == room_id).scalar()
            message = Message.create(
                room=room_id, seq=seq, sender_id=sender_id, sender_name=sender_name,
                content=content, type=msg_type, parent_id=parent_id, attachments=attachments,
                metadata=metadata, client_msg_id=client_msg_id, created_at=now,
            )  # fmt: skip
    except pw.IntegrityError:
        if client_msg_id is None:
            raise
        original = Message.get_or_none(
            (Message.sender_id == sender_id) & (Message.client_msg_id == client_msg_id)
        )
        if original is None:
            raise
        return _raise_or_return(_retry_outcome(room_id, client_msg_id, original))
    return Sent(message_dict(message, {}), False)


def _raise_or_return(outcome: Sent | errors.GatewayError) -> Sent:
    if isinstance(outcome, errors.GatewayError):
        raise outcome
    return outcome


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One ``message:send``, as :func:`send_messages` takes it."""

    room_id: str
    sender_id: str
    sender_name: str
    content: str
    msg_type: str
    parent_id: int | None
    attachments: list[str]
    metadata: dict[str, Any]
    client_msg_id: str | None


def store_sends(requests: list[SendRequest]) -> list[Sent | errors.GatewayError]:
    """The sends batcher's job: :func:`send_messages` in a transaction of its own.

    A lone plain send on SQLite (the usual batch at a steady rate), outside
    any transaction, is stored by :func:`_send_lone_sqlite` instead: the
    same four statements as :func:`send_messages` runs for it, with none of
    peewee's transaction layers around them (the job's Python ~155 -> ~87 µs
    on a cold core, bench.stages). Everything else, and a lone send its
    checks refuse, goes through :func:`send_messages` in ``atomic()``.
    """
    db = Message._meta.database
    lone = _plain_lone(requests)
    tried = False
    if lone is not None and isinstance(db, pw.SqliteDatabase) and not db.in_transaction():
        if (sent := _send_lone_sqlite(lone)) is not None:
            return [sent]
        tried = True  # refused by its checks: send_messages names the error
    with db.atomic():
        return send_messages(requests, lone_tried=tried)


def _plain_lone(requests: list[SendRequest]) -> SendRequest | None:
    """The batch's one send when it is alone and plain (no clientMsgId, no parent): the
    send whose checks can ride on its room's seq bump (see :func:`_insert_batch`)."""
    if len(requests) != 1:
        return None
    r = requests[0]
    return r if r.client_msg_id is None and r.parent_id is None else None


def _send_lone_sqlite(r: SendRequest) -> Sent | None:
    """One plain send stored in a SQLite transaction run by hand; None if its checks refuse.

    ``BEGIN``, the room's seq bump with the send's checks as its conditions
    (as :func:`_insert_batch` with ``checks_of``), the insert, ``COMMIT``,
    each on the driver's connection through :func:`~models.sql_execute`
    (peewee's exceptions). peewee's connection runs in autocommit mode, so
    ``BEGIN`` is what opens the transaction, as ``atomic()`` does. Refused
    (not a member, muted, the room gone), nothing was written: rolled back,
    None, and :func:`send_messages` names the error. Any failure rolls the
    transaction back before it propagates, as ``atomic()`` would.
    """
    now = utcnow()
    stamp = _db_time(now)
    sql_execute("BEGIN", ())
    try:
        bumped = sql_rows(
            _bump_sql("?", True), (1, stamp, r.room_id, r.sender_id, r.sender_id, stamp)
        )
        if not bumped:
            sql_execute("ROLLBACK", ())
            return None
        ((seq,),) = bumped
        row = _message_row(r, r.room_id, seq, stamp)
        ((message_id, _, _),) = sql_rows(_insert_sql("?", 1), row)
        sql_execute("COMMIT", ())
    except BaseException:
        if Message._meta.database.connection().in_transaction:
            sql_execute("ROLLBACK", ())
        raise
    return _sent(r, message_id, r.room_id, seq, _iso_of_text(stamp))


def _message_row(r: SendRequest, room_id: str, seq: int, stamp: Any) -> tuple[Any, ...]:
    """A send's values for :func:`_insert_sql`, in its column order."""
    # Most sends carry neither: their JSON is known without serialising.
    return (
        room_id, seq, r.sender_id, r.sender_name, r.content, r.msg_type, r.parent_id,
        orjson.dumps(r.attachments).decode() if r.attachments else "[]",
        orjson.dumps(r.metadata).decode() if r.metadata else "{}",
        r.client_msg_id, stamp,
    )  # fmt: skip


def _sent(r: SendRequest, message_id: int, room_id: str, seq: int, created: str | None) -> Sent:
    """A freshly stored send's outcome: its wire message, not a duplicate."""
    return Sent(_wire_message(
        message_id, room_id, seq, r.sender_id, r.sender_name, r.content, r.msg_type,
        r.parent_id, r.attachments, r.metadata, {}, created, None, False,
    ), False)  # fmt: skip


def send_messages(
    requests: list[SendRequest], *, lone_tried: bool = False
) -> list[Sent | errors.GatewayError]:
    """Store a batch of sends in one transaction, each with its own outcome.

    Group commit (``server.store.batch.Batcher``): the sends that wait while the
    previous batch is in the database arrive here together. Each is checked
    as :func:`send_message` checks one (clientMsgId retry, room, membership,
    mute, parent) with the same queries for the whole batch (room, membership
    and mute joined in one); one that fails gets its own error and costs the
    others nothing. The rest get seqs
    from one bump of each room's counter, in the order they arrived, and go
    in with one multi-row insert, so seqs stay gapless. A retry of a send
    earlier in the same batch (same sender and clientMsgId) is its
    duplicate. Should the insert still meet the (sender, clientMsgId) index
    (PostgreSQL: the original is committing on another node right now), the
    batch's inserts are undone and every send is stored on its own instead.
    A batch of one send without clientMsgId or parent skips the checks' read:
    they are conditions of its seq bump (see :func:`_insert_batch`), unless
    ``lone_tried`` says that bump was just refused (:func:`store_sends`).
    Runs inside the caller's transaction.
    """
    out: list[Sent | errors.GatewayError | None] = [None] * len(requests)
    now = utcnow()
    # A lone plain send (the usual batch at a steady rate): its checks ride on its
    # room's seq bump as conditions, one statement fewer than checking first.
    # One they refuse wrote nothing and takes the checks below, which name the error.
    lone = None if lone_tried else _plain_lone(requests)
    if lone is not None:
        if _insert_batch(requests, {lone.room_id: [0]}, now, out, checks_of=lone.sender_id):
            return [outcome for outcome in out if outcome is not None]
    # -- retries: of a stored message, or of a send earlier in this batch
    first_of: dict[tuple[str, str], int] = {}
    retry_of: dict[int, int] = {}
    for i, r in enumerate(requests):
        if r.client_msg_id is not None:
            key = (r.sender_id, r.client_msg_id)
            if key in first_of:
                retry_of[i] = first_of[key]
            else:
                first_of[key] = i
    if first_of:
        cmids, senders = sorted({k[1] for k in first_of}), sorted({k[0] for k in first_of})
        found = sql_rows(
            'SELECT "id", "sender_id", "client_msg_id" FROM "message"'
            f' WHERE "client_msg_id" IN ({sql_marks(cmids)})'
            f' AND "sender_id" IN ({sql_marks(senders)})',
            [*cmids, *senders],
        )
        for message_id, sender_id, client_msg_id in found:
            if (j := first_of.get((sender_id, client_msg_id))) is not None:
                original = Message.get_by_id(message_id)  # a retry: rare, the whole row
                out[j] = _retry_outcome(requests[j].room_id, requests[j].client_msg_id, original)
    # -- the checks of fresh sends, one query each for the whole batch
    fresh = [i for i in range(len(requests)) if out[i] is None and i not in retry_of]
    rooms, members, mutes, parents = _facts(requests, fresh, now)
    accepted: dict[str, list[int]] = defaultdict(list)
    for i in fresh:
        r = requests[i]
        room = rooms.get(r.room_id)
        if room is None:
            out[i] = errors.RoomNotFound(details={"roomId": r.room_id})
        elif (r.room_id, r.sender_id) not in members:
            out[i] = (errors.RoomAccessDenied if room == "private" else errors.NotInRoom)(
                details={"roomId": r.room_id}
            )
        elif (until := mutes.get((r.room_id, r.sender_id))) is not None:
            until = _py_time(until)
            out[i] = errors.Muted(details={"roomId": r.room_id, "until": iso(until)})
        elif r.parent_id is not None and parents.get(r.parent_id) != r.room_id:
            out[i] = errors.MessageNotFound(
                "Parent message not found in this room", {"parentMessageId": str(r.parent_id)}
            )
        else:
            accepted[r.room_id].append(i)
    if accepted and isinstance(Message._meta.database, pw.SqliteDatabase):
        # No savepoint: on SQLite the insert cannot meet a racing retry. Its
        # transactions are serializable (WAL: a write from a stale read
        # snapshot fails with SQLITE_BUSY_SNAPSHOT, an OperationalError), so
        # the (sender, clientMsgId) pairs the lookup above found free in this
        # transaction are still free, and retries within the batch were taken
        # out (``retry_of``). Should an IntegrityError come anyway (a damaged
        # database), the job's transaction rolls back whole: no seq is lost.
        _insert_batch(requests, accepted, now, out)
    elif accepted:
        try:
            with Message._meta.database.atomic():  # a savepoint, undone on a racing retry
                _insert_batch(requests, accepted, now, out)
        except pw.IntegrityError:
            # Rooms in _insert_batch's order: in arrival order, a send could hold a
            # later room's row while another node's batch, holding an earlier one
            # since this batch was undone, waits for it (a deadlock; one batch fails).
            for room_id in sorted(accepted):
                for i in accepted[room_id]:
                    out[i] = _send_alone(requests[i])
    results: list[Sent | errors.GatewayError] = []
    for i, outcome in enumerate(out):
        if i in retry_of:
            outcome = out[retry_of[i]]
            if isinstance(outcome, Sent):
                outcome = _retry_outcome(
                    requests[i].room_id, requests[i].client_msg_id, outcome.message
                )
        assert outcome is not None
        results.append(outcome)
    return results


def _facts(requests: list[SendRequest], fresh: list[int], now: dt.datetime) -> tuple[
    dict[str, str], set[tuple[str, str]], dict[tuple[str, str], Any], dict[int, str]
]:
    """What the checks of a batch's fresh sends need, in one query (two with parents).

    Live rooms' types, (room, sender) memberships, mutes in force (their end
    as the database returns it) and the rooms of the parents named. Rooms,
    memberships and mutes come joined: a lone send's checks are one statement
    (one GIL hand-back on SQLite, one round trip on PostgreSQL), not three.
    A mute matters only to a member, so it joins on the membership.
    """
    if not fresh:
        return {}, set(), {}, {}
    room_ids = sorted({requests[i].room_id for i in fresh})
    sender_ids = sorted({requests[i].sender_id for i in fresh})
    rooms: dict[str, str] = {}
    members: set[tuple[str, str]] = set()
    mutes: dict[tuple[str, str], Any] = {}
    for room_id, room_type, member_id, until in sql_rows(
        'SELECT r."id", r."type", m."user_id", u."until" FROM "room" r'
        ' LEFT JOIN "room_member" m ON m."room_id" = r."id"'
        f' AND m."user_id" IN ({sql_marks(sender_ids)})'
        ' LEFT JOIN "room_mute" u ON u."room_id" = r."id" AND u."user_id" = m."user_id"'
        f' AND u."until" > {sql_mark()}'
        f' WHERE r."id" IN ({sql_marks(room_ids)}) AND r."deleted_at" IS NULL',
        [*sender_ids, _db_time(now), *room_ids],
    ):  # fmt: skip
        rooms[room_id] = room_type
        if member_id is not None:
            members.add((room_id, member_id))
            if until is not None:
                mutes[(room_id, member_id)] = until
    parent_ids = sorted({p for i in fresh if (p := requests[i].parent_id) is not None})
    parents = dict(sql_rows(
        f'SELECT "id", "room_id" FROM "message" WHERE "id" IN ({sql_marks(parent_ids)})',
        parent_ids,
    )) if parent_ids else {}  # fmt: skip
    return rooms, members, mutes, parents


def _memberships(
    room_ids: list[str], user_ids: list[str], *columns: str
) -> dict[tuple[str, str], tuple[Any, ...]]:
    """``{(room, user): (columns...)}`` of the memberships among those rooms and users."""
    extra = "".join(f', "{c}"' for c in columns)
    return {(row[0], row[1]): row[2:] for row in sql_rows(
        f'SELECT "room_id", "user_id"{extra} FROM "room_member" WHERE "room_id" IN'
        f' ({sql_marks(room_ids)}) AND "user_id" IN ({sql_marks(user_ids)})',
        [*room_ids, *user_ids],
    )}  # fmt: skip


def _mutes_in_force(
    room_ids: list[str], user_ids: list[str], now: dt.datetime
) -> dict[tuple[str, str], Any]:
    """``{(room, user): until}`` of the mutes in force among those rooms and users.

    ``until`` as the database returns it (:func:`_py_time` reads it).
    """
    return {(room_id, user_id): until for room_id, user_id, until in sql_rows(
        f'SELECT "room_id", "user_id", "until" FROM "room_mute" WHERE "room_id" IN'
        f' ({sql_marks(room_ids)}) AND "user_id" IN ({sql_marks(user_ids)})'
        f' AND "until" > {sql_mark()}',
        [*room_ids, *user_ids, _db_time(now)],
    )}  # fmt: skip


def _insert_batch(
    requests: list[SendRequest],
    accepted: dict[str, list[int]],
    now: dt.datetime,
    out: list[Sent | errors.GatewayError | None],
    checks_of: str | None = None,
) -> bool:
    """Bump each room's seq once and insert every accepted send with one statement.

    Plain SQL: peewee's query builder cost ~2 ms a batch building the
    insert, more than SQLite took to run it (bench/persist.py). The bump and
    the insert return what the batch needs (RETURNING): one statement per
    room and one for the batch, no read-back (a round trip each on PostgreSQL).

    ``checks_of``: one unchecked send of that sender, whose checks (a member,
    not muted; the room live, as always) are the bump's conditions, as
    :func:`_facts` reads them. False when they refuse it: nothing written,
    ``out`` untouched; True otherwise.
    """
    stamp = _db_time(now)
    created = _iso_of_text(stamp) if isinstance(stamp, str) else iso(now)
    rows: list[tuple[Any, ...]] = []
    placed: list[tuple[int, str, int]] = []  # (request index, room, seq)
    checks_params: tuple[Any, ...] = () if checks_of is None else (checks_of, checks_of, stamp)
    bump = _bump_sql(sql_mark(), checks_of is not None)
    # Rooms in one order on every node: two batches never wait on each other's row locks.
    for room_id in sorted(accepted):
        indexes = accepted[room_id]
        count = len(indexes)
        bumped = sql_rows(bump, (count, stamp, room_id, *checks_params))
        if not bumped and checks_of is not None:
            return False
        if not bumped:  # deleted since the check (another node)
            for i in indexes:
                out[i] = errors.RoomNotFound(details={"roomId": room_id})
            continue
        ((last,),) = bumped
        for offset, i in enumerate(indexes):
            seq = last - count + 1 + offset
            placed.append((i, room_id, seq))
            rows.append(_message_row(requests[i], room_id, seq, stamp))
    if not rows:
        return True
    # RETURNING's row order is unspecified: (room, seq) names each row's id.
    ids = {(room_id, seq): message_id for message_id, room_id, seq in sql_rows(
        _insert_sql(sql_mark(), len(rows)), [v for row in rows for v in row],
    )}  # fmt: skip
    for i, room_id, seq in placed:
        out[i] = _sent(requests[i], ids[(room_id, seq)], room_id, seq, created)
    return True


# The send path's statements, built once per shape (a lone send's job ran ~10 µs of
# string building per call before). Keyed by the bound-parameter mark, so that one
# process may bind the models to SQLite and then PostgreSQL (the tests do).


@functools.cache
def _bump_sql(mark: str, checked: bool) -> str:
    """A room's seq bump by a count, RETURNING the new last seq.

    ``checked``: with a lone send's checks as conditions (its sender a member
    and not muted; params sender, sender, now), see :func:`_insert_batch`.
    """
    checks = (
        ' AND EXISTS (SELECT 1 FROM "room_member" m WHERE m."room_id" = "room"."id"'
        f' AND m."user_id" = {mark}) AND NOT EXISTS (SELECT 1 FROM "room_mute" u'
        f' WHERE u."room_id" = "room"."id" AND u."user_id" = {mark} AND u."until" > {mark})'
    ) if checked else ""  # fmt: skip
    return (
        f'UPDATE "room" SET "last_seq" = "last_seq" + {mark}, "last_activity_at" = {mark}'
        f' WHERE "id" = {mark} AND "deleted_at" IS NULL{checks} RETURNING "last_seq"'
    )


#: Insert statements kept (one per batch size met; a steady rate meets a few).
_INSERT_SQL_CACHED = 32


@functools.lru_cache(maxsize=_INSERT_SQL_CACHED)
def _insert_sql(mark: str, rows: int) -> str:
    """The insert of ``rows`` messages (11 params each), RETURNING id, room, seq."""
    values = ", ".join([f"({', '.join([mark] * 11)})"] * rows)
    return (
        'INSERT INTO "message" ("room_id", "seq", "sender_id", "sender_name", "content", "type",'
        ' "parent_id", "attachments", "metadata", "client_msg_id", "created_at")'
        f' VALUES {values} RETURNING "id", "room_id", "seq"'
    )


def _db_time(value: dt.datetime) -> Any:
    """A datetime as peewee stores it (SQLite: text; PostgreSQL: the datetime).

    On SQLite the text is made here, once, as the driver's default adapter
    (``sqlite3.dbapi2.adapt_datetime``, the one peewee leaves in place) makes
    it: a parameter used three times in a lone send's job would otherwise
    call that Python adapter three times. tests/test_chat.py::
    test_db_time_is_what_the_driver_stores guards the sameness.
    """
    if isinstance(Message._meta.database, pw.SqliteDatabase):
        return value.isoformat(" ")
    return value


def _iso_of_text(text: str) -> str:
    """``iso()`` of the datetime whose SQLite text (:func:`_db_time`) is ``text``.

    Cut from the text, not formatted again: the send path has both.
    ``isoformat`` leaves out a zero fraction, ``iso`` shows milliseconds.
    """
    if len(text) > len("YYYY-MM-DD HH:MM:SS"):
        return f"{text[:10]}T{text[11:23]}Z"
    return f"{text[:10]}T{text[11:]}.000Z"


def _py_time(value: Any) -> dt.datetime:
    """A datetime column read with plain SQL, as peewee would return it."""
    return RoomMute.until.python_value(value)  # type: ignore[no-untyped-call]


def _retry_outcome(
    room_id: str, client_msg_id: str | None, original: Message | dict[str, Any]
) -> Sent | errors.GatewayError:
    """A send whose (sender, clientMsgId) names ``original``: its duplicate, or CONFLICT.

    A clientMsgId names one message: reusing it for another room is a client
    bug that must not pass for a retry.
    """
    if isinstance(original, Message):
        original = message_dict(original, _reactions_of(original.id))
    if original["roomId"] != room_id:
        return errors.Conflict(
            "clientMsgId already names a message of another room",
            {"clientMsgId": client_msg_id},
        )
    return Sent(original, True)


def _send_alone(request: SendRequest) -> Sent | errors.GatewayError:
    try:
        with Message._meta.database.atomic():
            return send_message(
                request.room_id, request.sender_id, request.sender_name, request.content,
                request.msg_type, request.parent_id, request.attachments, request.metadata,
                request.client_msg_id,
            )  # fmt: skip
    except errors.GatewayError as exc:
        return exc


def get_messages(
    room_id: str,
    user_id: str,
    limit: int,
    before_seq: int | None = None,
    offset: int | None = None,
    *,
    after_seq: int | None = None,
    before: dt.datetime | None = None,
    after: dt.datetime | None = None,
) -> dict[str, Any]:
    """A newest-first page of the window the bounds leave; every bound exclusive.

    ``before_seq``/``before`` bound the window from above, ``after_seq``/
    ``after`` from below. With a lower bound alone the page holds the oldest
    messages of the window, those right after the bound, so a client pages
    forward; otherwise the newest. ``hasMore`` tells whether the window holds
    more in the paging direction (older; newer with a lower bound alone).
    ``offset`` skips that many of the newest (callers give it no bound).

    A date (aware) is a position in the room's order, found through the
    ``(room, created_at, seq)`` index and then bounding ``seq``, so every
    page is one seek of the ``(room, seq)`` index however old the date:
    ``before`` stops before the first message created at or after it,
    ``after`` starts past the last one created at or before it. Dates compare
    at the millisecond clients see in ``createdAt``, so a message's own
    ``createdAt`` excludes it.
    """
    require_member(room_id, user_id)
    forward = (after_seq, after) != (None, None) and (before_seq, before) == (None, None)
    # No message on the far side of a date: it bounds nothing.
    if before is not None:
        cut = _seq_beside(room_id, _ms_ceiling(before), from_it=True)
        if cut is not None:
            before_seq = cut if before_seq is None else min(before_seq, cut)
    if after is not None:
        cut = _seq_beside(room_id, _ms_ceiling(after, strictly=True), from_it=False)
        if cut is not None:
            after_seq = cut if after_seq is None else max(after_seq, cut)
    query = Message.select().where(Message.room == room_id)
    if before_seq is not None:
        query = query.where(Message.seq < before_seq)
    if after_seq is not None:
        query = query.where(Message.seq > after_seq)
    query = query.order_by(Message.seq if forward else Message.seq.desc()).limit(limit + 1)
    if offset:
        query = query.offset(offset)
    rows = list(query)
    page = rows[:limit]
    if forward:
        page.reverse()
    return {"messages": _message_dicts(page), "hasMore": len(rows) > limit}


def _seq_beside(room_id: str, stored: dt.datetime, *, from_it: bool) -> int | None:
    """Seq of the room's first message created at or after ``stored`` (``from_it``),
    or of its last one created before it; None when there is none."""
    created = Message.created_at
    query = Message.select(Message.seq).where(Message.room == room_id)
    if from_it:
        query = query.where(created >= stored).order_by(created, Message.seq)
    else:
        query = query.where(created < stored).order_by(created.desc(), Message.seq.desc())
    seq: int | None = query.limit(1).scalar()
    return seq


_MILLISECOND = dt.timedelta(milliseconds=1)


def _ms_ceiling(instant: dt.datetime, strictly: bool = False) -> dt.datetime:
    """The first stored (naive UTC) time whose wire millisecond is at or past ``instant``.

    Stored times keep microseconds but clients see milliseconds: "before T"
    is "created before T rounded up to its millisecond"; with ``strictly``,
    before the next millisecond after T's. Past the calendar's end, its last
    instant (no stored time reaches it).
    """
    naive = instant.astimezone(dt.UTC).replace(tzinfo=None)
    floor = naive.replace(microsecond=naive.microsecond // 1000 * 1000)
    if floor == naive and not strictly:
        return floor
    try:
        return floor + _MILLISECOND
    except OverflowError:
        return dt.datetime.max


def _message_not_found(message_id: int) -> errors.MessageNotFound:
    # The one shape of this error: "missing" and "not yours to see" must not differ.
    return errors.MessageNotFound(details={"messageId": str(message_id)})


def _live_message(message_id: int) -> Message:
    message = Message.get_or_none((Message.id == message_id) & Message.deleted_at.is_null())
    if message is None:
        raise _message_not_found(message_id)
    return message


def _visible_message(
    message_id: int, user_id: str, *, staff: bool = False
) -> tuple[Message, RoomMember | None]:
    """The live message and the caller's membership of its room (None: not a member).

    A message the caller may not read (its room is deleted, or private or
    password-protected and the caller is no member) answers exactly like a
    missing one: message ids are sequential, so anything else would let
    anyone enumerate private rooms. A public room without a password is
    open to all, so its non-members get the membership back as None and
    each action decides (``NOT_IN_ROOM`` names no room). ``staff`` (token
    role moderator/admin) sees every live room.
    """
    message = _live_message(message_id)
    room = Room.get_by_id(message.room_id)
    member = RoomMember.get_or_none((RoomMember.room == room) & (RoomMember.user_id == user_id))
    if room.deleted_at is not None:
        raise _message_not_found(message_id)
    if member is None and not staff and (
        room.type == "private" or room.password_hash is not None
    ):
        raise _message_not_found(message_id)
    return message, member


def _member_or_not_in_room(message_id: int, member: RoomMember | None) -> RoomMember:
    if member is None:
        # Only for open rooms (see _visible_message); the room id is not repeated.
        raise errors.NotInRoom("Join the message's room first", {"messageId": str(message_id)})
    return member


def message_room(message_id: int) -> str:
    return str(_live_message(message_id).room_id)


def edit_message(message_id: int, user_id: str, content: str) -> dict[str, Any]:
    """The author, still a member and not muted there, edits their message."""
    message, member = _visible_message(message_id, user_id)
    if message.sender_id != user_id:
        raise errors.Forbidden("Only the author edits a message")
    _member_or_not_in_room(message_id, member)
    _require_unmuted(message.room_id, user_id)
    message.content = content
    message.edited_at = utcnow()
    message.save(only=[Message.content, Message.edited_at])
    return message_dict(message, _reactions_of(message.id))


def delete_message(message_id: int, user_id: str, is_staff: bool) -> dict[str, Any]:
    """Soft delete by the author, staff, or the room's owner/moderators.

    A mute does not stop it: removing one's own words is not speaking.
    """
    message, member = _visible_message(message_id, user_id, staff=is_staff)
    if message.sender_id != user_id and not is_staff:
        if member is None or member.role not in ("owner", "moderator"):
            raise errors.Forbidden("Only the author or a moderator deletes a message")
    message.deleted_at = utcnow()
    message.save(only=[Message.deleted_at])
    return message_dict(message, {})


@dataclass(frozen=True, slots=True)
class ReactRequest:
    """One ``message:react``, as :func:`react_many` takes it."""

    message_id: int
    user_id: str
    emoji: str
    action: str  # "add" or "remove"


def react_many(requests: list[ReactRequest]) -> list[dict[str, Any] | errors.GatewayError]:
    """Apply a batch of reactions in one transaction, each with its own outcome.

    Group commit (``server.store.batch.Batcher``, op ``message.react``): reactions
    come in bursts (many members answering one message), so the ones waiting
    while the previous batch is in the database arrive here together. Each is
    checked as a lone reaction always was (the message visible to the user, a
    member of its room, not muted there), with one query per check for the
    whole batch; one that fails gets its own error and costs the others
    nothing. Each outcome carries the message's reactions as they stand after
    that request, in arrival order, as if they had run one by one: the
    batch reads them once and applies its requests to that copy. The rows
    change with one delete per removed reaction and one multi-row insert.
    """
    out: list[dict[str, Any] | errors.GatewayError | None] = [None] * len(requests)
    message_ids = sorted({r.message_id for r in requests})
    user_ids = sorted({r.user_id for r in requests})
    rooms_of = dict(sql_rows(
        f'SELECT "id", "room_id" FROM "message" WHERE "id" IN ({sql_marks(message_ids)})'
        ' AND "deleted_at" IS NULL', message_ids,
    ))  # fmt: skip
    room_ids = sorted(set(rooms_of.values()))
    rooms: dict[str, tuple[Any, ...]] = {}
    members: set[tuple[str, str]] = set()
    mutes: dict[tuple[str, str], Any] = {}
    now = utcnow()
    if room_ids:
        rooms = {row[0]: row[1:] for row in sql_rows(
            'SELECT "id", "type", "password_hash" IS NOT NULL, "deleted_at" IS NULL FROM "room"'
            f' WHERE "id" IN ({sql_marks(room_ids)})', room_ids,
        )}  # fmt: skip
        members = set(_memberships(room_ids, user_ids))
        mutes = _mutes_in_force(room_ids, user_ids, now)
    # The reactions of the messages in play, in the order _reactions_of lists them:
    # message -> {(emoji, user): None} (a dict keeps that order).
    present: dict[int, dict[tuple[str, str], None]] = defaultdict(dict)
    live = sorted(rooms_of)
    if live:
        for message_id, user_id, emoji in sql_rows(
            'SELECT "message_id", "user_id", "emoji" FROM "reaction"'
            f' WHERE "message_id" IN ({sql_marks(live)}) ORDER BY "created_at", "id"', live,
        ):  # fmt: skip
            present[message_id][(emoji, user_id)] = None
    added: set[tuple[int, str, str]] = set()
    removed: set[tuple[int, str, str]] = set()
    for i, r in enumerate(requests):
        room_id = rooms_of.get(r.message_id)
        room = rooms.get(room_id) if room_id is not None else None
        member = room_id is not None and (room_id, r.user_id) in members
        # _visible_message's rules: "not yours to see" answers like "missing".
        if room is None or not room[2] or (not member and (room[0] == "private" or room[1])):
            out[i] = _message_not_found(r.message_id)
            continue
        assert room_id is not None
        if not member:
            out[i] = errors.NotInRoom(
                "Join the message's room first", {"messageId": str(r.message_id)}
            )
            continue
        if (until := mutes.get((room_id, r.user_id))) is not None:
            out[i] = errors.Muted(details={"roomId": room_id, "until": iso(_py_time(until))})
            continue
        now_present, key, row = present[r.message_id], (r.emoji, r.user_id), (
            r.message_id, r.user_id, r.emoji)  # fmt: skip
        if r.action == "add":
            if key not in now_present:
                now_present[key] = None
                added.add(row)
        elif key in now_present:
            del now_present[key]
            removed.add(row)
        reactions: dict[str, list[str]] = defaultdict(list)
        for emoji, user_id in now_present:
            reactions[emoji].append(user_id)
        out[i] = {"messageId": str(r.message_id), "roomId": room_id, "reactions": dict(reactions)}
    _store_reactions(present, added, removed, now)
    results = [outcome for outcome in out if outcome is not None]
    assert len(results) == len(requests)
    return results


def _store_reactions(
    present: dict[int, dict[tuple[str, str], None]],
    added: set[tuple[int, str, str]],
    removed: set[tuple[int, str, str]],
    now: dt.datetime,
) -> None:
    """Make the reaction rows what ``present`` holds after a batch.

    Every reaction the batch removed goes, then every one it added that is
    still there goes in with one statement, in ``present``'s order (one that
    was removed and added back goes in anew, after the older ones, where
    ``present`` lists it).
    """
    for message_id, user_id, emoji in sorted(removed):
        Reaction.delete().where(
            (Reaction.message == message_id) & (Reaction.user_id == user_id)
            & (Reaction.emoji == emoji)
        ).execute()  # fmt: skip
    rows = [
        {"message": message_id, "user_id": user_id, "emoji": emoji, "created_at": now}
        for message_id, keys in sorted(present.items())
        for emoji, user_id in keys
        if (message_id, user_id, emoji) in added
    ]
    if rows:
        Reaction.insert_many(rows).on_conflict_ignore().execute()
