"""Bans, mutes, the audit log and the figures the admin namespace reports.

Like ``models/chat.py``: every function runs in one transaction in a
database worker thread and returns plain dicts in the wire shape.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import peewee as pw

from models import AuditLog, Ban, Message, Room, RoomMember, RoomMute, User, active_ban, utcnow
from server.core import errors
from server.core.protocol import iso


def audit(
    actor_id: str, action: str, target: str, reason: str = "", details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Append one row to the audit log."""
    row = AuditLog.create(
        actor_id=actor_id, action=action, target=target[:200], reason=reason[:500],
        details=details or {}, created_at=utcnow(),
    )  # fmt: skip
    return audit_dict(row)


def audit_dict(row: AuditLog) -> dict[str, Any]:
    return {
        "id": row.id,
        "actorId": row.actor_id,
        "action": row.action,
        "target": row.target,
        "reason": row.reason,
        "details": row.details,
        "createdAt": iso(row.created_at),
    }


def recent_audit(
    limit: int = 50, action: str | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """Audit rows, newest first, optionally of one ``action``."""
    query = AuditLog.select()
    if action is not None:
        query = query.where(AuditLog.action == action)
    rows = query.order_by(AuditLog.id.desc()).limit(limit).offset(offset)
    return [audit_dict(r) for r in rows]


def audit_page(limit: int, offset: int, action: str | None = None) -> dict[str, Any]:
    """``{entries, total}`` for ``admin:audit``: a page of :func:`recent_audit` and the count."""
    query = AuditLog.select()
    if action is not None:
        query = query.where(AuditLog.action == action)
    return {"entries": recent_audit(limit, action, offset), "total": query.count()}


def user_roles(user_id: str) -> frozenset[str] | None:
    """The roles of the user's last token as stored at connect; None for an unknown user."""
    user = User.get_or_none(User.id == user_id)
    if user is None:
        return None
    return frozenset(r for r in (user.roles or "").split(",") if r)


def ban_dict(ban: Ban) -> dict[str, Any]:
    return {
        "userId": ban.user_id,
        "reason": ban.reason,
        "bannedBy": ban.banned_by,
        "createdAt": iso(ban.created_at),
        "expiresAt": iso(ban.expires_at),
    }


def ban_user(user_id: str, actor_id: str, reason: str, duration_secs: int | None) -> dict[str, Any]:
    """Ban (or re-ban, replacing the previous terms) and audit it."""
    now = utcnow()
    expires = now + dt.timedelta(seconds=duration_secs) if duration_secs else None
    (
        Ban.insert(
            user_id=user_id, reason=reason, banned_by=actor_id, created_at=now, expires_at=expires
        )
        .on_conflict(
            conflict_target=[Ban.user_id],
            update={Ban.reason: reason, Ban.banned_by: actor_id, Ban.created_at: now,
                    Ban.expires_at: expires},
        )
        .execute()
    )  # fmt: skip
    ban = ban_dict(Ban.get(Ban.user_id == user_id))
    audit(actor_id, "ban", f"user:{user_id}", reason, {"durationSeconds": duration_secs})
    return ban


def ban_in_force(user_id: str) -> dict[str, Any] | None:
    """``{reason, expiresAt}`` of the user's ban in force now, else None.

    What every surface refuses a banned user with (``BANNED`` details): the
    socket admission and every REST request (``JSONHandler.bearer_identity``).
    An expired ban does not count.
    """
    ban = active_ban(user_id)
    return None if ban is None else _ban_details(ban)


def bans_in_force(user_ids: list[str]) -> dict[str, dict[str, Any]]:
    """:func:`ban_in_force` of many users with one query: ``{userId: details}`` of the banned."""
    now = utcnow()
    query = Ban.select().where(
        Ban.user_id.in_(user_ids) & (Ban.expires_at.is_null() | (Ban.expires_at > now))
    )
    return {ban.user_id: _ban_details(ban) for ban in query}


def _ban_details(ban: Ban) -> dict[str, Any]:
    return {"reason": ban.reason, "expiresAt": iso(ban.expires_at)}


def unban_user(user_id: str, actor_id: str) -> bool:
    """Lift the user's ban; False if none was in force. Audited either way."""
    in_force = active_ban(user_id) is not None
    Ban.delete().where(Ban.user_id == user_id).execute()
    audit(actor_id, "unban", f"user:{user_id}", "", {"wasBanned": in_force})
    return in_force


def mute_user(
    room_id: str, user_id: str, actor_id: str, duration_secs: int, reason: str
) -> dict[str, Any]:
    """Mute a user in a live room until now + ``duration_secs``; audited.

    Member or not: the mute is its own row (:class:`models.RoomMute`), so a
    non-member is muted from the moment they join and leaving does not lift
    it. A mute replaces that user's earlier mute in the room, whatever is left
    of it.
    """
    room = Room.get_or_none((Room.id == room_id) & Room.deleted_at.is_null())
    if room is None:
        raise errors.RoomNotFound(details={"roomId": room_id})
    now = utcnow()
    until = now + dt.timedelta(seconds=duration_secs)
    (
        RoomMute.insert(
            room=room_id, user_id=user_id, until=until, muted_by=actor_id, reason=reason,
            created_at=now,
        )
        .on_conflict(
            conflict_target=[RoomMute.room, RoomMute.user_id],
            update={RoomMute.until: until, RoomMute.muted_by: actor_id,
                    RoomMute.reason: reason, RoomMute.created_at: now},
        )
        .execute()
    )  # fmt: skip
    audit(actor_id, "mute", f"user:{user_id}", reason,
          {"roomId": room_id, "durationSeconds": duration_secs})  # fmt: skip
    return {"roomId": room_id, "userId": user_id, "mutedUntil": iso(until)}


def mute_in_force(room_id: str, user_id: str) -> dt.datetime | None:
    """When the user's mute in the room ends, if one is in force now.

    One lookup on the unique (room, user) index; callers run it in the
    transaction of the action it guards.
    """
    until: dt.datetime | None = (
        RoomMute.select(RoomMute.until)
        .where(
            (RoomMute.room == room_id) & (RoomMute.user_id == user_id)
            & (RoomMute.until > utcnow())
        )
        .scalar()
    )  # fmt: skip
    return until


def totals() -> dict[str, int]:
    """Database-wide counts for ``admin:stats``."""
    now = utcnow()
    return {
        "users": User.select().count(),
        "rooms": Room.select().where(Room.deleted_at.is_null()).count(),
        "messages": Message.select().where(Message.deleted_at.is_null()).count(),
        "activeBans": Ban.select().where(Ban.expires_at.is_null() | (Ban.expires_at > now)).count(),
    }


def room_rows(limit: int, offset: int) -> dict[str, Any]:
    """Live rooms by recent activity, with what the database knows of each."""
    where = Room.deleted_at.is_null()
    total = Room.select().where(where).count()
    rooms = list(
        Room.select().where(where).order_by(Room.last_activity_at.desc(), Room.id)
        .limit(limit).offset(offset)
    )  # fmt: skip
    counts: dict[str, int] = {}
    if rooms:
        query = (
            RoomMember.select(RoomMember.room, pw.fn.COUNT(RoomMember.id).alias("n"))
            .where(RoomMember.room.in_([r.id for r in rooms]))
            .group_by(RoomMember.room)
        )
        counts = {row.room_id: row.n for row in query}
    return {
        "rooms": [
            {
                "roomId": r.id,
                "name": r.name,
                "type": r.type,
                "members": counts.get(r.id, 0),
                "totalMessages": r.last_seq,
                "lastActivity": iso(r.last_activity_at),
            }
            for r in rooms
        ],
        "total": total,
    }
