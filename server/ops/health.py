"""Health: liveness, readiness (real pings) and the WebSocket health summary.

Thresholds are documented here and in the README:

- ``unhealthy``: the database does not answer.
- ``degraded``: Redis (when configured) is down, or the event loop lags more
  than ``LOOP_LAG_DEGRADED_SECS``, or more than ``ERROR_RATE_DEGRADED`` of
  recent events failed on the server's side (status 500 and up; a client's
  unknown events or invalid data show as ``clientErrorRate`` only).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from server.core.tasks import cancel_and_wait
from server.ops.stats import Stats
from server.realtime.hub import Hub
from server.store.db import Database

LOOP_LAG_DEGRADED_SECS = 0.5
ERROR_RATE_DEGRADED = 0.05
# A health probe must answer quickly even when Redis hangs.
REDIS_PING_TIMEOUT_SECS = 2.0
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process (reads /proc: call off the loop)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LoopMonitor:
    """Measures event-loop lag with a periodic timer and keeps the latest value."""

    def __init__(self, interval_secs: float = 0.5, on_lag: Callable[[float], None] | None = None):
        self.interval = interval_secs
        self.lag_secs = 0.0
        self._on_lag = on_lag
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-monitor")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.lag_secs = max(0.0, loop.time() - expected)
            if self._on_lag is not None:
                self._on_lag(self.lag_secs)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


class RedisPing:
    """A real ``PING`` to Redis for readiness: ``await ping()`` → ``(ok, why)``.

    One small client, created on first use in the running loop; redis-py
    reconnects on the next call after Redis comes back.

    Example::

        ping = RedisPing("redis://127.0.0.1:6379/0")
        ok, why = await ping()
        await ping.close()
    """

    def __init__(self, url: str, timeout_secs: float = REDIS_PING_TIMEOUT_SECS) -> None:
        self.url = url
        self.timeout_secs = timeout_secs
        self._client: aioredis.Redis | None = None

    async def __call__(self) -> tuple[bool, str | None]:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout_secs,
                socket_connect_timeout=self.timeout_secs,
                single_connection_client=True,
            )
        try:
            await asyncio.wait_for(self._client.ping(), self.timeout_secs)
        except (OSError, TimeoutError, aioredis.RedisError) as exc:
            # Drop the connection so the next probe starts afresh.
            await self.close()
            return False, type(exc).__name__
        return True, None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except (OSError, aioredis.RedisError):
                pass  # the connection is already broken; nothing left to release


class Health:
    """Computes the health documents from live components."""

    def __init__(
        self,
        db: Database,
        hub: Hub,
        stats: Stats,
        loop_monitor: LoopMonitor,
        redis_check: Callable[[], Awaitable[tuple[bool, str | None]]] | None = None,
        room_count: Callable[[], int] | None = None,
    ) -> None:
        self.db = db
        self.hub = hub
        self.stats = stats
        self.loop_monitor = loop_monitor
        self.redis_check = redis_check
        self.room_count = room_count or (lambda: len(hub.active_rooms()))

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Really ping the database and Redis.

        Not ready (503) without the database: nothing acknowledged could be
        stored. Without Redis the node still serves its own clients, so it
        stays in service and reports ``degraded`` with the reason (200).
        """
        db_ok = await self.db.ping()
        checks: dict[str, Any] = {"database": "up" if db_ok else "down"}
        reasons = [] if db_ok else ["database unreachable"]
        redis_ok = True
        if self.redis_check is not None:
            redis_ok, why = await self.redis_check()
            checks["redis"] = "up" if redis_ok else "down"
            if not redis_ok:
                reasons.append(f"redis: {why or 'unreachable'}")
        else:
            checks["redis"] = "disabled"
        status = "not_ready" if not db_ok else "degraded" if not redis_ok else "ready"
        return db_ok, {"status": status, "checks": checks, "reasons": reasons}

    async def __call__(self) -> dict[str, Any]:
        """The ``/health/websocket`` document."""
        db_ok = await self.db.ping()
        redis_state = "disabled"
        reasons: list[str] = []
        if self.redis_check is not None:
            redis_ok, why = await self.redis_check()
            redis_state = "up" if redis_ok else "down"
            if not redis_ok:
                reasons.append(f"redis: {why or 'unreachable'}")
        lag = self.loop_monitor.lag_secs
        error_ratio = self.stats.error_ratio()
        if lag > LOOP_LAG_DEGRADED_SECS:
            reasons.append(f"event loop lag {lag * 1000:.0f} ms")
        if error_ratio > ERROR_RATE_DEGRADED:
            reasons.append(f"error rate {error_ratio:.1%}")
        if not db_ok:
            status = "unhealthy"
            reasons.insert(0, "database unreachable")
        elif reasons:
            status = "degraded"
        else:
            status = "healthy"
        memory = await asyncio.get_running_loop().run_in_executor(None, rss_bytes)
        return {
            "status": status,
            "reasons": reasons,
            "services": {
                "database": "up" if db_ok else "down",
                "redis": redis_state,
                "websocket": "up",
            },
            "metrics": {
                "activeConnections": len(self.hub.connections),
                "totalRooms": self.room_count(),
                "messagesPerSecond": self.stats.messages.per_second(),
                "memoryBytes": memory,
                "eventLoopLagMs": round(lag * 1000, 2),
                "errorRate": round(error_ratio, 4),
                "clientErrorRate": round(self.stats.client_error_ratio(), 4),
            },
        }
