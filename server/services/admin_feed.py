"""The node-wide feed behind ``/ws/admin``'s ``metrics:update`` and ``health:status``.

Every ``metrics_interval`` seconds one task builds this node's snapshot
(connections, message rates, latency percentiles, busiest rooms, memory)
and writes the same frame to every local admin connection; ``health:status``
goes out when the health status changes. Each node reports its own
figures, so delivery stays local.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from server.core import protocol
from server.core.tasks import cancel_and_wait
from server.ops.health import Health, rss_bytes
from server.ops.stats import Stats
from server.realtime.hub import Hub, Target
from server.services.node_state import NodeState

log = logging.getLogger("switchboard.admin")

#: Rooms listed in ``metrics:update``'s ``rooms.top``.
TOP_ROOMS = 5


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
                "clientErrorRate": round(self.stats.client_error_ratio(), 4),
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
