"""``/ws/chat``: rooms, messages, reactions, typing and presence.

Each ``on_<event>`` loads nothing itself: the base handler has already
validated ``data`` with the event's schema. Rooms (create, join, leave,
update, delete) are :class:`server.services.rooms.Rooms` calls and typing indicators
:class:`server.services.typing.TypingTracker` calls, shared with the admin surface;
what stays here is the connection's own part (its rooms list, releasing a
join's held frames after the ack). Messages (send, edit, delete, react)
are :class:`server.services.messages.Messages` calls. Database work goes
through ``self.db.run`` (worker threads); broadcasts go through the hub,
built once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from marshmallow import Schema

from handlers import schemas as s
from handlers.base import EarlyAck, GatewayHandler, Reply
from models import chat as chat_db
from server.core import errors
from server.services.messages import Author
from server.services.rooms import Joined

if TYPE_CHECKING:
    from handlers.deps import Deps


class ChatHandler(GatewayHandler):
    """The chat namespace (any authenticated user)."""

    namespace = "chat"
    schemas: ClassVar[dict[str, type[Schema]]] = {
        "room:create": s.RoomCreate,
        "room:list": s.RoomList,
        "room:join": s.RoomJoin,
        "room:resume": s.RoomResume,
        "room:leave": s.RoomRef,
        "room:members": s.RoomRef,
        "room:get_messages": s.RoomMessages,
        "room:read": s.RoomRead,
        "room:delete": s.RoomRef,
        "room:update": s.RoomUpdate,
        "message:send": s.MessageSend,
        "message:edit": s.MessageEdit,
        "message:delete": s.MessageDelete,
        "message:react": s.MessageReact,
        "typing:start": s.RoomRef,
        "typing:stop": s.RoomRef,
        "user:status_update": s.StatusUpdate,
        "system:get_health": s.Empty,
    }
    early_acks: ClassVar[frozenset[str]] = frozenset({"message:send"})
    rate_classes: ClassVar[dict[str, str]] = {
        "message:send": "messages",
        "message:edit": "messages",
        "message:react": "messages",
        "room:join": "joins",
        "room:resume": "joins",
        "room:create": "joins",
        "room:update": "joins",
        "typing:start": "typing",
        "typing:stop": "typing",
    }

    __slots__ = ("health", "messages", "notifications", "reads", "rooms", "typing")

    def initialize(self, deps: Deps) -> None:
        super().initialize(deps)
        self.rooms = deps.rooms
        self.typing = deps.typing
        self.health = deps.health
        self.notifications = deps.notifications
        self.messages = deps.messages
        self.reads = deps.reads

    @property
    def user_info(self) -> dict[str, Any]:
        assert self.identity is not None
        return {
            "userId": self.identity.user_id,
            "username": self.identity.username,
            "displayName": self.identity.display_name,
        }

    # -- rooms ------------------------------------------------------------------

    async def on_room_create(self, room_id: str | None, **fields: Any) -> dict[str, Any]:
        # fields: the schema's name, type, password, description and members.
        room = await self.rooms.create(self.user_id, room_id or secrets.token_urlsafe(9), **fields)
        self.member_rooms.append(room["id"])
        return {"room": room}

    async def on_room_list(self, limit: int, offset: int, q: str | None) -> dict[str, Any]:
        return await self.db.run("room.list", chat_db.list_rooms, self.user_id, q, limit, offset)

    async def on_room_join(
        self, room_id: str, password: str | None, since_seq: int | None
    ) -> Reply:
        joined = await self.rooms.join(self, room_id, password, since_seq)
        return Reply(joined.result, await self._settle_joins([joined]))

    async def on_room_resume(self, rooms: list[dict[str, Any]]) -> Reply:
        requests = [chat_db.ResumeRequest(**room) for room in rooms]
        joins = await self.rooms.resume(self, requests)
        resumed = [joined for joined in joins if joined.result["status"] == "resumed"]
        release = await self._settle_joins(resumed)
        return Reply({"rooms": [joined.result for joined in joins]}, release)

    async def _settle_joins(self, joins: list[Joined]) -> Callable[[], None]:
        """This connection's part of joining (or resuming) rooms; returns the after-ack release.

        The rooms go on the connection's list, a user's first connection in a
        room here is announced, their missed-messages notices go. The release
        sends each room's held frames after its last seq in the ack: the ack
        must precede them, they carry later seqs.
        """
        try:
            for joined in joins:
                if joined.room_id not in self.member_rooms:
                    self.member_rooms.append(joined.room_id)
                if not (self._closing or self._gone):
                    if joined.first_here:
                        await self.rooms.announce_joined(self, self.user_info, joined.room_id)
                    self.rooms.seen(self.user_id, joined.room_id)
        except BaseException:
            # Still subscribed: what was held back goes out in full.
            for joined in joins:
                self.hub.finish_join(self, joined.room_id, None)
            raise

        def release() -> None:
            for joined in joins:
                if joined.held:
                    self.hub.finish_join(self, joined.room_id, joined.last_seq)

        return release

    async def on_room_leave(self, room_id: str) -> dict[str, Any]:
        await self.rooms.leave(self, self.user_info, room_id)
        if room_id in self.member_rooms:
            self.member_rooms.remove(room_id)
        return {"roomId": room_id}

    async def on_room_members(self, room_id: str) -> dict[str, Any]:
        return {"roomId": room_id, "members": await self.rooms.members(room_id, self.user_id)}

    async def on_room_get_messages(self, room_id: str, limit: int, **window: Any) -> dict[str, Any]:
        # window: the schema's bounds (beforeSeq, afterSeq, before, after) and offset.
        return await self.db.run(
            "message.page", chat_db.get_messages, room_id, self.user_id, limit, **window
        )

    async def on_room_read(self, room_id: str, seq: int) -> dict[str, Any]:
        result = await self.reads.submit(chat_db.ReadRequest(room_id, self.user_id, seq))
        self.rooms.seen(self.user_id, room_id)
        return result

    async def on_room_delete(self, room_id: str) -> dict[str, Any]:
        # The same deletion as admin:delete_room; here the room's owner may too.
        assert self.identity is not None
        await self.rooms.delete(self.identity, room_id, owner_may=True)
        return {"roomId": room_id}

    async def on_room_update(self, room_id: str, **values: Any) -> dict[str, Any]:
        # The same update as PATCH /api/v1/rooms/{roomId}: the owner or an admin.
        assert self.identity is not None
        return {"room": await self.rooms.update(self.identity, room_id, values)}

    # -- messages -----------------------------------------------------------------

    def _require_joined(self, room_id: str) -> None:
        if not self.hub.in_room(self, room_id):
            raise errors.NotInRoom("Join the room first", {"roomId": room_id})

    @property
    def author(self) -> Author:
        return Author(self.conn_id, self.user_info, self.namespace)

    async def on_message_send(
        self,
        room_id: str,
        content: str,
        type: str,
        parent_message_id: int | None,
        attachments: list[str],
        metadata: dict[str, Any],
        client_msg_id: str | None,
        answer: EarlyAck,
    ) -> dict[str, Any]:
        self._require_joined(room_id)
        assert self.identity is not None
        request = chat_db.SendRequest(
            room_id, self.user_id, self.identity.display_name, content, type,
            parent_message_id, attachments, metadata, client_msg_id,
        )  # fmt: skip
        # The ack goes out once the message is committed, before this task
        # resumes: from the database thread when it can (``answer.from_writer``),
        # else from the loop (``answer``); the room's broadcast (not to the
        # sender) follows it from the loop.
        return await self.messages.send(
            self.author, request, started=self.event_started, answer=answer, answer_now=answer
        )

    async def on_message_edit(self, message_id: int, content: str) -> dict[str, Any]:
        return await self.messages.edit(self.author, message_id, content)

    async def on_message_delete(self, message_id: int, reason: str | None) -> dict[str, Any]:
        return await self.messages.delete(self.author, message_id, is_staff=self.is_staff)

    async def on_message_react(self, message_id: int, emoji: str, action: str) -> dict[str, Any]:
        return await self.messages.react(self.author, message_id, emoji, action)

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
        await self.rooms.disconnected(self.user_info, rooms)
