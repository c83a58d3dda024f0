"""Notifications: the queries the notification service and its handlers need.

Like ``models/chat.py``, every function runs inside one transaction in a
database worker thread (:meth:`server.store.db.Database.run`) and returns plain
dicts in the wire shape. Functions that change what a user sees return a
:class:`Change` so the caller can push exactly what changed, plus the new
unread count, without a second query.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import orjson
import peewee as pw

from models import Notification, Room, User, sql_marks, sql_rows, utcnow
from server.core import errors
from server.core.protocol import iso

TYPES = ("info", "success", "warning", "error", "action_required")
CATEGORIES = (
    "chat", "mention", "moderation", "security", "system", "event", "user", "resource",
    "reservation", "limit", "error",
)  # fmt: skip
PRIORITIES = ("low", "normal", "high")

#: Where the coalesced missed-messages notification of a room is keyed.
MISSED_GROUP_PREFIX = "missed:"
# Shown text is capped; the stored title column is 200 characters.
TITLE_MAX_CHARS = 200
MENTION_EXCERPT_CHARS = 200
#: Most values one IN list, and most rows one multi-row INSERT, carries: a
#: round's users are unbounded, SQLite's bound parameters are not (32,766).
CHUNK = 500

T = TypeVar("T")


def notification_dict(n: Notification) -> dict[str, Any]:
    return {
        "id": str(n.id),
        "type": n.type,
        "category": n.category,
        "title": n.title,
        "message": n.message,
        "data": n.data or {},
        "actionUrl": n.action_url,
        "priority": n.priority,
        "read": bool(n.read),
        "createdAt": iso(n.created_at),
    }


@dataclass
class Change:
    """What one operation did to one user's notifications."""

    user_id: str
    created: list[dict[str, Any]] = field(default_factory=list)
    updated: list[dict[str, Any]] = field(default_factory=list)
    read: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    #: Marked read by "read all" (pushed as one event, even when nothing was unread).
    read_all: bool = False
    unread: int = 0


def unread_count(user_id: str) -> int:
    query = Notification.select().where(
        (Notification.user_id == user_id) & (Notification.read == False)  # noqa: E712
    )
    return int(query.count())


def _get(user_id: str, notification_id: int) -> Notification:
    n = Notification.get_or_none(
        (Notification.id == notification_id) & (Notification.user_id == user_id)
    )
    if n is None:
        # Someone else's notification is "not found" too: ids are not secrets,
        # but existence of another user's row should not be observable.
        raise errors.NotificationNotFound(details={"notificationId": str(notification_id)})
    return n


def _evict(user_id: str, cap: int) -> list[str]:
    """Trim the user's notifications to ``cap``: oldest read ones first, then oldest."""
    total = Notification.select().where(Notification.user_id == user_id).count()
    excess = total - cap
    if excess <= 0:
        return []
    victims = (
        Notification.select(Notification.id)
        .where(Notification.user_id == user_id)
        # read=True sorts first when descending on the boolean; then oldest first.
        .order_by(Notification.read.desc(), Notification.id)
        .limit(excess)
    )
    ids = [n.id for n in victims]
    Notification.delete().where(Notification.id.in_(ids)).execute()
    return [str(i) for i in ids]


def create(
    user_ids: list[str],
    fields_: dict[str, Any],
    cap: int,
    group_key: str | None = None,
) -> list[Change]:
    """One notification per user (in the order given), each user kept within ``cap``."""
    now = utcnow()
    changes = []
    for user_id in dict.fromkeys(user_ids):
        n = Notification.create(user_id=user_id, group_key=group_key, created_at=now, **fields_)
        change = Change(user_id, created=[notification_dict(n)])
        change.deleted = _evict(user_id, cap)
        change.unread = unread_count(user_id)
        changes.append(change)
    return changes


def page(user_id: str, unread_only: bool, limit: int, before: int | None) -> dict[str, Any]:
    """Newest first; ``before`` is a notification id cursor (exclusive)."""
    query = Notification.select().where(Notification.user_id == user_id)
    if unread_only:
        query = query.where(Notification.read == False)  # noqa: E712
    if before is not None:
        query = query.where(Notification.id < before)
    rows = list(query.order_by(Notification.id.desc()).limit(limit + 1))
    return {
        "notifications": [notification_dict(n) for n in rows[:limit]],
        "hasMore": len(rows) > limit,
    }


