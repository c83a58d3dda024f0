"""Notifications: persisted per user, pushed live to the user's connections.

Other parts of the gateway (chat mentions and missed messages, moderation,
security alerts, the server API) call :class:`Notifier`; it stores the
notification (enforcing the per-user cap, oldest read ones evicted first)
and pushes ``notification:created`` and ``notification:unread_count`` to
every live connection of the user.

Example::

    await notifier.notify(
        ["bob"], type="warning", category="moderation",
        title="Message removed", message="Your message was removed: spam",
        data={"roomId": "general", "messageId": "42"},
    )
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from models import notifications as store
from server import errors
from server.db import Database
from server.hub import Hub, Target
from server.limits import ConnectionLimiter
from server.metrics import Metrics

#: The namespace live notification events go to.
NAMESPACE = "notifications"


class Notifier(Protocol):
    """What callers need from the notification service."""

    async def notify(
        self,
        user_ids: Iterable[str],
        *,
        type: str = "info",
        category: str = "system",
        title: str,
        message: str = "",
        data: dict[str, Any] | None = None,
        action_url: str | None = None,
        priority: str = "normal",
    ) -> list[dict[str, Any]]:
        """Persist one notification per user and push it live; returns them."""

    async def notify_admins(
        self,
        *,
        type: str = "warning",
        category: str = "security",
        title: str,
        message: str = "",
        data: dict[str, Any] | None = None,
        priority: str = "high",
    ) -> list[dict[str, Any]]:
        """The same, to every user whose last token carried the ``admin`` role."""

    async def room_deleted(self, room_id: str, member_ids: list[str], deleted_by: str) -> None:
        """The room is gone: drop its missed-messages notices, tell the other members."""


#: Notifications a fresh ``/ws/notifications`` connection receives.
RECENT_ON_CONNECT = 20
_MENTION_RE = re.compile(r"(?<![\w@])@([A-Za-z0-9_.-]{1,64})")


def mentioned_usernames(content: str) -> set[str]:
    """``@name`` tokens in message text, lower-cased (usernames match case-insensitively)."""
    return {m.group(1).rstrip(".").lower() for m in _MENTION_RE.finditer(content)}


@dataclasses.dataclass
class _RoomWork:
    """Missed-message bookkeeping of one room while tasks for it are in flight."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    #: Tasks holding this record (running or waiting for the lock).
    users: int = 0
    #: Seq range not yet folded into the members' notifications.
    first: int | None = None
    last: int | None = None


