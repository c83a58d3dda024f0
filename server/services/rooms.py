"""Rooms: creating, joining, leaving, updating and deleting them, for every surface.

The chat namespace translates ``room:*`` frames into these calls, the
admin namespace calls :meth:`Rooms.delete` for ``admin:delete_room`` and
the REST API :meth:`Rooms.update` for ``PATCH /api/v1/rooms/{roomId}``;
every surface gets the same checks and the same events. What a room's
connections see: ``room:user_joined`` when a user's first connection on a
node joins, ``room:user_left`` when their last one leaves or disconnects,
and, on every member's chat connections, ``room:updated`` when the room
changes and ``room:deleted`` when it goes.

Deletion is one path whoever asks (SPEC §3: the room's owner through
``/ws/chat``, an admin through either surface): check, delete, audit, tell
every member, unsubscribe everyone from the room on every node, drop its
missed-messages notices and notify the other members.

Example::

    rooms = Rooms(hub, db, presence, stats, typing, notifications, tasks)
    await rooms.delete(admin_identity, "general", owner_may=False)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from models import chat as chat_db
from models import moderation as mod_db
from server.core import errors
from server.core.auth import Identity
from server.core.tasks import BackgroundTasks
from server.ops.stats import Stats
from server.realtime.hub import Connection, Hub, Target
from server.realtime.presence import Presence
from server.services.moderation import ADMIN_ROLES, require_role
from server.services.notify import NotificationService
from server.services.typing import TypingTracker
from server.store.db import Database

log = logging.getLogger("switchboard.rooms")

_T = TypeVar("_T")

#: The control message that makes the other nodes forget a deleted room.
FORGET_ROOM_ACTION = "forget_room"


@dataclasses.dataclass
class Joined:
    """What :meth:`Rooms.join` (or :meth:`Rooms.resume`, per room) did for one connection."""

    room_id: str
    #: The ``room:join`` ack: ``{room, members, missed, ...}`` (for a resume,
    #: the room's answer ``{roomId, status, missed, recovered}``).
    result: dict[str, Any]
    #: This call subscribed the connection, holding the room's live frames
    #: back: release them with ``hub.finish_join`` after the ack.
    held: bool
    #: The user's first connection in the room on this node: announce it
    #: with :meth:`Rooms.announce_joined` (unless the connection is closing).
    first_here: bool
    #: The ``sinceSeq`` the client asked from.
    since_seq: int | None

    @property
    def last_seq(self) -> int | None:
        """The last seq the ack carries; held frames after it are released."""
        missed = self.result["missed"]
        return missed[-1]["seq"] if missed else self.since_seq


class Rooms:
    """The room operations of one node (see module docstring).

    ``user`` arguments are the public user dict events carry
    (``userId``, ``username``, ``displayName``).
    """

    def __init__(
        self,
        hub: Hub,
        db: Database,
        presence: Presence,
        stats: Stats,
        typing: TypingTracker,
        notifications: NotificationService,
        tasks: BackgroundTasks,
    ) -> None:
        self.hub = hub
        self.db = db
        self.presence = presence
        self.stats = stats
        self.typing = typing
        self.notifications = notifications
        self.tasks = tasks
        # A room deleted on any node is forgotten on every node (a no-op alone).
        hub.broker.on_control(FORGET_ROOM_ACTION, self._forget_from_elsewhere)

    # -- create and join ------------------------------------------------------------

    async def create(
        self,
        owner_id: str,
        room_id: str,
        name: str,
        type: str,
        password: str | None,
        description: str,
        topic: str,
        members: list[str],
    ) -> dict[str, Any]:
        """Store a room owned by ``owner_id`` (members included); returns it."""
        password_hash = await _password_hash(password)
        room: dict[str, Any] = await self.db.run(
            "room.create", chat_db.create_room,
            room_id, owner_id, name, type, description, topic, password_hash, members,
        )  # fmt: skip
        return room

    async def join(
        self, conn: Connection, room_id: str, password: str | None, since_seq: int | None
    ) -> Joined:
        """Admit ``conn``'s user, subscribe the connection, read what it missed.

        The connection is subscribed before history is read, with live frames
        held back, so that nothing sent meanwhile falls between the query and
        the stream; the caller releases them after the ack (:class:`Joined`).
        """
        await self._check_access(room_id, conn.user_id, password)
        held = self._hold(conn, [room_id])
        result = await self._read_held(
            conn, [room_id], held, "room.join", chat_db.join_room, room_id, conn.user_id, since_seq
        )
        # The read saw the room at lastSeq: what this node delivers of it starts there.
        self.hub.seqs.known(room_id, result["room"]["lastSeq"])
        await self._with_statuses(result["members"])
        return Joined(room_id, result, room_id in held, held.get(room_id, False), since_seq)

    async def resume(self, conn: Connection, requests: list[chat_db.ResumeRequest]) -> list[Joined]:
        """Re-subscribe ``conn`` to the rooms it comes back to; one answer per room.

        The mechanics of :meth:`join` for many rooms at once (``room:resume``):
        every named room is subscribed with its live frames held before one
        database read answers them all (:func:`models.chat.resume_rooms`);
        the rooms that are not ``resumed`` (gone, forbidden, reset) are
        unsubscribed again, their held frames dropped unseen. Returns one
        :class:`Joined` per request, in request order; ``held`` only for
        resumed rooms this call subscribed.
        """
        room_ids = [r.room_id for r in requests]
        held = self._hold(conn, room_ids)
        answers = await self._read_held(
            conn, room_ids, held, "room.resume", chat_db.resume_rooms, conn.user_id, requests
        )
        out = []
        for request, answer in zip(requests, answers, strict=True):
            room_id = request.room_id
            resumed = answer["status"] == "resumed"
            if room_id in held and not resumed:
                self.hub.leave(conn, room_id)
            mine = resumed and room_id in held
            joined = Joined(room_id, answer, mine, mine and held[room_id], request.since_seq)
            if resumed and joined.last_seq is not None:
                self.hub.seqs.known(room_id, joined.last_seq)
            out.append(joined)
        return out

    def _hold(self, conn: Connection, room_ids: list[str]) -> dict[str, bool]:
        """Subscribe ``conn`` to those of ``room_ids`` it is not in, holding their live frames.

        Returns the rooms subscribed here, each with whether no other
        connection of the user on this node is in it (``first_here``).
        """
        held: dict[str, bool] = {}
        for room_id in room_ids:
            if not self.hub.in_room(conn, room_id):
                held[room_id] = not self.hub.user_in_room(conn.user_id, room_id, besides=conn)
                self.hub.join(conn, room_id, buffer=True)
        return held

    async def _read_held(
        self, conn: Connection, room_ids: list[str], held: dict[str, bool], op: str,
        read: Callable[..., _T], *args: Any,
    ) -> _T:  # fmt: skip
        """``read(*args)`` in the database once every one of ``room_ids`` hears the cluster.

        Subscribed first, read second: nothing sent meanwhile falls between
        the query and the stream. On failure the held rooms are left again.
        """
        try:
            # In a cluster, hear other nodes' traffic before reading history.
            await asyncio.gather(*(self.hub.wait_subscribed("room", r) for r in room_ids))
            return await self.db.run(op, read, *args)
        except BaseException:
            for room_id in held:
                self.hub.leave(conn, room_id)
            raise

    async def _check_access(self, room_id: str, user_id: str, password: str | None) -> None:
        access = await self.db.run("room.access", chat_db.room_access, room_id, user_id)
        if access.is_member:
            return
        if access.room_type == "private":
            raise errors.RoomAccessDenied("This room is private", {"roomId": room_id})
        if access.password_hash is not None:
            loop = asyncio.get_running_loop()
            ok = password is not None and await loop.run_in_executor(
                None, chat_db.verify_password, password, access.password_hash
            )
            if not ok:
                raise errors.RoomAccessDenied("Wrong room password", {"roomId": room_id})

    async def announce_joined(self, conn: Connection, user: dict[str, Any], room_id: str) -> None:
        """Tell the room (``conn`` aside) that the user arrived on this node."""
        # O(room), only on a user's first local join.
        users_here = {c.user_id for c in self.hub.room_connections(room_id)}
        self.stats.rooms.users(room_id, len(users_here))
        joined = {"roomId": room_id, "user": user}
        self.hub.publish(Target.room(room_id), "room:user_joined", joined, exclude=conn.conn_id)
        # Cluster: the record a dead node's room:user_left is announced from.
        await self.presence.joined(user, room_id)

    def seen(self, user_id: str, room_id: str) -> None:
        """The user joined or read the room: their missed-messages notice goes.

        In the background: called before an ack, the task first runs once
        the caller yields, so the ack is not delayed.
        """
        self.tasks.spawn(self.notifications.room_seen(user_id, room_id), f"room-seen-{room_id}")

    # -- leave ------------------------------------------------------------------------

    async def leave(self, conn: Connection, user: dict[str, Any], room_id: str) -> None:
        """End the user's membership and unsubscribe ``conn`` (NOT_IN_ROOM if it is not in)."""
        if not self.hub.in_room(conn, room_id):
            raise errors.NotInRoom(details={"roomId": room_id})
        await self.db.run("room.leave", chat_db.leave_room, room_id, conn.user_id)
        self.hub.leave(conn, room_id)
        self.typing.stop(room_id, user)
        # Unless another of the user's connections here stays in the room.
        if not self.hub.user_in_room(conn.user_id, room_id):
            self.hub.publish(Target.room(room_id), "room:user_left",
                             {"roomId": room_id, "user": user})  # fmt: skip
            await self.presence.left(conn.user_id, room_id)

    async def disconnected(self, user: dict[str, Any], rooms: Iterable[str]) -> None:
        """A connection of the user closed while in ``rooms``: announce the user gone
        from each room where none of their connections on this node remains."""
        user_id = user["userId"]
        for room_id in rooms:
            if not self.hub.user_in_room(user_id, room_id):
                self.typing.stop(room_id, user)
                self.hub.publish(
                    Target.room(room_id), "room:user_left",
                    {"roomId": room_id, "user": user, "reason": "disconnect"},
                )  # fmt: skip
                await self.presence.left(user_id, room_id)

    # -- reads ------------------------------------------------------------------------

    async def members(self, room_id: str, user_id: str) -> list[dict[str, Any]]:
        """The room's members with their status (members only)."""
        members: list[dict[str, Any]] = await self.db.run(
            "room.members", chat_db.members_of, room_id, user_id
        )
        await self._with_statuses(members)
        return members

    async def _with_statuses(self, members: list[dict[str, Any]]) -> None:
        statuses = await self.presence.statuses(m["userId"] for m in members)
        for member in members:
            member["status"] = statuses[member["userId"]]

    # -- update -----------------------------------------------------------------------

    async def update(self, actor: Identity, room_id: str, values: dict[str, Any]) -> dict[str, Any]:
        """Change some of a room's fields; tell every member; audit an admin's change.

        ``values`` holds the fields to set, among ``name``, ``topic``,
        ``description``, ``type`` and ``password`` (None removes it). Who may
        is who may delete the room: its owner or a token with role admin
        (FORBIDDEN otherwise). When something changed, every member's chat
        connections on every node get ``room:updated {roomId, room, changes,
        by}`` (once each, the actor's too) and an admin's change of a room
        that is not theirs gets an ``update_room`` audit row. Nobody is
        unsubscribed: a room made private or given a password keeps its
        members. Returns the room (``hasPassword``, never the password).
        """
        values = dict(values)
        if "password" in values:
            values["password"] = await _password_hash(values["password"])
        updated: chat_db.RoomUpdated = await self.db.run(
            "room.update", chat_db.update_room,
            room_id, actor.user_id, actor.has_any(ADMIN_ROLES), values,
        )  # fmt: skip
        room = updated.room
        if not updated.changes:
            return room
        if room["ownerId"] != actor.user_id:
            await self.db.run(
                "moderation.audit", mod_db.audit, actor.user_id, "update_room",
                f"room:{room_id}", "", {"changes": updated.changes},
            )  # fmt: skip
        self._tell_members(room_id, updated.members, "room:updated", {
            "roomId": room_id, "room": room, "changes": updated.changes, "by": actor.user_id,
        })  # fmt: skip
        log.info("update_room: %s changed %s of room %s", actor.user_id,
                 ", ".join(updated.changes), room_id)  # fmt: skip
        return room

    def _tell_members(
        self, room_id: str, members: list[str], event: str, data: dict[str, Any]
    ) -> None:
        """``event`` once to every chat connection in the room or of a member, on every node.

        A member's connections that have not joined the room (another device,
        a reconnect that has not re-joined yet) hear it too.
        """
        targets = [Target.room(room_id), *(Target.user(m, "chat") for m in members)]
        self.hub.publish_many(targets, event, data)

    # -- delete -----------------------------------------------------------------------

    async def delete(self, actor: Identity, room_id: str, *, owner_may: bool) -> dict[str, Any]:
        """Soft-delete a room; tell, unsubscribe and notify every member; audit it.

        ``owner_may`` lets the room's owner delete it (``/ws/chat``
        ``room:delete``); without it only an admin may (``admin:delete_room``),
        the owner included. Every member's chat connections get
        ``room:deleted`` (whether or not they have the room open) on every
        node, every node unsubscribes its connections from the room, the
        room's missed-messages notices go and the other members get a
        notification. Returns ``{roomId, members}``.
        """
        if not owner_may:
            require_role(actor, "delete_room")
        members: list[str] = await self.db.run(
            "room.delete", chat_db.delete_room, room_id, actor.user_id, actor.has_any(ADMIN_ROLES)
        )
        await self.db.run(
            "moderation.audit", mod_db.audit, actor.user_id, "delete_room", f"room:{room_id}", "",
            {"members": len(members)},
        )  # fmt: skip
        self._tell_members(
            room_id, members, "room:deleted", {"roomId": room_id, "deletedBy": actor.user_id}
        )
        self.forget(room_id, members)
        self.hub.broker.send_control(FORGET_ROOM_ACTION, {"roomId": room_id, "members": members})
        log.info("delete_room: %s deleted room %s (%d members)", actor.user_id, room_id,
                 len(members))  # fmt: skip
        self.tasks.spawn(
            self.notifications.room_deleted(room_id, members, actor.user_id),
            f"notify-room-deleted-{room_id}",
        )
        return {"roomId": room_id, "members": len(members)}

    def forget(self, room_id: str, members: Iterable[str]) -> None:
        """Drop every trace of a deleted room on this node (no event is sent).

        Its connections are unsubscribed, its typing timers and figures go,
        and the members' chat connections stop announcing their presence to it.
        """
        for user_id in members:
            for conn in self.hub.user_connections(user_id, "chat"):
                # Chat connections track their rooms for presence announcements.
                rooms = getattr(conn, "member_rooms", None)
                if isinstance(rooms, list) and room_id in rooms:
                    rooms.remove(room_id)
        self.hub.clear_room(room_id)
        self.typing.forget_room(room_id)
        self.stats.rooms.forget(room_id)

    def _forget_from_elsewhere(self, data: dict[str, Any]) -> None:
        self.forget(data["roomId"], data["members"])


async def _password_hash(password: str | None) -> str | None:
    """The stored form of a room password (None stays None), hashed off the loop."""
    if password is None:
        return None
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, chat_db.hash_password, password)
