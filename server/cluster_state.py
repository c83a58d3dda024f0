"""Cluster-wide state in Redis: presence, rate and connection limits, live nodes.

With ``SWITCHBOARD_REDIS_URL`` set, :class:`server.app.Node` uses these
classes instead of the single-node ones in ``server/presence.py`` and
``server/limits.py``; they have the same interface and answer for the
whole cluster:

- :class:`RedisPresence`: a user is online while any connection on any node
  is open. Per user a hash ``{p}:presence:{user}`` maps node → connection
  count, so ``connect``/``disconnect`` report the cluster-wide first and last.
  It also records, per node, the rooms each user joined there (the
  ``joined``/``left`` hooks), which is what a dead node's users left.
- :class:`RedisRateLimiter`: the same continuous token buckets, kept in Redis
  by one Lua script (Redis' clock, so nodes' clocks need not agree).
- :class:`RedisConnectionLimiter`: per (user, namespace) and per IP counts as
  hashes node → count, so a dead node's share can be dropped.
- :class:`NodeRegistry`: every node refreshes its entry in the ZSET
  ``{p}:nodes`` several times per heartbeat interval; a node not refreshed for
  :data:`NODE_DEAD_AFTER_INTERVALS` intervals is dead, and one live node (a
  short ``SET NX`` lock) drops its entries and announces ``room:user_left``
  (reason ``node_lost``) and ``user:status_changed`` offline for its users.

Every class keeps this node's own share in memory as well (the single-node
base class does the counting). When Redis is unreachable they answer from
that local share, log once, and skip Redis until the registry's next
heartbeat reaches it again; it then rewrites this node's records from the
local share (a Redis restart loses them; a long outage may have got this node
reaped), so the cluster view heals within one tick.

Typing state stays node-local: typing events are broadcast through the
mirror anyway, and a dead node's typing timers die with it (clients time
typing indicators out themselves).

Keys live in one Redis (no Redis Cluster hash tags): the reaper's Lua script
touches keys it computes.

Example::

    state = ClusterState(redis_client, config, hub, db)
    await state.start()                  # registers the node, starts the heartbeat
    first = await state.presence.connect("alice")
    await state.stop()
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, TypeVar

import orjson
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from models import chat as chat_db
from server.config import Config, RateLimit
from server.db import Database
from server.hub import Hub, Target
from server.limits import ConnectionLimiter, Decision, RateLimiter
from server.presence import Presence
from server.tasks import cancel_and_wait

log = logging.getLogger("switchboard.cluster")

T = TypeVar("T")

#: A Redis call slower than this counts as Redis being unreachable.
REDIS_OP_TIMEOUT_SECS = 1.0
#: The registry refreshes the node and looks for dead ones this often per heartbeat interval.
REGISTRY_TICKS_PER_INTERVAL = 4
#: A node not refreshed for this many heartbeat intervals is dead. With a tick
#: every quarter interval, a killed node is reaped within 1.75 intervals.
NODE_DEAD_AFTER_INTERVALS = 1.5
#: How many reaped node ids :attr:`NodeRegistry.reaped` remembers.
REAPED_NODES_KEPT = 100
# Buckets untouched for a full window are full again; Redis may forget them a bit later.
_BUCKET_EXPIRE_SLACK_MS = 1000

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)

# -- Lua ---------------------------------------------------------------------------------

_SUM = """
local function total(key)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', key)) do n = n + tonumber(v) end
  return n
end
"""

# KEYS: presence hash, status, node's users set, online set. ARGV: node, user.
_CONNECT = (
    _SUM
    + """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[3], ARGV[2])
if total(KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], 'online')
  redis.call('SADD', KEYS[4], ARGV[2])
  return 1
end
return 0
"""
)

# KEYS: presence hash, status, node's users set, online set, user's rooms on the node,
# node's room-users set, node's who hash. ARGV: node, user.
_DISCONNECT = (
    _SUM
    + """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[2])
  redis.call('DEL', KEYS[5])
  redis.call('SREM', KEYS[6], ARGV[2])
  redis.call('HDEL', KEYS[7], ARGV[2])
end
if total(KEYS[1]) <= 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[4], ARGV[2])
  return 1
