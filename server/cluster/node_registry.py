"""The node registry: heartbeat, dead-node reaper and resync of one node's records.

Every node refreshes its entry in the ZSET ``{p}:nodes`` several times per
heartbeat interval; a node not refreshed for :data:`NODE_DEAD_AFTER_INTERVALS`
intervals is dead (killed, partitioned), and one live node (a short ``SET NX``
lock) drops its presence and connection counts. The heartbeat is also the
probe of :class:`~server.cluster.redis_link.ClusterLink`'s circuit breaker: when it
gets through after an outage, this node rewrites its own records.

What dropped records held goes to a callback as a :class:`NodeLoss`; the
registry publishes nothing itself. The application wires the callback to the
chat announcements (``server/services/node_loss.py``).

Example::

    registry = NodeRegistry(link, presence, limiter, config.heartbeat_interval,
                            local_connections=lambda: len(hub.connections), on_loss=on_loss)
    await registry.start()               # registers the node, starts the heartbeat
    ...
    await registry.stop()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from server.cluster.redis_limits import RedisConnectionLimiter
from server.cluster.redis_link import ClusterLink, RedisUnavailable, as_text
from server.cluster.redis_presence import RedisPresence
from server.core.tasks import cancel_and_wait

log = logging.getLogger("switchboard.cluster")

#: The registry refreshes the node and looks for dead ones this often per heartbeat interval.
REGISTRY_TICKS_PER_INTERVAL = 4
#: A node not refreshed for this many heartbeat intervals is dead. With a tick
#: every quarter interval, a killed node is reaped within 1.75 intervals.
NODE_DEAD_AFTER_INTERVALS = 1.5
#: How many reaped node ids :attr:`NodeRegistry.reaped` remembers.
REAPED_NODES_KEPT = 100


@dataclass(frozen=True, slots=True)
class RoomsLeft:
    """A user of a dropped node and the rooms they are in on no other node."""

    #: The user as :meth:`~server.realtime.presence.Presence.joined` recorded it
    #: (``userId``, ``username``, ``displayName``; ``userId`` alone if unknown).
    user: Mapping[str, Any]
    room_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeLoss:
    """What dropping ``node_id``'s records lost: rooms left, users offline everywhere."""

    node_id: str
    left: tuple[RoomsLeft, ...]
    offline: tuple[str, ...]