def initial_state(user_id: str, limit: int) -> dict[str, Any]:
    """What a fresh notifications connection is sent: unread count and newest ``limit``."""
    recent = page(user_id, False, limit, None)
    return {"count": unread_count(user_id), "notifications": recent["notifications"]}


def initial_states(user_ids: list[str], limit: int) -> list[dict[str, Any]]:
    """:func:`initial_state` of every user of a batch, in request order, in two queries.

    The newest ``limit`` per user come from one window query (ROW_NUMBER per
    user, newest id first: the order :func:`page` uses; SQLite >= 3.25 and
    PostgreSQL), the unread counts from one GROUP BY. A user asked for twice
    gets the same answer twice.
    """
    ids = list(dict.fromkeys(user_ids))
    recent: dict[str, list[dict[str, Any]]] = {u: [] for u in ids}
    rank = pw.fn.ROW_NUMBER().over(
        partition_by=[Notification.user_id], order_by=[Notification.id.desc()]
    )
    ranked = (
        Notification.select(Notification.id.alias("nid"), rank.alias("rank"))
        .where(Notification.user_id.in_(ids))
        .alias("ranked")
    )
    query = (
        Notification.select(Notification.user_id, *_WIRE_COLUMNS)
        .join(ranked, on=(Notification.id == ranked.c.nid))
        .where(ranked.c.rank <= limit)
        .order_by(Notification.id.desc())
    )
    if len(ids) == 1:  # an idle node's batch: a plain LIMIT is cheaper than the window
        query = (
            Notification.select(Notification.user_id, *_WIRE_COLUMNS)
            .where(Notification.user_id == ids[0])
            .order_by(Notification.id.desc())
            .limit(limit)
        )
    # Tuples, not models (the stubs do not know ``.tuples()`` changes the rows).
    for row in cast("Iterable[tuple[Any, ...]]", query.tuples()):
        recent[row[0]].append(_wire(row[1:]))
    counts = unread_counts(ids)
    states = {u: {"count": counts[u], "notifications": recent[u]} for u in ids}
    return [states[u] for u in user_ids]


#: The columns :func:`_wire` reads, in its order.
_WIRE_COLUMNS = (
    Notification.id, Notification.type, Notification.category, Notification.title,
    Notification.message, Notification.data, Notification.action_url, Notification.priority,
    Notification.read, Notification.created_at,
)  # fmt: skip


def _wire(columns: tuple[Any, ...]) -> dict[str, Any]:
    """:func:`notification_dict` of a row of :data:`_WIRE_COLUMNS`.

    From plain tuples: building a model instance per row was most of a
    batch's cost (20 rows per connection).
    """
    nid, type_, category, title, message, data, action_url, priority, read, created_at = columns
    return {
        "id": str(nid), "type": type_, "category": category, "title": title,
        "message": message, "data": data or {}, "actionUrl": action_url, "priority": priority,
        "read": bool(read), "createdAt": iso(created_at),
    }  # fmt: skip


def unread_counts(user_ids: list[str]) -> dict[str, int]:
    """Every given user's unread count (0 included), in one GROUP BY."""
    counts = dict.fromkeys(user_ids, 0)
    for chunk in _chunks(list(counts)):
        query = (
            Notification.select(Notification.user_id, pw.fn.COUNT(Notification.id).alias("n"))
            .where(Notification.user_id.in_(chunk) & (Notification.read == False))  # noqa: E712
            .group_by(Notification.user_id)
        )
        for row in query:
            counts[row.user_id] = int(row.n)
    return counts


def mark_read(user_id: str, notification_id: int) -> Change:
    n = _get(user_id, notification_id)
    change = Change(user_id)
    if not n.read:
        Notification.update(read=True).where(Notification.id == n.id).execute()
        change.read = [str(n.id)]
    change.unread = unread_count(user_id)
    return change


def mark_all_read(user_id: str) -> Change:
    unread = Notification.select(Notification.id).where(
        (Notification.user_id == user_id) & (Notification.read == False)  # noqa: E712
    )
    ids = [n.id for n in unread]
    if ids:
        Notification.update(read=True).where(Notification.id.in_(ids)).execute()
    return Change(user_id, read=[str(i) for i in ids], read_all=True, unread=0)


def delete(user_id: str, notification_id: int) -> Change:
    n = _get(user_id, notification_id)
    Notification.delete().where(Notification.id == n.id).execute()
    return Change(user_id, deleted=[str(n.id)], unread=unread_count(user_id))


