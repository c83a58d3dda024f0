"""``/ws/admin``: live metrics, health changes and moderation for staff.

Admins and moderators connect here (anyone else is refused with FORBIDDEN,
close 4403). On connect and every ``metrics_interval`` seconds each admin
connection receives ``metrics:update``; ``health:status`` goes out when the
health status changes. One node-wide :class:`~server.services.admin_feed.AdminFeed`
timer builds the snapshot once and writes the same frame to every admin
connection.

Moderation requests are thin wrappers around :class:`server.services.moderation.Moderation`
(and :class:`server.services.rooms.Rooms` for ``admin:delete_room``), which check the
finer roles (only admins ban, unban and delete rooms).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from marshmallow import Schema, fields, validate

from handlers import schemas as s
from handlers.base import GatewayHandler
from models import chat as chat_db
from models import moderation as mod_db
from server.core.auth import Identity
from server.services.admin_feed import local_room_users
from server.services.moderation import AUDIT_ACTIONS, NAMESPACES

if TYPE_CHECKING:
    from handlers.deps import Deps

BROADCAST_TYPES = ("info", "success", "warning", "error", "maintenance")
# A year: longer bans are permanent bans (omit durationSeconds).
MAX_DURATION_SECS = 365 * 24 * 3600


def _user_id(**kwargs: Any) -> s.Str:
    return s.Str(128, data_key="userId", **kwargs)


def _reason(**kwargs: Any) -> s.Text:
    return s.Text(validate=validate.Length(0, 500), **kwargs)


class Kick(s.EventSchema):
    user_id = _user_id(required=True)
    reason = _reason(load_default="")


class Ban(Kick):
    duration_seconds = s.Int(1, MAX_DURATION_SECS, data_key="durationSeconds", load_default=None)


class Unban(s.EventSchema):
    user_id = _user_id(required=True)


class Mute(Kick):
    room_id = s.room_id(required=True)
    duration_seconds = s.Int(1, MAX_DURATION_SECS, data_key="durationSeconds", required=True)


class DeleteMessage(s.MessageRef):
    reason = _reason(load_default="")


class Broadcast(s.EventSchema):
    message = s.Text(required=True, validate=validate.Length(1, 2000))
    type = fields.String(load_default="info", validate=validate.OneOf(BROADCAST_TYPES))
    namespaces = fields.List(
        fields.String(validate=validate.OneOf(NAMESPACES)),
        load_default=None,
        validate=validate.Length(1, len(NAMESPACES)),
    )
    role = s.role_name(load_default=None)


class Page(s.EventSchema):
    limit = s.Int(1, 500, load_default=50)
    offset = s.Int(0, s.MAX_OFFSET, load_default=0)


class AuditQuery(Page):
    action = fields.String(load_default=None, validate=validate.OneOf(AUDIT_ACTIONS))


class AdminHandler(GatewayHandler):
    """The admin namespace (roles admin or moderator)."""

    namespace = "admin"
    allowed_roles = frozenset({"admin", "moderator"})
    schemas: ClassVar[dict[str, type[Schema]]] = {
        "admin:kick": Kick,
        "admin:ban": Ban,
        "admin:unban": Unban,
        "admin:mute": Mute,
        "admin:delete_room": s.RoomRef,
        "admin:delete_message": DeleteMessage,
        "admin:broadcast": Broadcast,
        "admin:online_users": Page,
        "admin:stats": s.Empty,
        "admin:rooms": Page,
        "admin:audit": AuditQuery,
    }

    def initialize(self, deps: Deps) -> None:
        super().initialize(deps)
        self.moderation = deps.moderation
        self.rooms = deps.rooms
        self.feed = deps.feed
        self.connection_list = deps.connection_list

    @property
    def actor(self) -> Identity:
        assert self.identity is not None
        return self.identity

    async def on_connected(self) -> None:
        self.send_event("metrics:update", await self.feed.snapshot())
        health = await self.feed.health()
        if self.feed.health_status is None:
            self.feed.health_status = health["status"]
        self.send_event("health:status", {**health, "previous": None})

    # -- moderation -------------------------------------------------------------

    async def on_admin_kick(self, user_id: str, reason: str) -> dict[str, Any]:
        return await self.moderation.kick(self.actor, user_id, reason)

    async def on_admin_ban(
        self, user_id: str, reason: str, duration_seconds: int | None
    ) -> dict[str, Any]:
        return await self.moderation.ban(self.actor, user_id, reason, duration_seconds)

    async def on_admin_unban(self, user_id: str) -> dict[str, Any]:
        return await self.moderation.unban(self.actor, user_id)

    async def on_admin_mute(
        self, user_id: str, reason: str, room_id: str, duration_seconds: int
    ) -> dict[str, Any]:
        return await self.moderation.mute(self.actor, user_id, room_id, duration_seconds, reason)

    async def on_admin_delete_room(self, room_id: str) -> dict[str, Any]:
        return await self.rooms.delete(self.actor, room_id, owner_may=False)

    async def on_admin_delete_message(self, message_id: int, reason: str) -> dict[str, Any]:
        return await self.moderation.delete_message(self.actor, message_id, reason)

    async def on_admin_broadcast(
        self, message: str, type: str, namespaces: list[str] | None, role: str | None
    ) -> dict[str, Any]:
        return await self.moderation.broadcast(self.actor, message, type, namespaces, role)

    async def on_admin_audit(self, limit: int, offset: int, action: str | None) -> dict[str, Any]:
        return await self.moderation.audit_log(self.actor, limit, offset, action)

    # -- figures ----------------------------------------------------------------

    async def on_admin_online_users(self, limit: int, offset: int) -> dict[str, Any]:
        # Everyone online on any node (one node: this one), with connections per node.
        user_ids = await self.presence.online_users()
        page = user_ids[offset : offset + limit]
        statuses = await self.presence.statuses(page)
        by_node = await self.presence.connections_by_node(page)
        local = {u: self.hub.user_connections(u) for u in page}
        # Admins also see each connection (address, user agent...), from every node
        # holding one of the page's users; moderators see the counts only.
        listing = None
        if "admin" in self.actor.roles:
            holding = {node for counts in by_node.values() for node in counts}
            listing = await self.connection_list.of_users(page, holding)
        details: dict[str, list[dict[str, Any]]] = {}
        for described in listing.connections if listing is not None else ():
            details.setdefault(described["userId"], []).append(described)
        # Users connected only to other nodes: their names come from the database.
        remote = [u for u, conns in local.items() if not conns]
        names = await self.db.run("user.names", chat_db.user_names, remote) if remote else {}
        users = []
        for user_id, conns in local.items():
            by_ns: dict[str, int] = {}
            for conn in conns:
                by_ns[conn.namespace] = by_ns.get(conn.namespace, 0) + 1
            identity = getattr(conns[0], "identity", None) if conns else None
            username, display_name = names.get(user_id, (user_id, user_id))
            # byNamespace is this node's; the total and byNode are the cluster's.
            nodes = by_node.get(user_id, {})
            counts: dict[str, Any] = {
                "total": sum(nodes.values()), "byNamespace": by_ns, "byNode": nodes,
            }  # fmt: skip
            if listing is not None:
                counts["list"] = details.get(user_id, [])
            users.append({
                "userId": user_id,
                "username": getattr(identity, "username", username),
                "displayName": getattr(identity, "display_name", display_name),
                "status": statuses[user_id],
                "connections": counts,
            })  # fmt: skip
        result = {"users": users, "total": len(user_ids), "node": self.state.node_id}
        if listing is not None:
            result["missingNodes"] = listing.missing_nodes
        return result

    async def on_admin_stats(self) -> dict[str, Any]:
        totals = await self.db.run("admin.totals", mod_db.totals)
        by_ns = self.hub.count_by_namespace()
        messages = self.stats.messages
        node = self.feed.node_info(sum(by_ns.values()))
        # The live nodes of the cluster (this one first, with fresh figures); users anywhere.
        others = [n for n in await self.presence.nodes() if not n["self"]]
        nodes, online = [node, *others], len(await self.presence.online_users())
        return {
            "node": self.state.node_id,
            "nodes": nodes,
            "uptimeSeconds": node["uptimeSeconds"],
            "connections": {"total": sum(by_ns.values()), "byNamespace": by_ns},
            "users": {"online": online, "total": totals["users"]},
            "rooms": {"active": len(self.hub.active_rooms()), "total": totals["rooms"]},
            "messages": {
                "total": totals["messages"],
                "sinceStart": messages.total,
                "perSecond": messages.per_second(),
                "perMinute": messages.count(59),
            },
            "bans": {"active": totals["activeBans"]},
        }

    async def on_admin_rooms(self, limit: int, offset: int) -> dict[str, Any]:
        result: dict[str, Any] = await self.db.run("admin.rooms", mod_db.room_rows, limit, offset)
        now = time.time()
        for room in result["rooms"]:
            room_id = room["roomId"]
            active = local_room_users(self.hub, room_id)
            activity = self.stats.rooms.get(room_id)
            room["activeUsers"] = active
            room["peakUsers"] = max(active, activity.peak_users if activity else 0)
            room["messagesPerMinute"] = self.stats.rooms.per_minute(room_id, now)
        return result