class NodeRegistry:
    """Heartbeat, dead-node reaper and resync for one node.

    Every ``interval / REGISTRY_TICKS_PER_INTERVAL`` seconds it refreshes the
    node in ``{p}:nodes`` (with a small info record for ``admin:stats``), and
    reaps nodes not refreshed for ``NODE_DEAD_AFTER_INTERVALS`` intervals.
    Whenever it drops a node's records (a dead node reaped, this node
    leaving, stale records of this node rewritten) it hands what they held
    and no live connection still holds to ``on_loss``: the users now offline
    everywhere, and per user the rooms they are in on no other node.

    Example::

        async def on_loss(loss: NodeLoss) -> None:
            log.info("node %s lost %d users", loss.node_id, len(loss.offline))

        registry = NodeRegistry(
            link, presence, limiter, interval_secs=25.0,
            local_connections=lambda: 0, on_loss=on_loss,
        )
        await registry.start()
        ...
        await registry.stop()
    """

    def __init__(
        self,
        link: ClusterLink,
        presence: RedisPresence,
        connection_limiter: RedisConnectionLimiter,
        interval_secs: float,
        *,
        local_connections: Callable[[], int],
        on_loss: Callable[[NodeLoss], Awaitable[None]],
    ) -> None:
        self.link = link
        self.presence = presence
        self.connection_limiter = connection_limiter
        #: This node's open connections, for the info record ``admin:stats`` shows.
        self.local_connections = local_connections
        #: Called with what dropping a node's records lost (see the class docstring).
        self.on_loss = on_loss
        self.interval = interval_secs
        self.dead_after_secs = interval_secs * NODE_DEAD_AFTER_INTERVALS
        self.started_at = time.time()
        self._heartbeat = link.script("node_heartbeat")
        self._drop = link.script("hash_total", "node_drop")
        self._task: asyncio.Task[None] | None = None
        #: The last nodes this node reaped (for logs and tests).
        self.reaped: deque[str] = deque(maxlen=REAPED_NODES_KEPT)

    async def start(self) -> None:
        """Register (dropping records of an earlier process with this id) and start ticking."""
        # A first tick now: records left by a crashed process with the same node
        # id are cleared before this one accepts connections.
        self.link.dirty = True
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="node-registry")

    async def stop(self) -> None:
        """Stop ticking and leave the registry (connections are closed by then)."""
        await cancel_and_wait(self._task)
        self._task = None
        if self.link.down:
            return
        try:
            result = await self._drop_node(self.link.node_id, forget=True)
        except RedisUnavailable:
            return
        await self._report(self.link.node_id, result)

    async def members(self) -> frozenset[str] | None:
        """The registered nodes (a killed one until it is reaped); None if Redis is down."""
        try:
            registered = await self.link.run(
                "nodes", self.link.redis.zrange(self.link.key("nodes"), 0, -1)
            )
        except RedisUnavailable:
            return None
        return frozenset(as_text(n) for n in registered) | {self.link.node_id}

    async def _run(self) -> None:
        period = self.interval / REGISTRY_TICKS_PER_INTERVAL
        while True:
            await asyncio.sleep(period)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # One failed tick must not end the heartbeat; the next may work.
                log.exception("node registry tick failed")

    def _info(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.link.node_id,
                "startedAt": round(self.started_at, 3),
                "uptimeSeconds": round(time.time() - self.started_at, 3),
                "connections": self.local_connections(),
            }
        )

    async def tick(self) -> None:
        """One heartbeat: refresh this node, rewrite it if needed, reap dead nodes."""
        keys = [self.link.key("nodes"), self.link.key("nodeinfo")]
        args: list[str | bytes] = [self.link.node_id, repr(self.dead_after_secs), self._info()]
        try:
            reply = await self.link.run("heartbeat", self._heartbeat(keys, args), probe=True)
        except RedisUnavailable:
            return
        self.link.mark_up()
        missing = bool(reply[0])
        dead = [as_text(n) for n in reply[1:] if as_text(n) != self.link.node_id]
        if missing or self.link.dirty:
            await self._resync(initial=missing)
        for node in dead:
            await self._reap(node)

    async def _resync(self, *, initial: bool) -> None:
        if not initial:
            log.warning("rewriting node %s's presence and limits in Redis", self.link.node_id)
        self.link.dirty = False
        try:
            result = await self._drop_node(self.link.node_id, forget=False, probe=True)
            await self.presence.resync()
            await self.connection_limiter.resync()
        except RedisUnavailable:
            return
        await self._report(self.link.node_id, result)

    async def _drop_node(self, node: str, *, forget: bool, probe: bool = False) -> list[Any]:
        registered = await self.link.run(
            "nodes", self.link.redis.zrange(self.link.key("nodes"), 0, -1), probe=probe
        )
        # The other registered nodes: a room a user is in on one of them was not left.
        others = [as_text(n) for n in registered if as_text(n) != node]
        args = [self.link.prefix, node, "1" if forget else "0", *others]
        result: list[Any] = await self.link.run("drop_node", self._drop([], args), probe=probe)
        return result

    async def _reap(self, node: str) -> None:
        lock = self.link.key("reaping", node)
        ms = max(1, int(self.dead_after_secs * 1000))
        try:
            if not await self.link.run(
                "reap.lock", self.link.redis.set(lock, self.link.node_id, nx=True, px=ms)
            ):
                return  # another node is reaping it
            result = await self._drop_node(node, forget=True)
        except RedisUnavailable:
            return
        self.reaped.append(node)
        offline, left = result
        log.warning(
            "node %s stopped heartbeating for over %.1fs: reaped; %d user(s) offline, "
            "%d user(s) left rooms",
            node, self.dead_after_secs, len(offline), len(left),
        )  # fmt: skip
        await self._report(node, result)

    async def _report(self, node: str, result: list[Any]) -> None:
        """Hand the drop script's result to ``on_loss``, less what is still here
        (a resync drops this node's own records, live connections included)."""
        left = []
        for entry in result[1]:
            user_id = as_text(entry[0])
            user = orjson.loads(entry[1]) if entry[1] else {"userId": user_id}
            rooms = [as_text(r) for r in entry[2:]]
            rooms = [r for r in rooms if not self.presence.in_room_here(user_id, r)]
            if rooms:
                left.append(RoomsLeft(user, tuple(rooms)))
        offline = [as_text(u) for u in result[0]]
        offline = [u for u in offline if not self.presence.connected_here(u)]
        if left or offline:
            await self.on_loss(NodeLoss(node, tuple(left), tuple(offline)))