# -- sources -----------------------------------------------------------------


@dataclass(frozen=True)
class RoomAudience:
    """A room's name and members (id → username), for mentions and missed messages."""

    name: str
    members: dict[str, str]


def room_audiences(room_ids: list[str]) -> dict[str, RoomAudience]:
    """Name and members of each of ``room_ids`` not deleted, in one statement.

    Plain SQL, tuples: peewee building such queries took ~1 ms, ten times
    what SQLite took to run them, and a round runs after every send batch on
    the database worker the next batch needs (send->ack latency). One
    statement (the rooms joined with their members) reads one snapshot by
    itself, so the round runs it outside a transaction (``Database.run_bare``):
    no BEGIN and COMMIT around it either.
    """
    audiences: dict[str, RoomAudience] = {}
    for room_id, name, member_id, username in sql_rows(
        'SELECT r."id", r."name", m."user_id", u."username" FROM "room" r'
        ' LEFT JOIN "room_member" m ON m."room_id" = r."id"'
        ' LEFT JOIN "user" u ON u."id" = m."user_id"'
        f' WHERE r."id" IN ({sql_marks(room_ids)}) AND r."deleted_at" IS NULL'
        ' ORDER BY r."id", m."id"', room_ids,
    ):  # fmt: skip
        audience = audiences.get(room_id)
        if audience is None:
            audience = audiences[room_id] = RoomAudience(name, {})
        if member_id is not None:
            audience.members[member_id] = username if username is not None else member_id
    return audiences


def missed_group(room_id: str) -> str:
    return f"{MISSED_GROUP_PREFIX}{room_id}"


@dataclass(frozen=True)
class MissedBump:
    """Fold seqs ``first_seq..last_seq`` into the user's missed-messages notice of a room."""

    user_id: str
    first_seq: int
    last_seq: int


@dataclass
class RoomNotices:
    """One room's share of a round of chat notifications (see :func:`chat_notices`)."""

    room_id: str
    room_name: str
    missed: list[MissedBump] = field(default_factory=list)
    #: One entry per message that mentions someone, in seq order: the users it
    #: mentions and the notification's fields (as ``create`` takes them).
    mentions: list[tuple[list[str], dict[str, Any]]] = field(default_factory=list)


def chat_notices(rooms: list[RoomNotices], cap: int) -> list[Change]:
    """A round of missed-message bumps and mentions for many rooms; one Change per user.

    The statements do not grow with the number of rooms, users or messages
    (but for IN lists cut at :data:`CHUNK` values, and the rare user over the
    cap): one deleted-room check, one lookup of the notices to fold, one
    UPDATE per distinct new text (a room's members usually share one), one
    DELETE of replaced notices, one multi-row INSERT of the new ones, one
    count for the cap and one GROUP BY of unread counts. A room deleted since
    its audience was read is skipped (room deletion clears the notices; none
    may come back).

    Missed messages: an unread notice is updated in place (same id); a read
    one is replaced by a fresh unread one; otherwise one is created. The
    count is derived from seqs (``lastSeq - firstUnreadSeq + 1``), so
    replaying a bump, or bumps arriving out of order, never over-counts.
    Each user is then kept within ``cap`` as :func:`create` does.
    """
    live = {
        r.id
        for r in Room.select(Room.id).where(
            Room.id.in_([room.room_id for room in rooms]) & Room.deleted_at.is_null()
        )
    }
    rooms = [room for room in rooms if room.room_id in live]
    changes: dict[str, Change] = {}
    rows: list[dict[str, Any]] = []
    now = utcnow()
    _fold_missed([room for room in rooms if room.missed], now, changes, rows)
    for room in rooms:
        for user_ids, fields_ in room.mentions:
            for user_id in dict.fromkeys(user_ids):
                rows.append(_row(user_id, fields_, None, now))
    inserted: list[Notification] = []
    for chunk in _chunks(rows):
        inserted.extend(Notification.insert_many(chunk).returning(Notification).execute())
    # RETURNING's row order is unspecified: ids give the order of creation.
    for n in sorted(inserted, key=lambda n: n.id):
        _change(changes, n.user_id).created.append(notification_dict(n))
    _evict_many([c for c in changes.values() if c.created], cap)
    counts = unread_counts(list(changes))
    for change in changes.values():
        change.unread = counts[change.user_id]
    return list(changes.values())