end
return 0
"""
)

# KEYS: presence hash, status. ARGV: status.
_SET_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('SET', KEYS[2], ARGV[1]) end
return 0
"""

# KEYS: bucket hash. ARGV: capacity, refill per second, cost, expire ms.
# Returns {allowed, retry_after_ms}. Same arithmetic as RateLimiter.hit.
_TOKEN_BUCKET = """
local capacity, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or capacity
local ts = tonumber(b[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed, retry = 1, 0
if tokens >= cost then
  tokens = tokens - cost
else
  allowed, retry = 0, math.ceil((cost - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {allowed, retry}
"""

# KEYS: user hash, IP hash, node's connection-keys set. ARGV: node, per user, per IP.
_ACQUIRE = (
    _SUM
    + """
if total(KEYS[1]) >= tonumber(ARGV[2]) then return 'user' end
if total(KEYS[2]) >= tonumber(ARGV[3]) then return 'ip' end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('SADD', KEYS[3], KEYS[1], KEYS[2])
return ''
"""
)

# KEYS: user hash, IP hash, node's connection-keys set. ARGV: node.
_RELEASE = """
for i = 1, 2 do
  if redis.call('HINCRBY', KEYS[i], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[i], ARGV[1])
    redis.call('SREM', KEYS[3], KEYS[i])
  end
end
return 0
"""

# KEYS: nodes zset, node info hash. ARGV: node, dead after (secs), node info JSON.
# Returns {1 if the node was not registered, dead node ids...}. Redis' clock.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local missing = redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local out = {missing and 1 or 0}
local limit = string.format('(%.6f', now - tonumber(ARGV[2]))
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', limit)) do
  table.insert(out, node)
end
return out
"""

# Drop everything a node recorded. ARGV: prefix, node, forget (1: leave the registry
# too), other registered nodes... Returns {users now offline everywhere,
# {{user, who JSON, rooms the user is in on no other node...}...}}.
_DROP_NODE = (
    _SUM
    + """
local p, node = ARGV[1], ARGV[2]
local function k(...) return table.concat({p, ...}, ':') end
local offline = {}
local users_key = k('node', node, 'users')
for _, u in ipairs(redis.call('SMEMBERS', users_key)) do
  local h = k('presence', u)
  redis.call('HDEL', h, node)
  if total(h) <= 0 then
    redis.call('DEL', h, k('status', u))
    redis.call('SREM', k('online'), u)
    table.insert(offline, u)
  end
end
local left = {}
local roomusers_key = k('node', node, 'roomusers')
local who_key = k('node', node, 'who')
for _, u in ipairs(redis.call('SMEMBERS', roomusers_key)) do
  local rooms_key = k('rooms', node, u)
  local entry = {u, redis.call('HGET', who_key, u) or ''}
  for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
    local elsewhere = false
    for i = 4, #ARGV do
      if redis.call('SISMEMBER', k('rooms', ARGV[i], u), room) == 1 then
        elsewhere = true
        break
      end
    end
    if not elsewhere then table.insert(entry, room) end
  end
  if #entry > 2 then table.insert(left, entry) end
  redis.call('DEL', rooms_key)
end
local connkeys_key = k('node', node, 'connkeys')
for _, key in ipairs(redis.call('SMEMBERS', connkeys_key)) do redis.call('HDEL', key, node) end
redis.call('DEL', users_key, roomusers_key, who_key, connkeys_key)
if ARGV[3] == '1' then
  redis.call('ZREM', k('nodes'), node)
  redis.call('HDEL', k('nodeinfo'), node)
end
return {offline, left}
"""
)


def _text(value: Any) -> str:
    """A Redis reply item as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisUnavailable(Exception):
    """Redis did not answer (or is known to be down); use the local answer."""


