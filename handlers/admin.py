"""``/ws/admin``: live metrics, health changes and moderation for staff.

Admins and moderators connect here (anyone else is refused with FORBIDDEN,
close 4403). On connect and every ``metrics_interval`` seconds each admin
connection receives ``metrics:update``; ``health:status`` goes out when the
health status changes. One node-wide :class:`AdminFeed` timer builds the
snapshot once and writes the same frame to every admin connection.

Moderation requests are thin wrappers around :class:`server.moderation.Moderation`,
which checks the finer roles (only admins ban, unban and delete rooms).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

from marshmallow import Schema, fields, validate

from handlers import schemas as s
from handlers.base import GatewayHandler, NodeState
from models import chat as chat_db
from models import moderation as mod_db
from server import protocol
from server.auth import Identity
from server.cluster_state import RedisPresence
from server.health import Health, rss_bytes
from server.hub import Hub, Target
from server.moderation import AUDIT_ACTIONS, NAMESPACES
from server.stats import Stats
from server.tasks import cancel_and_wait

if TYPE_CHECKING:
    from handlers.deps import Deps

log = logging.getLogger("switchboard.admin")

#: Rooms listed in ``metrics:update``'s ``rooms.top``.
TOP_ROOMS = 5
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


class Page(s.EventSchema):
    limit = s.Int(1, 500, load_default=50)
    offset = s.Int(0, s.MAX_OFFSET, load_default=0)


class AuditQuery(Page):
    action = fields.String(load_default=None, validate=validate.OneOf(AUDIT_ACTIONS))


def local_room_users(hub: Hub, room_id: str) -> int:
    """Distinct users with a connection in ``room_id`` on this node."""
    return len({c.user_id for c in hub.room_connections(room_id)})


class AdminFeed:
    """The node-wide timer behind ``metrics:update`` and ``health:status``.

    One task per node, not per connection: it builds the snapshot once per
    interval and writes the same frame to every local admin connection
    (each node reports its own figures, so delivery stays local).

    Example::

        feed = AdminFeed(hub, stats, health, state, interval_secs=5.0)
        feed.start()
        snapshot = await feed.snapshot()
    """

    def __init__(
        self, hub: Hub, stats: Stats, health: Health, state: NodeState, interval_secs: float
    ) -> None:
        self.hub = hub
        self.stats = stats
        self.health = health
        self.state = state
        self.interval = interval_secs
        #: Last health status seen ("healthy", "degraded", "unhealthy").
        self.health_status: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="admin-feed")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # One bad tick must not end the feed for good; the next may work.
                log.exception("admin feed tick failed")

    async def tick(self) -> None:
        """Push ``metrics:update`` (and ``health:status`` if it changed) to admins.

        Health is followed even with no admin connected, so that one who
        connects later is told of the next real change, not of a stale one.
        """
        if self.hub.count_by_namespace().get("admin"):
            self._push("metrics:update", await self.snapshot())
        health = await self.health()
        previous = self.health_status
        if health["status"] == previous:
            return
        self.health_status = health["status"]
        # The first reading is a baseline: admins got the status on connect.
        if previous is not None:
            log.warning("health status %s -> %s: %s", previous, health["status"],
                        "; ".join(health["reasons"]) or "recovered")  # fmt: skip
            self._push("health:status", {**health, "previous": previous})

    def _push(self, event: str, data: dict[str, Any]) -> None:
        frame = protocol.frame(protocol.event_payload(event, data))
        self.hub.deliver(Target.ns("admin"), frame)

    async def snapshot(self) -> dict[str, Any]:
        """The ``metrics:update`` document: this node's live, measured figures."""
        now = time.time()
        by_ns = self.hub.count_by_namespace()
        total = sum(by_ns.values())
        messages = self.stats.messages
        p50, p95 = self.stats.latency.percentiles(50, 95)
        top = [
            {
                "roomId": room_id,
                "activeUsers": local_room_users(self.hub, room_id),
                "messagesPerMinute": per_minute,
            }
            for room_id, per_minute in self.stats.rooms.busiest(TOP_ROOMS, now)
        ]
        memory = await asyncio.get_running_loop().run_in_executor(None, rss_bytes)
        return {
            "connections": {"total": total, "byNamespace": by_ns},
            "messages": {
                "perSecond": messages.per_second(now),
                "perMinute": messages.count(59, now),
                "total": messages.total,
            },
            "performance": {
                "p50Ms": round(p50 * 1000, 3),
                "p95Ms": round(p95 * 1000, 3),
                "errorRate": round(self.stats.error_ratio(), 4),
                "eventLoopLagMs": round(self.health.loop_monitor.lag_secs * 1000, 2),
                "samples": len(self.stats.latency),
            },
            "rooms": {"active": len(self.hub.active_rooms()), "top": top},
            "nodes": [self.node_info(total)],
            "memoryBytes": memory,
            "timestamp": protocol.iso(protocol.now()),
        }

    def node_info(self, connections: int | None = None) -> dict[str, Any]:
        if connections is None:
            connections = len(self.hub.connections)
        return {
            "id": self.state.node_id,
            "uptimeSeconds": round(time.time() - self.state.started_at, 3),
            "connections": connections,
            "self": True,
        }


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
        self.feed = deps.feed

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
        return await self.moderation.delete_room(self.actor, room_id)

    async def on_admin_delete_message(self, message_id: int, reason: str) -> dict[str, Any]:
        return await self.moderation.delete_message(self.actor, message_id, reason)

    async def on_admin_broadcast(
        self, message: str, type: str, namespaces: list[str] | None
    ) -> dict[str, Any]:
        return await self.moderation.broadcast(self.actor, message, type, namespaces)

    async def on_admin_audit(self, limit: int, offset: int, action: str | None) -> dict[str, Any]:
        return await self.moderation.audit_log(self.actor, limit, offset, action)

    # -- figures ----------------------------------------------------------------

    async def on_admin_online_users(self, limit: int, offset: int) -> dict[str, Any]:
        cluster = self.presence if isinstance(self.presence, RedisPresence) else None
        # In a cluster: everyone online on any node, with connections per node.
        user_ids = await cluster.online_users() if cluster else sorted(self.hub.online_users())
        page = user_ids[offset : offset + limit]
        statuses = await self.presence.statuses(page)
        by_node = await cluster.connections_by_node(page) if cluster else {}
        local = {u: self.hub.user_connections(u) for u in page}
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
            users.append({
                "userId": user_id,
                "username": getattr(identity, "username", username),
                "displayName": getattr(identity, "display_name", display_name),
                "status": statuses[user_id],
                "connections": {"total": len(conns), "byNamespace": by_ns},
            })  # fmt: skip
            if cluster:
                # byNamespace stays this node's; the totals are the cluster's.
                nodes = by_node.get(user_id, {})
                users[-1]["connections"] = {
                    "total": sum(nodes.values()), "byNamespace": by_ns, "byNode": nodes,
                }  # fmt: skip
        return {"users": users, "total": len(user_ids), "node": self.state.node_id}

    async def on_admin_stats(self) -> dict[str, Any]:
        totals = await self.db.run("admin.totals", mod_db.totals)
        by_ns = self.hub.count_by_namespace()
        messages = self.stats.messages
        node = self.feed.node_info(sum(by_ns.values()))
        nodes, online = [node], len(self.hub.online_users())
        if isinstance(self.presence, RedisPresence):
            # The live nodes of the cluster (this one with fresh figures); users anywhere.
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
