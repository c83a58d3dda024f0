"""Notifications: persisted per user, pushed live to the user's connections.

Other parts of the gateway (chat mentions and missed messages, moderation,
security alerts, the server API) call :class:`NotificationService`; it stores the
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
import dataclasses
import itertools
import logging
import re
from collections.abc import Iterable
from typing import Any

from models import notifications as store
from server.core import errors
from server.core.limits import ConnectionLimiter
from server.core.tasks import BackgroundTasks
from server.ops.metrics import Metrics
from server.realtime.hub import Hub, Target
from server.store.batch import DEFAULT_MAX_BATCH, Batcher
from server.store.db import Database

log = logging.getLogger("switchboard.notifications")

#: The namespace live notification events go to.
NAMESPACE = "notifications"


#: Notifications a fresh ``/ws/notifications`` connection receives.
RECENT_ON_CONNECT = 20
_MENTION_RE = re.compile(r"(?<![\w@])@([A-Za-z0-9_.-]{1,64})")


def mentioned_usernames(content: str) -> set[str]:
    """``@name`` tokens in message text, lower-cased (usernames match case-insensitively)."""
    return {m.group(1).rstrip(".").lower() for m in _MENTION_RE.finditer(content)}


#: Most rooms one round of chat notifications carries; the others wait for
#: the next round. Keeps one round's transaction and its IN lists small.
MAX_ROOMS_PER_ROUND = 256


def _initial_states(user_ids: list[str]) -> list[dict[str, Any]]:
    return store.initial_states(user_ids, RECENT_ON_CONNECT)


@dataclasses.dataclass
class _RoomWork:
    """Messages of one room whose mentions and missed-message bumps are still to do."""

    #: Each sender's first and last seq among them: nobody misses their own messages.
    senders: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    #: The messages that mention someone (``@name`` found), in arrival order.
    mentions: list[tuple[dict[str, Any], set[str]]] = dataclasses.field(default_factory=list)
    #: How many messages this record stands for (the backlog gauge).
    messages: int = 0


class NotificationService:
    """The notifications of one node: stores through ``db``, pushes through ``hub``.

    Live pushes go to the user's ``notifications`` connections on every node
    (the hub mirrors user targets). Every change is followed by
    ``notification:unread_count`` so a client never has to count.

    Example::

        service = NotificationService(db, hub, limiter, max_per_user=100, metrics=metrics)
        await service.notify(["bob"], title="Welcome")

    With ``metrics``, every stored notification counts in
    ``switchboard_notifications_created_total{category}``, the chat messages
    whose notifications are still to do in ``switchboard_notification_backlog``
    and the connections each initial-state read answered in
    ``switchboard_notification_initial_batch_size``. Background rounds run in
    ``tasks`` (the node's, so shutdown waits for them); ``batch_max`` bounds
    the connections one initial-state read answers.
    """

    def __init__(
        self,
        db: Database,
        hub: Hub,
        connections: ConnectionLimiter,
        max_per_user: int,
        *,
        metrics: Metrics | None = None,
        tasks: BackgroundTasks | None = None,
        batch_max: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.db = db
        self.hub = hub
        # Who holds a chat connection anywhere: the cluster-wide connection
        # counts with Redis, this node's own otherwise.
        self.connections = connections
        self.max_per_user = max_per_user
        self.metrics = metrics
        self.tasks = tasks if tasks is not None else BackgroundTasks()
        # Chat messages waiting for their mentions and missed-message bumps,
        # one record per room; one task drains them in rounds.
        self._rooms: dict[str, _RoomWork] = {}
        self._backlog = 0
        self._drainer: asyncio.Task[None] | None = None
        # Held while a round is applied and while a deleted room's notices are
        # cleared: a round in flight cannot bring one back after the clean-up.
        self._round = asyncio.Lock()
        # A fresh notifications connection's first read, shared with the
        # connections arriving alongside (a reconnect storm is one query pair
        # per batch, not per connection).
        self._initial: Batcher[str, dict[str, Any]] = Batcher(
            db, "notification.initial", _initial_states, max_batch=batch_max,
            observe=metrics.notification_initial_batch_size.observe if metrics else None,
        )  # fmt: skip
        self._seen: Batcher[tuple[str, str], store.Change] = Batcher(
            db, "notification.clear_missed", store.clear_missed_many, max_batch=batch_max
        )

    # -- what callers use -------------------------------------------------------

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
        """The unread count and the newest notifications, read with the connections alongside.

        Raises ``SERVICE_UNAVAILABLE`` when the database does not answer.
        """
        return await self._initial.submit(user_id)

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

    @property
    def backlog(self) -> int:
        """Chat messages whose mentions and missed-message bumps are not done yet."""
        return self._backlog

    def message_sent(self, message: dict[str, Any]) -> None:
        """After ``message:new``: queue its mentions and missed-message bump; returns at once.

        One background task drains the queue in rounds. A round takes every
        room with messages waiting at that moment: one job reads those rooms'
        members, one applies each room's missed-message bump for its whole
        seq range and every mention. A burst costs two database jobs per
        round, not several per message, and its queue is one record per room.
        """
        work = self._rooms.get(message["roomId"])
        if work is None:
            work = self._rooms[message["roomId"]] = _RoomWork()
        sender_id, seq = message["senderId"], message["seq"]
        first, last = work.senders.get(sender_id, (seq, seq))
        work.senders[sender_id] = (min(first, seq), max(last, seq))
        names = mentioned_usernames(message["content"])
        if names:
            work.mentions.append((message, names))
        work.messages += 1
        self._count_backlog(1)
        if self._drainer is None:
            self._drainer = self.tasks.spawn(self._drain(), "notify-chat")

    def _count_backlog(self, delta: int) -> None:
        self._backlog += delta
        if self.metrics is not None:
            self.metrics.notification_backlog.set(self._backlog)

    async def _drain(self) -> None:
        try:
            while self._rooms:
                batch = list(itertools.islice(self._rooms, MAX_ROOMS_PER_ROUND))
                taken = {room_id: self._rooms.pop(room_id) for room_id in batch}
                try:
                    async with self._round:
                        await self._apply(taken)
                except Exception as exc:
                    # The round's notices are lost, as one message's were
                    # before; later rounds go on (and the seq-derived counts
                    # catch up with the next bump of an existing notice).
                    if isinstance(exc, errors.DatabaseUnavailable):
                        log.warning("chat notifications of %d rooms skipped, the database is "
                                    "unavailable: %s", len(taken), exc)  # fmt: skip
                    else:
                        log.error("chat notifications of %d rooms failed", len(taken),
                                  exc_info=exc)  # fmt: skip
                finally:
                    self._count_backlog(-sum(w.messages for w in taken.values()))
        finally:
            self._drainer = None

    async def _apply(self, taken: dict[str, _RoomWork]) -> None:
        """One round: the rooms' audiences, who is away, then every notice in one job."""
        # One statement, no transaction around it (see room_audiences).
        audiences = await self.db.run_bare(
            "notification.audience", store.room_audiences, list(taken)
        )
        members = {u for audience in audiences.values() for u in audience.members}
        present = await self.connections.connected("chat", members)
        rooms = []
        for room_id, audience in audiences.items():
            work = taken[room_id]
            room = store.RoomNotices(room_id, audience.name)
            room.missed = _missed_bumps(work, [u for u in audience.members if u not in present])
            # Members by lower-cased name, once per room: a mention costs its
            # names, not a scan of the room.
            by_name: dict[str, list[str]] = {}
            for user_id, name in audience.members.items() if work.mentions else ():
                by_name.setdefault(name.lower(), []).append(user_id)
            for message, names in work.mentions:
                mentioned = [u for name in sorted(names) for u in by_name.get(name, ())
                             if u != message["senderId"]]  # fmt: skip
                if mentioned:
                    room.mentions.append((mentioned, _mention_fields(message, audience.name)))
            if room.missed or room.mentions:
                rooms.append(room)
        if rooms:
            changes = await self.db.run(
                "notification.chat", store.chat_notices, rooms, self.max_per_user
            )
            self._count_created(changes)
            self.push(changes)

    async def room_seen(self, user_id: str, room_id: str) -> None:
        """The user read or joined the room: their missed-messages notification goes.

        With the joins and reads alongside (a reconnect storm rejoins every
        room): one transaction for the lot.
        """
        change = await self._seen.submit((user_id, room_id))
        if change.deleted:
            self.push([change])

    async def room_deleted(self, room_id: str, member_ids: list[str], deleted_by: str) -> None:
        """The room is gone: its missed-messages notices go; its other members are told."""
        async with self._round:
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


def _missed_bumps(work: _RoomWork, away: list[str]) -> list[store.MissedBump]:
    """Each away member's seq range of the room's waiting messages, their own left out."""
    if not away or not work.senders:
        return []
    first = min(f for f, _ in work.senders.values())
    last = max(la for _, la in work.senders.values())
    bumps = []
    for user_id in away:
        if user_id not in work.senders:
            bumps.append(store.MissedBump(user_id, first, last))
            continue
        # A member who sent some of them (then left chat): the others' range.
        others = [r for s, r in work.senders.items() if s != user_id]
        if others:
            bumps.append(store.MissedBump(user_id, min(f for f, _ in others),
                                          max(la for _, la in others)))  # fmt: skip
    return bumps


def _mention_fields(message: dict[str, Any], room_name: str) -> dict[str, Any]:
    return _fields(
        "info", "mention",
        f"{message['senderName']} mentioned you in #{room_name}"[: store.TITLE_MAX_CHARS],
        message["content"][: store.MENTION_EXCERPT_CHARS],
        {"roomId": message["roomId"], "messageId": message["id"], "seq": message["seq"],
         "senderId": message["senderId"], "senderName": message["senderName"]},
        None, "normal",
    )  # fmt: skip
