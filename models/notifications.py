"""Notifications: the queries the notification service and its handlers need.

Like ``models/chat.py``, every function runs inside one transaction in a
database worker thread (:meth:`server.db.Database.run`) and returns plain
dicts in the wire shape. Functions that change what a user sees return a
:class:`Change` so the caller can push exactly what changed, plus the new
unread count, without a second query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from models import Notification, Room, RoomMember, User, utcnow
from server import errors
from server.protocol import iso

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


def room_audience(room_id: str) -> RoomAudience | None:
    room = Room.get_or_none((Room.id == room_id) & Room.deleted_at.is_null())
    if room is None:
        return None
    query = (
        RoomMember.select(RoomMember.user_id, User.username)
        .join(User, pw.JOIN.LEFT_OUTER, on=(RoomMember.user_id == User.id))
        .where(RoomMember.room == room_id)
    )
    members = {}
    for m in query:
        user = getattr(m, "user", None)
        members[m.user_id] = user.username if user is not None else m.user_id
    return RoomAudience(room.name, members)


def missed_group(room_id: str) -> str:
    return f"{MISSED_GROUP_PREFIX}{room_id}"


def bump_missed(
    user_ids: list[str], room_id: str, room_name: str, first_seq: int, last_seq: int, cap: int
) -> list[Change]:
    """Fold messages ``first_seq..last_seq`` into each user's missed-messages notice of the room.

    An unread one is updated in place (same id); a read one is replaced by a
    fresh unread one; otherwise one is created. The count is derived from
    seqs (``lastSeq - firstUnreadSeq + 1``), so replaying a bump, or bumps
    arriving out of order, never over-counts.
    """
    key = missed_group(room_id)
    changes = []
    for user_id in dict.fromkeys(user_ids):
        existing = (
            Notification.select()
            .where((Notification.user_id == user_id) & (Notification.group_key == key))
            .order_by(Notification.id.desc())
            .first()
        )
        change = Change(user_id)
        if existing is not None and not existing.read:
            data = dict(existing.data or {})
            first = min(int(data.get("firstUnreadSeq", first_seq)), first_seq)
            last = max(int(data.get("lastSeq", last_seq)), last_seq)
            data.update(roomId=room_id, firstUnreadSeq=first, lastSeq=last, count=last - first + 1)
            existing.data = data
            existing.title, existing.message = _missed_text(room_name, data["count"])
            existing.save(only=[Notification.data, Notification.title, Notification.message])
            change.updated = [notification_dict(existing)]
        else:
            if existing is not None:
                Notification.delete().where(Notification.id == existing.id).execute()
                change.deleted.append(str(existing.id))
            count = last_seq - first_seq + 1
            title, message = _missed_text(room_name, count)
            data = {
                "roomId": room_id, "firstUnreadSeq": first_seq, "lastSeq": last_seq,
                "count": count,
            }  # fmt: skip
            n = Notification.create(
                user_id=user_id, type="info", category="chat", title=title, message=message,
                data=data,
                priority="normal", group_key=key, created_at=utcnow(),
            )  # fmt: skip
            change.created = [notification_dict(n)]
            change.deleted.extend(_evict(user_id, cap))
        change.unread = unread_count(user_id)
        changes.append(change)
    return changes


def _missed_text(room_name: str, count: int) -> tuple[str, str]:
    noun = "message" if count == 1 else "messages"
    title = f"{count} new {noun} in #{room_name}"[:TITLE_MAX_CHARS]
    return title, f"You have {count} unread {noun} in #{room_name}."


def clear_missed(user_id: str, room_id: str) -> Change:
    """Delete the user's missed-messages notification of the room (they have seen it)."""
    rows = Notification.select(Notification.id).where(
        (Notification.user_id == user_id) & (Notification.group_key == missed_group(room_id))
    )
    ids = [n.id for n in rows]
    change = Change(user_id)
    if ids:
        Notification.delete().where(Notification.id.in_(ids)).execute()
        change.deleted = [str(i) for i in ids]
        change.unread = unread_count(user_id)
    return change


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