class ClusterLink:
    """The Redis client, key prefix and node id the cluster classes share.

    It is also the circuit breaker: after a failed call, :meth:`run` raises
    :class:`RedisUnavailable` at once (no waiting on a dead server on every
    connect) until :class:`NodeRegistry`'s heartbeat gets through again, and
    ``dirty`` tells the registry that this node's records need rewriting.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        node_id: str,
        timeout_secs: float = REDIS_OP_TIMEOUT_SECS,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.node_id = node_id
        self.timeout_secs = timeout_secs
        #: The last call failed; calls are skipped until the heartbeat succeeds.
        self.down = False
        #: Something happened locally only; this node's records must be rewritten.
        self.dirty = False

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def run(self, what: str, call: Awaitable[T], *, probe: bool = False) -> T:
        """Await a Redis call; raise :class:`RedisUnavailable` if it fails.

        Only a ``probe`` (the registry's heartbeat) is attempted while down.
        """
        if self.down and not probe:
            if asyncio.iscoroutine(call):
                call.close()
            self.dirty = True
            raise RedisUnavailable(what)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that arrives as the call completes (stop would hang).
            async with asyncio.timeout(self.timeout_secs):
                return await call
        except _REDIS_ERRORS as exc:
            self.dirty = True
            if not self.down:
                self.down = True
                log.warning(
                    "Redis unreachable (%s: %s: %s): presence and limits fall back to this "
                    "node's own figures until it answers again",
                    what, type(exc).__name__, exc,
                )  # fmt: skip
            raise RedisUnavailable(what) from exc

    def mark_up(self) -> None:
        if self.down:
            self.down = False
            log.warning("Redis reachable again: cluster presence and limits resume")


class RedisPresence(Presence):
    """Cluster-wide presence (the :class:`~server.presence.Presence` interface).

    The base class keeps this node's own connections and statuses, which
    answer while Redis is unreachable and rebuild this node's records after.

    Example::

        presence = RedisPresence(link)
        if await presence.connect("alice"):      # first connection in the cluster
            announce("alice", "online")
        await presence.joined({"userId": "alice", ...}, "general")
    """

    def __init__(self, link: ClusterLink) -> None:
        super().__init__()
        self.link = link
        r = link.redis
        self._connect = r.register_script(_CONNECT)
        self._disconnect = r.register_script(_DISCONNECT)
        self._set_status = r.register_script(_SET_STATUS)
        # This node's room records (user → rooms joined here, user → public info).
        self._rooms: dict[str, set[str]] = {}
        self._who: dict[str, dict[str, Any]] = {}

    def _user_keys(self, user_id: str) -> list[str]:
        k, node = self.link.key, self.link.node_id
        return [k("presence", user_id), k("status", user_id), k("node", node, "users"),
                k("online")]  # fmt: skip

    async def connect(self, user_id: str) -> bool:
        first_here = await super().connect(user_id)
        try:
            first = await self.link.run(
                "presence.connect",
                self._connect(self._user_keys(user_id), [self.link.node_id, user_id]),
            )
        except RedisUnavailable:
            return first_here
        return bool(first)

    async def disconnect(self, user_id: str) -> bool:
        last_here = await super().disconnect(user_id)
        if last_here:
            self._rooms.pop(user_id, None)
            self._who.pop(user_id, None)
        k, node = self.link.key, self.link.node_id
        keys = [*self._user_keys(user_id), k("rooms", node, user_id),
                k("node", node, "roomusers"), k("node", node, "who")]  # fmt: skip
        try:
            last = await self.link.run(
                "presence.disconnect", self._disconnect(keys, [node, user_id])
            )
        except RedisUnavailable:
            return last_here
        return bool(last)

    async def set_status(self, user_id: str, status: str) -> None:
        await super().set_status(user_id, status)
        keys = self._user_keys(user_id)[:2]
        try:
            await self.link.run("presence.status", self._set_status(keys, [status]))
        except RedisUnavailable:
            pass

    async def statuses(self, user_ids: Iterable[str]) -> dict[str, str]:
        ids = list(user_ids)
        if not ids:
            return {}
        try:
            values = await self.link.run(
                "presence.statuses", self.link.redis.mget([self.link.key("status", u) for u in ids])
            )
        except RedisUnavailable:
            return await super().statuses(ids)
        return {uid: _text(v) if v else "offline" for uid, v in zip(ids, values, strict=True)}

    async def online_users(self) -> list[str]:
        try:
            members = await self.link.run(
                "presence.online", self.link.redis.smembers(self.link.key("online"))
            )
        except RedisUnavailable:
            return await super().online_users()
        return sorted(_text(m) for m in members)

    async def connections_by_node(self, user_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Open connections of each user per node (this node's own if Redis is down)."""
        ids = list(user_ids)
        try:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for uid in ids:
                    pipe.hgetall(self.link.key("presence", uid))
                rows = await self.link.run("presence.by_node", pipe.execute())
        except RedisUnavailable:
            return {u: {self.link.node_id: self._connections.get(u, 0)} for u in ids}
        return {
            uid: {n.decode(): int(c) for n, c in row.items()}
            for uid, row in zip(ids, rows, strict=True)
        }

    async def user_connections(self, user_id: str) -> int:
        """The user's open connections on every node, all namespaces."""
        by_node = await self.connections_by_node([user_id])
        return sum(by_node[user_id].values())

    async def joined(self, user: Mapping[str, Any], room_id: str) -> None:
        user_id = str(user["userId"])
        self._rooms.setdefault(user_id, set()).add(room_id)
        self._who[user_id] = dict(user)
        k, node = self.link.key, self.link.node_id
        try:
            async with self.link.redis.pipeline(transaction=True) as pipe:
                pipe.sadd(k("rooms", node, user_id), room_id)
                pipe.sadd(k("node", node, "roomusers"), user_id)
                pipe.hset(k("node", node, "who"), user_id, orjson.dumps(dict(user)))
                await self.link.run("presence.joined", pipe.execute())
        except RedisUnavailable:
            pass

    async def left(self, user_id: str, room_id: str) -> None:
        rooms = self._rooms.get(user_id)
        if rooms is not None:
            rooms.discard(room_id)
        try:
            await self.link.run(
                "presence.left",
                self.link.redis.srem(self.link.key("rooms", self.link.node_id, user_id), room_id),
            )
        except RedisUnavailable:
            pass

    def in_room_here(self, user_id: str, room_id: str) -> bool:
        return room_id in self._rooms.get(user_id, ())

    def connected_here(self, user_id: str) -> bool:
        return user_id in self._connections

    async def nodes(self) -> list[dict[str, Any]]:
        """The live nodes, as their heartbeats last described them."""
        try:
            async with self.link.redis.pipeline(transaction=True) as pipe:
                pipe.zrange(self.link.key("nodes"), 0, -1)
                pipe.hgetall(self.link.key("nodeinfo"))
                ids, infos = await self.link.run("nodes", pipe.execute())
        except RedisUnavailable:
            return []
        out = []
        for raw in ids:
            node = raw.decode()
            info = orjson.loads(infos[raw]) if raw in infos else {"id": node}
            out.append({**info, "self": node == self.link.node_id})
        return out

    async def resync(self) -> None:
        """Write this node's share (connections, statuses, rooms) back to Redis."""
        k, node = self.link.key, self.link.node_id
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for user_id, count in self._connections.items():
                pipe.hset(k("presence", user_id), node, count)
                pipe.sadd(k("node", node, "users"), user_id)
                pipe.sadd(k("online"), user_id)
                pipe.set(k("status", user_id), self._status.get(user_id, "online"))
            for user_id, rooms in self._rooms.items():
                if rooms and user_id in self._connections:
                    pipe.sadd(k("rooms", node, user_id), *rooms)
                    pipe.sadd(k("node", node, "roomusers"), user_id)
                    pipe.hset(k("node", node, "who"), user_id, orjson.dumps(self._who[user_id]))
            await self.link.run("presence.resync", pipe.execute(), probe=True)


class RedisRateLimiter(RateLimiter):
    """Cluster-wide token buckets (the :class:`~server.limits.RateLimiter` interface).

    A user's bucket is shared by all their connections on all nodes; the
    Lua script refills it by Redis' clock. Without Redis, the base class'
    local buckets decide.

    Example::

        limiter = RedisRateLimiter(link, config.rate_limits)
        decision = await limiter.hit("alice", "messages")
    """

    def __init__(self, link: ClusterLink, limits: Mapping[str, RateLimit]) -> None:
        super().__init__(limits)
        self.link = link
        self._bucket = link.redis.register_script(_TOKEN_BUCKET)

    async def hit(self, user_id: str, bucket: str, cost: float = 1.0) -> Decision:
        limit = self._limits[bucket]
        rate = limit.count / limit.window_secs  # tokens per second
        expire_ms = math.ceil(limit.window_secs * 1000) + _BUCKET_EXPIRE_SLACK_MS
        try:
            allowed, retry_ms = await self.link.run(
                "rate_limit",
                self._bucket(
                    [self.link.key("rate", bucket, user_id)],
                    [limit.count, repr(rate), repr(cost), expire_ms],
                ),
            )
        except RedisUnavailable:
            return await super().hit(user_id, bucket, cost)
        return Decision(bool(allowed), int(retry_ms), limit.count, limit.window_secs)

    async def reset(self, user_id: str) -> None:
        await super().reset(user_id)
        keys = [self.link.key("rate", bucket, user_id) for bucket in self._limits]
        try:
            await self.link.run("rate_limit.reset", self.link.redis.delete(*keys))
        except RedisUnavailable:
            pass


class RedisConnectionLimiter(ConnectionLimiter):
    """Cluster-wide connection counts (the :class:`~server.limits.ConnectionLimiter` interface).

    Each count is a hash node → connections, so the limit holds across nodes
    and a dead node's share can be dropped. The base class keeps this node's
    share; it decides alone while Redis is unreachable.

    Example::

        limiter = RedisConnectionLimiter(link, per_user=5, per_ip=20)
        exceeded = await limiter.acquire("alice", "chat", "10.0.0.7")   # None: admitted
    """

    def __init__(self, link: ClusterLink, per_user: int, per_ip: int) -> None:
        super().__init__(per_user, per_ip)
        self.link = link
        self._acquire = link.redis.register_script(_ACQUIRE)
        self._release = link.redis.register_script(_RELEASE)

    def _keys(self, user_id: str, namespace: str, ip: str) -> list[str]:
        k = self.link.key
        return [k("conns", "user", namespace, user_id), k("conns", "ip", ip),
                k("node", self.link.node_id, "connkeys")]  # fmt: skip

    async def acquire(self, user_id: str, namespace: str, ip: str) -> str | None:
        try:
            exceeded = await self.link.run(
                "connection_limit.acquire",
                self._acquire(
                    self._keys(user_id, namespace, ip),
                    [self.link.node_id, self.per_user, self.per_ip],
                ),
            )
        except RedisUnavailable:
            return await super().acquire(user_id, namespace, ip)
        if exceeded:
            return str(exceeded.decode())
        # Admitted by the cluster: count it in this node's share too.
        key = (user_id, namespace)
        self._users[key] = self._users.get(key, 0) + 1
        self._ips[ip] = self._ips.get(ip, 0) + 1
        return None

    async def release(self, user_id: str, namespace: str, ip: str) -> None:
        await super().release(user_id, namespace, ip)
        try:
            await self.link.run(
                "connection_limit.release",
                self._release(self._keys(user_id, namespace, ip), [self.link.node_id]),
            )
        except RedisUnavailable:
            pass

    async def connected(self, namespace: str, user_ids: Iterable[str]) -> set[str]:
        """Users with a ``namespace`` connection on any live node (this node's alone
        while Redis is unreachable)."""
        ids = list(user_ids)
        if not ids:
            return set()
        try:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for uid in ids:
                    pipe.hvals(self.link.key("conns", "user", namespace, uid))
                rows = await self.link.run("connection_limit.connected", pipe.execute())
        except RedisUnavailable:
            return await super().connected(namespace, ids)
        return {uid for uid, row in zip(ids, rows, strict=True) if sum(map(int, row)) > 0}

    async def resync(self) -> None:
        """Write this node's share back to Redis."""
        k, node = self.link.key, self.link.node_id
        connkeys = k("node", node, "connkeys")
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for (user_id, namespace), count in self._users.items():
                key = k("conns", "user", namespace, user_id)
                pipe.hset(key, node, count)
                pipe.sadd(connkeys, key)
            for ip, count in self._ips.items():
                key = k("conns", "ip", ip)
                pipe.hset(key, node, count)
                pipe.sadd(connkeys, key)
            await self.link.run("connection_limit.resync", pipe.execute(), probe=True)


class NodeRegistry:
    """Heartbeat, dead-node reaper and resync for one node.

    Every ``interval / REGISTRY_TICKS_PER_INTERVAL`` seconds it refreshes the
    node in ``{p}:nodes`` (with a small info record for ``admin:stats``), and
    reaps nodes not refreshed for ``NODE_DEAD_AFTER_INTERVALS`` intervals.
    Reaping announces, through the hub (so every node's members hear it),
    ``room:user_left`` with reason ``node_lost`` for rooms the dead node's
    users are in on no other node, and ``user:status_changed`` offline for
    those now offline everywhere.

    Example::

        registry = NodeRegistry(link, presence, limiter, hub, db, interval_secs=25.0)
        await registry.start()
        ...
        await registry.stop()
    """

    def __init__(
        self,
        link: ClusterLink,
        presence: RedisPresence,
        connection_limiter: RedisConnectionLimiter,
        hub: Hub,
        db: Database,
        interval_secs: float,
    ) -> None:
        self.link = link
        self.presence = presence
        self.connection_limiter = connection_limiter
        self.hub = hub
        self.db = db
        self.interval = interval_secs
        self.dead_after_secs = interval_secs * NODE_DEAD_AFTER_INTERVALS
        self.started_at = time.time()
        self._heartbeat = link.redis.register_script(_HEARTBEAT)
        self._drop = link.redis.register_script(_DROP_NODE)
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
            await self._announce(result)
        except RedisUnavailable:
            pass

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
                "connections": len(self.hub.connections),
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
        dead = [_text(n) for n in reply[1:] if _text(n) != self.link.node_id]
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
        await self._announce(result)

    async def _drop_node(self, node: str, *, forget: bool, probe: bool = False) -> list[Any]:
        registered = await self.link.run(
            "nodes", self.link.redis.zrange(self.link.key("nodes"), 0, -1), probe=probe
        )
        # The other registered nodes: a room a user is in on one of them was not left.
        others = [_text(n) for n in registered if _text(n) != node]
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
        await self._announce(result)

    async def _announce(self, result: list[Any]) -> None:
        offline = [u.decode() for u in result[0]]
        for entry in result[1]:
            user_id = entry[0].decode()
            who = orjson.loads(entry[1]) if entry[1] else {"userId": user_id}
            for raw in entry[2:]:
                room_id = raw.decode()
                if self.presence.in_room_here(user_id, room_id):
                    continue  # still here (a resync of this node's own records)
                # The dead node's typing timers died with it: clear any indicator
                # (harmless for someone who was not typing).
                self.hub.publish(
                    Target.room(room_id), "user:stopped_typing", {"roomId": room_id, **who}
                )
                self.hub.publish(
                    Target.room(room_id),
                    "room:user_left",
                    {"roomId": room_id, "user": who, "reason": "node_lost"},
                )
        for user_id in offline:
            if self.presence.connected_here(user_id):
                continue  # a resync of this node's own records; still online
            try:
                rooms = await self.db.run("user.rooms", chat_db.member_room_ids, user_id)
            except Exception:
                log.warning("could not read the rooms of %s to announce them offline",
                            user_id, exc_info=True)  # fmt: skip
                continue
            if rooms:
                self.hub.publish_rooms(
                    rooms, "user:status_changed", {"userId": user_id, "status": "offline"}
                )


class ClusterState:
    """The cluster-wide presence, limiters and node registry of one node.

    Example::

        state = ClusterState(redis_client, config, hub, db)
        node_deps = {"presence": state.presence, "rate_limiter": state.rate_limiter, ...}
        await state.start()
    """

    def __init__(self, redis: aioredis.Redis, config: Config, hub: Hub, db: Database) -> None:
        self.link = ClusterLink(redis, config.redis_prefix, config.node_id)
        self.presence = RedisPresence(self.link)
        self.rate_limiter = RedisRateLimiter(self.link, config.rate_limits)
        self.connection_limiter = RedisConnectionLimiter(
            self.link, config.max_connections_per_user, config.max_connections_per_ip
        )
        self.registry = NodeRegistry(
            self.link, self.presence, self.connection_limiter, hub, db, config.heartbeat_interval
        )

    async def start(self) -> None:
        await self.registry.start()

    async def stop(self) -> None:
        await self.registry.stop()
