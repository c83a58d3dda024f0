"""``/ws/chat``: rooms, messages, reactions, typing and presence.

Each ``on_<event>`` loads nothing itself: the base handler has already
validated ``data`` with the event's schema. Database work goes through
``self.db.run`` (worker threads); broadcasts go through the hub, built once.
A message is committed before its ack and before ``message:new`` leaves.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING, Any, ClassVar

from marshmallow import Schema

from handlers import schemas as s
from handlers.base import GatewayHandler, Reply
from models import chat as chat_db
from server import errors
from server.hub import Hub, Target

if TYPE_CHECKING:
    from handlers.deps import Deps

# Typing indicators stop on their own this long after the last typing:start.
TYPING_TIMEOUT_SECS = 3.0


class TypingTracker:
    """Who is typing where, with a server-side auto-stop per (room, user).

    Example::

        typing = TypingTracker(hub)
        typing.start("general", user, conn_id)   # room gets user:typing once
    """

    def __init__(self, hub: Hub, timeout_secs: float = TYPING_TIMEOUT_SECS) -> None:
        self._hub = hub
        self._timeout = timeout_secs
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def start(self, room_id: str, user: dict[str, Any], conn_id: str) -> bool:
        key = (room_id, user["userId"])
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self._timeout, self._auto_stop, room_id, user, conn_id)
        if timer is None:
            self._hub.publish(Target.room(room_id), "user:typing", {"roomId": room_id, **user},
                              exclude=conn_id)  # fmt: skip
        return timer is None

    def stop(self, room_id: str, user: dict[str, Any], conn_id: str | None = None) -> bool:
        timer = self._timers.pop((room_id, user["userId"]), None)
        if timer is None:
            return False
        timer.cancel()
        self._hub.publish(
            Target.room(room_id), "user:stopped_typing", {"roomId": room_id, **user},
            exclude=conn_id,
        )  # fmt: skip
        return True

    def _auto_stop(self, room_id: str, user: dict[str, Any], conn_id: str | None = None) -> None:
        if self._timers.pop((room_id, user["userId"]), None) is not None:
            # Like typing:stop, it goes to the others, not to the typist's connection.
            self._hub.publish(
                Target.room(room_id), "user:stopped_typing", {"roomId": room_id, **user},
                exclude=conn_id,
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self._timers)


class ChatHandler(GatewayHandler):
    """The chat namespace (any authenticated user)."""

    namespace = "chat"
    schemas: ClassVar[dict[str, type[Schema]]] = {
        "room:create": s.RoomCreate,
        "room:list": s.RoomList,
        "room:join": s.RoomJoin,
        "room:leave": s.RoomRef,
        "room:members": s.RoomRef,
        "room:get_messages": s.RoomMessages,
        "room:read": s.RoomRead,
        "room:delete": s.RoomRef,
        "message:send": s.MessageSend,
        "message:edit": s.MessageEdit,
        "message:delete": s.MessageDelete,
        "message:react": s.MessageReact,
        "typing:start": s.RoomRef,
        "typing:stop": s.RoomRef,
        "user:status_update": s.StatusUpdate,
        "system:get_health": s.Empty,
    }
    rate_classes: ClassVar[dict[str, str]] = {
        "message:send": "messages",
        "message:edit": "messages",
        "message:react": "messages",
        "room:join": "joins",
        "room:create": "joins",
        "typing:start": "typing",
        "typing:stop": "typing",
    }

    def initialize(self, deps: Deps) -> None:
        super().initialize(deps)
        self.typing = deps.typing
        self.health = deps.health
        self.notifications = deps.notifications
        self.moderation = deps.moderation
        self.sends = deps.sends

    @property
    def user_info(self) -> dict[str, Any]:
        assert self.identity is not None
        return {
            "userId": self.identity.user_id,
            "username": self.identity.username,
            "displayName": self.identity.display_name,
        }

    # -- rooms ------------------------------------------------------------------

    async def on_room_create(
        self,
        room_id: str | None,
        name: str,
        type: str,
        password: str | None,
        description: str,
        members: list[str],
    ) -> dict[str, Any]:
        password_hash = None
        if password is not None:
            loop = asyncio.get_running_loop()
            password_hash = await loop.run_in_executor(None, chat_db.hash_password, password)
        room = await self.db.run(
            "room.create", chat_db.create_room,
            room_id or secrets.token_urlsafe(9), self.user_id, name, type, description,
            password_hash, members,
        )  # fmt: skip
        self.member_rooms.append(room["id"])
        return {"room": room}

    async def on_room_list(self, limit: int, offset: int, q: str | None) -> dict[str, Any]:
        return await self.db.run("room.list", chat_db.list_rooms, self.user_id, q, limit, offset)

    async def on_room_join(
        self, room_id: str, password: str | None, since_seq: int | None
    ) -> Reply:
        access = await self.db.run("room.access", chat_db.room_access, room_id, self.user_id)
        if not access.is_member:
            if access.room_type == "private":
                raise errors.RoomAccessDenied("This room is private", {"roomId": room_id})
            if access.password_hash is not None:
                loop = asyncio.get_running_loop()
                ok = password is not None and await loop.run_in_executor(
                    None, chat_db.verify_password, password, access.password_hash
                )
                if not ok:
                    raise errors.RoomAccessDenied("Wrong room password", {"roomId": room_id})
        already = self.hub.in_room(self, room_id)
        first_here = not self.hub.user_in_room(self.user_id, room_id, besides=self)
        if not already:
            # Subscribe before reading history, holding live frames back, so
            # nothing sent meanwhile falls between the query and the stream.
            self.hub.join(self, room_id, buffer=True)
        try:
            # In a cluster, hear other nodes' traffic before reading history.
            await self.hub.wait_subscribed("room", room_id)
            result = await self.db.run(
                "room.join", chat_db.join_room, room_id, self.user_id, since_seq
            )
        except BaseException:
            if not already:
                self.hub.leave(self, room_id)
            raise
        # The held frames carry later seqs than this history: they follow the ack.
        last = result["missed"][-1]["seq"] if result["missed"] else since_seq
        try:
            if room_id not in self.member_rooms:
                self.member_rooms.append(room_id)
            statuses = await self.presence.statuses(m["userId"] for m in result["members"])
            for member in result["members"]:
                member["status"] = statuses[member["userId"]]
            if not (self._closing or self._gone):
                if first_here and not already:
                    # O(room) like user_in_room above; only on a user's first local join.
                    users_here = {c.user_id for c in self.hub.room_connections(room_id)}
                    self.stats.rooms.users(room_id, len(users_here))
                    joined = {"roomId": room_id, "user": self.user_info}
                    self.publish(Target.room(room_id), "room:user_joined", joined)
                    # Cluster: the record a dead node's room:user_left is announced from.
                    await self.presence.joined(self.user_info, room_id)
                self._room_seen(room_id)
        except BaseException:
            # Still subscribed: what was held back goes out in full.
            self.hub.finish_join(self, room_id, None)
            raise
        return Reply(result, lambda: self.hub.finish_join(self, room_id, last))

    async def on_room_leave(self, room_id: str) -> dict[str, Any]:
        if not self.hub.in_room(self, room_id):
            raise errors.NotInRoom(details={"roomId": room_id})
        await self.db.run("room.leave", chat_db.leave_room, room_id, self.user_id)
        self.hub.leave(self, room_id)
        self.typing.stop(room_id, self.user_info)
        if room_id in self.member_rooms:
            self.member_rooms.remove(room_id)
        if self._announce_left(room_id):
            await self.presence.left(self.user_id, room_id)
        return {"roomId": room_id}

    def _announce_left(self, room_id: str) -> bool:
        """Announce the leave unless another of the user's connections here stays in the room."""
        if self.hub.user_in_room(self.user_id, room_id, besides=self):
            return False
        self.hub.publish(
            Target.room(room_id), "room:user_left", {"roomId": room_id, "user": self.user_info}
        )
        return True

    async def on_room_members(self, room_id: str) -> dict[str, Any]:
        members = await self.db.run("room.members", chat_db.members_of, room_id, self.user_id)
        statuses = await self.presence.statuses(m["userId"] for m in members)
        for member in members:
            member["status"] = statuses[member["userId"]]
        return {"roomId": room_id, "members": members}

    async def on_room_get_messages(
        self, room_id: str, limit: int, before_seq: int | None, offset: int | None
    ) -> dict[str, Any]:
        return await self.db.run(
            "message.page", chat_db.get_messages, room_id, self.user_id, limit, before_seq, offset
        )

    async def on_room_read(self, room_id: str, seq: int) -> dict[str, Any]:
        result = await self.db.run("room.read", chat_db.mark_read, room_id, self.user_id, seq)
        self._room_seen(room_id)
        return result

    def _room_seen(self, room_id: str) -> None:
        # After the ack (the task first runs once this handler yields).
        self.tasks.spawn(
            self.notifications.room_seen(self.user_id, room_id), f"room-seen-{room_id}"
        )

    async def on_room_delete(self, room_id: str) -> dict[str, Any]:
        # The same deletion as admin:delete_room (members told, notified,
        # audited); here the room's owner may too, not only an admin.
        assert self.identity is not None
        await self.moderation.delete_room(self.identity, room_id, owner_may=True)
        return {"roomId": room_id}

    # -- messages -----------------------------------------------------------------

    def _require_joined(self, room_id: str) -> None:
        if not self.hub.in_room(self, room_id):
            raise errors.NotInRoom("Join the room first", {"roomId": room_id})

    async def on_message_send(
        self,
        room_id: str,
        content: str,
        type: str,
        parent_message_id: int | None,
        attachments: list[str],
        metadata: dict[str, Any],
        client_msg_id: str | None,
    ) -> dict[str, Any]:
        self._require_joined(room_id)
        assert self.identity is not None
        sent = await self.sends.submit(chat_db.SendRequest(
            room_id, self.user_id, self.identity.display_name, content, type,
            parent_message_id, attachments, metadata, client_msg_id,
        ))  # fmt: skip
        message = sent.message
        if not sent.duplicate:
            self.metrics.messages_persisted.inc()
            self.stats.messages.add()
            self.stats.rooms.message(room_id)
            self.typing.stop(room_id, self.user_info, self.conn_id)
            self.publish(
                Target.room(message["roomId"]), "message:new", {"message": message},
                seq=message["seq"],
            )  # fmt: skip
            self.metrics.publish_latency.labels(self.namespace).observe(
                time.perf_counter() - self.event_started
            )
            # Mentions and missed messages: queued for the background, per room.
            self.notifications.message_sent(message)
        return {"message": message, "duplicate": sent.duplicate}

    async def on_message_edit(self, message_id: int, content: str) -> dict[str, Any]:
        message = await self.db.run(
            "message.edit", chat_db.edit_message, message_id, self.user_id, content
        )
        self.publish(Target.room(message["roomId"]), "message:updated", {"message": message})
        return {"message": message}

    async def on_message_delete(self, message_id: int, reason: str | None) -> dict[str, Any]:
        message = await self.db.run(
            "message.delete", chat_db.delete_message, message_id, self.user_id, self.is_staff
        )
        data = {"messageId": message["id"], "roomId": message["roomId"], "deletedBy": self.user_id}
        self.publish(Target.room(message["roomId"]), "message:deleted", data)
        return data

    async def on_message_react(self, message_id: int, emoji: str, action: str) -> dict[str, Any]:
        result = await self.db.run(
            "message.react", chat_db.react, message_id, self.user_id, emoji, action
        )
        data = {**result, "emoji": emoji, "userId": self.user_id, "action": action}
        self.publish(Target.room(result["roomId"]), "message:reaction", data)
        return data

    # -- typing and presence --------------------------------------------------------

    async def on_typing_start(self, room_id: str) -> dict[str, Any]:
        self._require_joined(room_id)
        # Typing is speaking: a muted member is refused (MUTED) and nobody hears it.
        await self.db.run("room.voice", chat_db.require_voice, room_id, self.user_id)
        self.typing.start(room_id, self.user_info, self.conn_id)
        return {"roomId": room_id}

    async def on_typing_stop(self, room_id: str) -> dict[str, Any]:
        self._require_joined(room_id)
        self.typing.stop(room_id, self.user_info, self.conn_id)
        return {"roomId": room_id}

    async def on_user_status_update(self, status: str) -> dict[str, Any]:
        await self.presence.set_status(self.user_id, status)
        await self.refresh_member_rooms()
        self.announce_status(status)
        return {"status": status}

    async def on_system_get_health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.health()
        return result

    async def on_disconnected(self, rooms: set[str]) -> None:
        for room_id in rooms:
            if not self.hub.user_in_room(self.user_id, room_id):
                self.typing.stop(room_id, self.user_info)
                self.hub.publish(
                    Target.room(room_id), "room:user_left",
                    {"roomId": room_id, "user": self.user_info, "reason": "disconnect"},
                )  # fmt: skip
                await self.presence.left(self.user_id, room_id)
