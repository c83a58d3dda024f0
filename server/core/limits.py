"""Rate limits (token buckets per user and event class) and connection limits.

Both are small classes with async methods so the Redis-backed, cluster-wide
versions can stand behind the same interface; these in-memory ones serve a
single node. Buckets refill continuously: ``count`` tokens per
``window_secs``, so a client that waits ``retryAfter`` ms can send again.

Example::

    limiter = RateLimiter(config.rate_limits)
    decision = limiter.hit_now(user_id, "messages") or await limiter.hit(user_id, "messages")
    if not decision.allowed:
        raise RateLimited(details=decision.details())
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from server.core.config import RateLimit

# Buckets untouched for this long are full again and can be forgotten.
_BUCKET_IDLE_FORGET_SECS = 600.0


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_ms: int
    limit: int
    window_secs: float

    def details(self) -> dict[str, Any]:
        return {
            "retryAfter": self.retry_after_ms,
            "limit": self.limit,
            "window": int(self.window_secs * 1000),
        }


class RateLimiter:
    """In-memory token buckets keyed by (user, class)."""

    def __init__(
        self, limits: Mapping[str, RateLimit], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = dict(limits)
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # tokens, updated
        self._last_prune = clock()

    async def hit(self, user_id: str, bucket: str, cost: float = 1.0) -> Decision:
        return self.decide(user_id, bucket, cost)

    def hit_now(self, user_id: str, bucket: str, cost: float = 1.0) -> Decision | None:
        """:meth:`hit` answered at once, or None when the answer needs I/O (then await ``hit``).

        A frame's handler asks this first: these buckets answer without
        waiting, and a coroutine per frame is a measurable share of a lone
        send's time on a cold loop (bench.stages).
        """
        return self.decide(user_id, bucket, cost)

    def decide(self, user_id: str, bucket: str, cost: float = 1.0) -> Decision:
        """Take ``cost`` from this node's own bucket (what :meth:`hit` does here)."""
        limit = self._limits[bucket]
        rate = limit.count / limit.window_secs  # tokens per second
        now = self._clock()
        key = (user_id, bucket)
        tokens, updated = self._buckets.get(key, (float(limit.count), now))
        tokens = min(float(limit.count), tokens + (now - updated) * rate)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            allowed, retry_ms = True, 0
        else:
            self._buckets[key] = (tokens, now)
            allowed, retry_ms = False, math.ceil((cost - tokens) / rate * 1000)
        if now - self._last_prune > _BUCKET_IDLE_FORGET_SECS:
            self._prune(now)
        return Decision(allowed, retry_ms, limit.count, limit.window_secs)

    async def reset(self, user_id: str) -> None:
        for key in [k for k in self._buckets if k[0] == user_id]:
            del self._buckets[key]

    def _prune(self, now: float) -> None:
        self._last_prune = now
        stale = [k for k, (_, t) in self._buckets.items() if now - t > _BUCKET_IDLE_FORGET_SECS]
        for key in stale:
            del self._buckets[key]


class ConnectionLimiter:
    """Counts open connections per (user, namespace) and per client IP."""

    def __init__(self, per_user: int, per_ip: int) -> None:
        self.per_user = per_user
        self.per_ip = per_ip
        self._users: dict[tuple[str, str], int] = {}
        self._ips: dict[str, int] = {}

    async def acquire(self, user_id: str, namespace: str, ip: str) -> str | None:
        """Take a slot; returns None on success or the name of the exceeded limit."""
        key = (user_id, namespace)
        if self._users.get(key, 0) >= self.per_user:
            return "user"
        if self._ips.get(ip, 0) >= self.per_ip:
            return "ip"
        self._users[key] = self._users.get(key, 0) + 1
        self._ips[ip] = self._ips.get(ip, 0) + 1
        return None

    async def release(self, user_id: str, namespace: str, ip: str) -> None:
        _decrement(self._users, (user_id, namespace))
        _decrement(self._ips, ip)

    async def connected(self, namespace: str, user_ids: Iterable[str]) -> set[str]:
        """Which of ``user_ids`` hold at least one ``namespace`` connection."""
        return {u for u in user_ids if self._users.get((u, namespace), 0) > 0}


def _decrement(counts: dict[Any, int], key: Any) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
