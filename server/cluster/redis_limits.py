"""Cluster-wide rate and connection limits in Redis (the ``server/core/limits.py`` interfaces).

- :class:`RedisRateLimiter`: the same continuous token buckets, kept in Redis
  by one Lua script (Redis' clock, so nodes' clocks need not agree).
- :class:`RedisConnectionLimiter`: per (user, namespace) and per IP counts as
  hashes node → count, so a dead node's share can be dropped.

Each keeps this node's own share in the single-node base class too, which
decides while Redis is unreachable and rebuilds this node's records after.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from server.cluster.redis_link import ClusterLink, RedisUnavailable
from server.core.config import RateLimit
from server.core.limits import ConnectionLimiter, Decision, RateLimiter

# Buckets untouched for a full window are full again; Redis may forget them a bit later.
_BUCKET_EXPIRE_SLACK_MS = 1000


class RedisRateLimiter(RateLimiter):
    """Cluster-wide token buckets (the :class:`~server.core.limits.RateLimiter` interface).

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
        self._bucket = link.script("rate_limit_token_bucket")

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
            return self.decide(user_id, bucket, cost)
        return Decision(bool(allowed), int(retry_ms), limit.count, limit.window_secs)

    def hit_now(self, user_id: str, bucket: str, cost: float = 1.0) -> Decision | None:
        return None  # the cluster's bucket is in Redis: await hit()

    async def reset(self, user_id: str) -> None:
        await super().reset(user_id)
        keys = [self.link.key("rate", bucket, user_id) for bucket in self._limits]
        try:
            await self.link.run("rate_limit.reset", self.link.redis.delete(*keys))
        except RedisUnavailable:
            pass


class RedisConnectionLimiter(ConnectionLimiter):
    """Cluster-wide connection counts (the :class:`~server.core.limits.ConnectionLimiter` API).

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
        self._acquire = link.script("hash_total", "connection_acquire")
        self._release = link.script("connection_release")

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