class NotificationService:
    """The :class:`Notifier` of one node: stores through ``db``, pushes through ``hub``.

    Live pushes go to the user's ``notifications`` connections on every node
    (the hub mirrors user targets). Every change is followed by
    ``notification:unread_count`` so a client never has to count.

    Example::

        service = NotificationService(db, hub, limiter, max_per_user=100, metrics=metrics)
        await service.notify(["bob"], title="Welcome")

    With ``metrics``, every stored notification counts in
    ``switchboard_notifications_created_total{category}``.
    """

    def __init__(
        self,
        db: Database,
        hub: Hub,
        connections: ConnectionLimiter,
        max_per_user: int,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.hub = hub
        # Who holds a chat connection anywhere: the cluster-wide connection
        # counts with Redis, this node's own otherwise.
        self.connections = connections
        self.max_per_user = max_per_user
        self.metrics = metrics
        # One missed-messages update per room at a time: two concurrent bumps
        # would otherwise both create the room's coalesced notification.
        self._rooms: dict[str, _RoomWork] = {}

    # -- the Notifier interface --------------------------------------------------

    async def notify(
        self,
        user_ids: Iterable[str],
        *,
        type: str = "info",
        category: str = "system",
        title: str,
        message: str = "",
        data: dict[str, Any] | None = None,
        action_url: str | None = None,
        priority: str = "normal",
    ) -> list[dict[str, Any]]:
        """Persist one notification per user and push it live; returns them."""
        fields = _fields(type, category, title, message, data, action_url, priority)
        ids = [u for u in dict.fromkeys(user_ids) if u]
        if not ids:
            return []
        changes = await self.db.run(
            "notification.create", store.create, ids, fields, self.max_per_user
        )
        self._count_created(changes)
        self.push(changes)
        return [n for c in changes for n in c.created]

    async def notify_admins(
        self,
        *,
        type: str = "warning",
        category: str = "security",
        title: str,
        message: str = "",
        data: dict[str, Any] | None = None,
        priority: str = "high",
    ) -> list[dict[str, Any]]:
        """The same, to every user whose last token carried the ``admin`` role."""
        admins = await self.db.run("notification.admins", store.admin_ids)
        return await self.notify(
            admins, type=type, category=category, title=title, message=message,
            data=data, priority=priority,
        )  # fmt: skip

    # -- reads and changes by the user ------------------------------------------

    async def page(
        self, user_id: str, *, unread_only: bool, limit: int, before: int | None
    ) -> dict[str, Any]:
        return await self.db.run(
            "notification.page", store.page, user_id, unread_only, limit, before
        )

    async def initial_state(self, user_id: str) -> dict[str, Any]:
        return await self.db.run(
            "notification.initial", store.initial_state, user_id, RECENT_ON_CONNECT
        )

    async def unread_count(self, user_id: str) -> int:
        return await self.db.run("notification.unread", store.unread_count, user_id)

    async def mark_read(self, user_id: str, notification_id: int) -> store.Change:
        change = await self.db.run("notification.read", store.mark_read, user_id, notification_id)
        self.push([change])
        return change

    async def mark_all_read(self, user_id: str) -> store.Change:
        change = await self.db.run("notification.read_all", store.mark_all_read, user_id)
        self.push([change])
        return change

    async def delete(self, user_id: str, notification_id: int) -> store.Change:
        change = await self.db.run("notification.delete", store.delete, user_id, notification_id)
        self.push([change])
        return change

    # -- chat sources -----------------------------------------------------------

    async def message_sent(self, message: dict[str, Any]) -> None:
        """After ``message:new``: mentions, and missed messages for offline members.

        Runs as a background task; the sender's ack never waits for it. In a
        burst, a task that sees later ones queued behind it for the same room
        leaves its seq to them: the last applies the whole seq range in one
        update, so the database does one bump per burst, not one per message.
        """
        room_id = message["roomId"]
        sender_id = message["senderId"]
        seq = message["seq"]
        audience: store.RoomAudience | None = None
        async with self._room_work(room_id) as work:
            work.first = seq if work.first is None else min(work.first, seq)
            work.last = max(work.last or seq, seq)
            await work.lock.acquire()
            try:
                if work.users == 1:  # nobody queued behind: apply what accumulated
                    first, last = work.first, work.last
                    work.first = work.last = None
                    # Our own seq is in the range: only a task counted in after
                    # us could have applied it, and that one would have queued.
                    assert first is not None and last is not None
                    audience = await self.db.run(
                        "notification.audience", store.room_audience, room_id
                    )
                    if audience is not None:
                        await self._bump_missed(room_id, sender_id, audience, first, last)
            finally:
                work.lock.release()
        names = mentioned_usernames(message["content"])
        if not names:
            return
        if audience is None:
            audience = await self.db.run("notification.audience", store.room_audience, room_id)
            if audience is None:
                return
        mentioned = [
            u for u, n in audience.members.items() if u != sender_id and n.lower() in names
        ]
        if mentioned:
            await self.notify(
                mentioned, type="info", category="mention",
                title=f"{message['senderName']} mentioned you in #{audience.name}"[
                    : store.TITLE_MAX_CHARS],
                message=message["content"][: store.MENTION_EXCERPT_CHARS],
                data={"roomId": room_id, "messageId": message["id"], "seq": seq,
                      "senderId": sender_id, "senderName": message["senderName"]},
            )  # fmt: skip

    async def _bump_missed(
        self, room_id: str, sender_id: str, audience: store.RoomAudience, first: int, last: int
    ) -> None:
        others = [u for u in audience.members if u != sender_id]
        present = await self.connections.connected("chat", others)
        away = [u for u in others if u not in present]
        if away:
            changes = await self.db.run(
                "notification.missed", store.bump_missed,
                away, room_id, audience.name, first, last, self.max_per_user,
            )  # fmt: skip
            self._count_created(changes)
            self.push(changes)

    @contextlib.asynccontextmanager
    async def _room_work(self, room_id: str) -> AsyncIterator[_RoomWork]:
        """The room's work record, counted in while held and dropped when unused."""
        work = self._rooms.setdefault(room_id, _RoomWork())
        work.users += 1
        try:
            yield work
        finally:
            work.users -= 1
            if work.users == 0:
                del self._rooms[room_id]

    async def room_seen(self, user_id: str, room_id: str) -> None:
        """The user read or joined the room: their missed-messages notification goes."""
        change = await self.db.run(
            "notification.clear_missed", store.clear_missed, user_id, room_id
        )
        if change.deleted:
            self.push([change])

    async def room_deleted(self, room_id: str, member_ids: list[str], deleted_by: str) -> None:
        """The room is gone: its missed-messages notices go; its other members are told."""
        async with self._room_work(room_id) as work, work.lock:
            changes = await self.db.run(
                "notification.room_deleted", store.clear_missed_room, room_id
            )
            self.push(changes)
        await self.notify(
            [u for u in member_ids if u != deleted_by], type="warning", category="system",
            title=f"Room #{room_id} was deleted", data={"roomId": room_id, "deletedBy": deleted_by},
        )  # fmt: skip

    # -- delivery ---------------------------------------------------------------

    def _count_created(self, changes: Iterable[store.Change]) -> None:
        if self.metrics is None:
            return
        for change in changes:
            for notification in change.created:
                self.metrics.notifications_created.labels(notification["category"]).inc()

    def push(self, changes: Iterable[store.Change]) -> None:
        """Tell each user's notifications connections what changed, then the unread count."""
        for change in changes:
            target = Target.user(change.user_id, NAMESPACE)
            for notification_id in change.deleted:
                self.hub.publish(
                    target, "notification:deleted", {"notificationId": notification_id}
                )
            for notification in change.created:
                self.hub.publish(target, "notification:created", {"notification": notification})
            for notification in change.updated:
                self.hub.publish(target, "notification:updated", {"notification": notification})
            if change.read_all:
                # One event for the lot, not one per notification.
                data = {"all": True, "notificationIds": change.read}
                self.hub.publish(target, "notification:read", data)
            else:
                for notification_id in change.read:
                    data = {"notificationId": notification_id}
                    self.hub.publish(target, "notification:read", data)
            if change.created or change.updated or change.read or change.read_all or change.deleted:
                self.hub.publish(target, "notification:unread_count", {"count": change.unread})


def _fields(
    type: str,
    category: str,
    title: str,
    message: str,
    data: dict[str, Any] | None,
    action_url: str | None,
    priority: str,
) -> dict[str, Any]:
    """Check a notification's fields against the SPEC's enums; raise VALIDATION_ERROR."""
    problems: dict[str, list[str]] = {}
    if type not in store.TYPES:
        problems["type"] = [f"Must be one of: {', '.join(store.TYPES)}."]
    if category not in store.CATEGORIES:
        problems["category"] = [f"Must be one of: {', '.join(store.CATEGORIES)}."]
    if priority not in store.PRIORITIES:
        problems["priority"] = [f"Must be one of: {', '.join(store.PRIORITIES)}."]
    if not title:
        problems["title"] = ["Must not be empty."]
    if problems:
        raise errors.ValidationFailed(details=problems)
    return {
        "type": type, "category": category, "title": title[: store.TITLE_MAX_CHARS],
        "message": message, "data": data or {}, "action_url": action_url, "priority": priority,
    }  # fmt: skip