def _chunks(items: list[T], size: int = CHUNK) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _change(changes: dict[str, Change], user_id: str) -> Change:
    change = changes.get(user_id)
    if change is None:
        change = changes[user_id] = Change(user_id)
    return change


def _row(user_id: str, fields_: dict[str, Any], key: str | None, now: Any) -> dict[str, Any]:
    """A row for ``insert_many``: every column named, so all rows have the same keys."""
    return {
        "user_id": user_id, "type": fields_["type"], "category": fields_["category"],
        "title": fields_["title"], "message": fields_["message"], "data": fields_["data"],
        "action_url": fields_.get("action_url"), "priority": fields_["priority"], "read": False,
        "group_key": key, "created_at": now,
    }  # fmt: skip


def _fold_missed(
    rooms: list[RoomNotices], now: Any, changes: dict[str, Change], rows: list[dict[str, Any]]
) -> None:
    """Update or replace the missed notices the rooms' bumps fold into; queue the new ones."""
    if not rooms:
        return
    keys = {missed_group(room.room_id): room for room in rooms}
    users = list({b.user_id for room in rooms for b in room.missed})
    newest: dict[tuple[str, str], Notification] = {}
    for some_users in _chunks(users):
        query = (
            Notification.select()
            .where(Notification.group_key.in_(list(keys)) & Notification.user_id.in_(some_users))
            .order_by(Notification.id)
        )
        for n in query:
            newest[(str(n.group_key), n.user_id)] = n  # ascending ids: the newest wins
    # Notices by their new text (a room's members usually share one: they
    # started missing it at the same message).
    updates: dict[bytes, tuple[dict[str, Any], str, str, list[int]]] = {}
    replaced: list[int] = []
    for key, room in keys.items():
        for bump in room.missed:
            existing = newest.get((key, bump.user_id))
            change = _change(changes, bump.user_id)
            if existing is not None and not existing.read:
                data = dict(existing.data or {})
                first = min(int(data.get("firstUnreadSeq", bump.first_seq)), bump.first_seq)
                last = max(int(data.get("lastSeq", bump.last_seq)), bump.last_seq)
                data.update(roomId=room.room_id, firstUnreadSeq=first, lastSeq=last,
                            count=last - first + 1)  # fmt: skip
                existing.data = data
                existing.title, existing.message = _missed_text(room.room_name, data["count"])
                text = orjson.dumps([data, existing.title, existing.message])
                ids = updates.setdefault(text, (data, existing.title, existing.message, []))[3]
                ids.append(existing.id)
                change.updated.append(notification_dict(existing))
                continue
            if existing is not None:
                replaced.append(existing.id)
                change.deleted.append(str(existing.id))
            count = bump.last_seq - bump.first_seq + 1
            title, message = _missed_text(room.room_name, count)
            data = {
                "roomId": room.room_id, "firstUnreadSeq": bump.first_seq,
                "lastSeq": bump.last_seq, "count": count,
            }  # fmt: skip
            fields_ = {"type": "info", "category": "chat", "title": title, "message": message,
                       "data": data, "priority": "normal"}  # fmt: skip
            rows.append(_row(bump.user_id, fields_, key, now))
    _update_texts(list(updates.values()))
    for some_ids in _chunks(replaced):
        Notification.delete().where(Notification.id.in_(some_ids)).execute()


def _update_texts(updates: list[tuple[dict[str, Any], str, str, list[int]]]) -> None:
    """Give each group of notices ``(data, title, message, ids)`` its text, in one UPDATE.

    One statement for the lot (CASE on the id groups; one per :data:`CHUNK`
    ids): a round's rooms each have their own text, and a statement per room
    was most of a round's cost.
    """
    pairs = [(n, group) for group, (*_, ids) in enumerate(updates) for n in ids]
    for chunk in _chunks(pairs):
        groups: dict[int, list[int]] = {}
        for n, group in chunk:
            groups.setdefault(group, []).append(n)
        data = [orjson.dumps(updates[g][0]).decode() for g in groups]  # the column's text
        titles = [updates[g][1] for g in groups]
        messages = [updates[g][2] for g in groups]
        id_groups = list(groups.values())
        Notification.update(
            data=_case(id_groups, data), title=_case(id_groups, titles),
            message=_case(id_groups, messages),
        ).where(Notification.id.in_([n for n, _ in chunk])).execute()  # fmt: skip


def _case(id_groups: list[list[int]], values: list[str]) -> pw.Case:
    """``CASE WHEN id IN (group 1) THEN value 1 ... END``."""
    return pw.Case(None, [(Notification.id.in_(ids), pw.Value(v, unpack=False))
                          for ids, v in zip(id_groups, values, strict=True)])  # fmt: skip


def _evict_many(changes: list[Change], cap: int) -> None:
    """:func:`_evict` for every user of ``changes`` (one count for all; victims per user over).

    A notification created and evicted in the same round is neither
    reported created nor deleted: the user never saw it.
    """
    if not changes:
        return
    totals: dict[str, int] = {}
    for chunk in _chunks([c.user_id for c in changes]):
        query = (
            Notification.select(Notification.user_id, pw.fn.COUNT(Notification.id).alias("n"))
            .where(Notification.user_id.in_(chunk))
            .group_by(Notification.user_id)
        )
        totals.update({row.user_id: int(row.n) for row in query})
    victims: list[int] = []
    for change in changes:
        excess = int(totals.get(change.user_id, 0)) - cap
        if excess <= 0:
            continue
        ids = [
            n.id
            for n in Notification.select(Notification.id)
            .where(Notification.user_id == change.user_id)
            .order_by(Notification.read.desc(), Notification.id)
            .limit(excess)
        ]
        victims.extend(ids)
        gone = {str(i) for i in ids}
        fresh = {n["id"] for n in change.created}
        change.created = [n for n in change.created if n["id"] not in gone]
        change.updated = [n for n in change.updated if n["id"] not in gone]
        change.deleted.extend(i for i in map(str, ids) if i not in fresh)
    for some_ids in _chunks(victims):
        Notification.delete().where(Notification.id.in_(some_ids)).execute()


def _missed_text(room_name: str, count: int) -> tuple[str, str]:
    noun = "message" if count == 1 else "messages"
    title = f"{count} new {noun} in #{room_name}"[:TITLE_MAX_CHARS]
    return title, f"You have {count} unread {noun} in #{room_name}."


def clear_missed_many(requests: list[tuple[str, str]]) -> list[Change]:
    """Delete each user's missed-messages notification of the room (they have seen it).

    For a batch of ``(user_id, room_id)``, one Change each in request order:
    one lookup, one DELETE and one count of unread for the batch. A pair
    asked twice is cleared by the first; the second finds nothing, as it
    would one after the other.
    """
    keys = {(user_id, missed_group(room_id)) for user_id, room_id in requests}
    users = list({user_id for user_id, _ in keys})
    groups = list({key for _, key in keys})
    found: dict[tuple[str, str], list[int]] = {}
    for some_users in _chunks(users):
        rows = (
            Notification.select(Notification.id, Notification.user_id, Notification.group_key)
            .where(Notification.user_id.in_(some_users) & Notification.group_key.in_(groups))
            .order_by(Notification.id)
        )
        for n in rows:
            found.setdefault((n.user_id, str(n.group_key)), []).append(n.id)
    changes = []
    for user_id, room_id in requests:
        ids = found.pop((user_id, missed_group(room_id)), [])
        changes.append(Change(user_id, deleted=[str(i) for i in ids]))
    gone = [int(i) for change in changes for i in change.deleted]
    for some_ids in _chunks(gone):
        Notification.delete().where(Notification.id.in_(some_ids)).execute()
    counts = unread_counts([change.user_id for change in changes if change.deleted])
    for change in changes:
        if change.deleted:
            change.unread = counts[change.user_id]
    return changes


def clear_missed_room(room_id: str) -> list[Change]:
    """Delete every user's missed-messages notification of the room (it was deleted)."""
    rows = Notification.select(Notification.id, Notification.user_id).where(
        Notification.group_key == missed_group(room_id)
    )
    by_user: dict[str, list[str]] = {}
    for n in rows:
        by_user.setdefault(n.user_id, []).append(str(n.id))
    if not by_user:
        return []
    Notification.delete().where(Notification.group_key == missed_group(room_id)).execute()
    return [Change(u, deleted=ids, unread=unread_count(u)) for u, ids in by_user.items()]


def admin_ids() -> list[str]:
    """Users whose stored roles (comma separated, from their last token) include admin."""
    rows = User.select(User.id, User.roles).where(User.roles.contains("admin"))
    return [u.id for u in rows if "admin" in u.roles.split(",")]
