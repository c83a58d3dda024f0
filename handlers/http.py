"""Plain HTTP handlers: health, readiness, metrics, WebSocket statistics.

JSON errors everywhere use the socket protocol's codes:
``{"error": {"code", "message", "details"}}`` with the matching status.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import Any, ClassVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from tornado.web import RequestHandler

from models import moderation as mod_db
from server import errors, protocol
from server.auth import Identity, TokenVerifier
from server.config import Config
from server.db import Database
from server.health import Health, rss_bytes
from server.hub import Hub
from server.metrics import Metrics
from server.node_state import NodeState
from server.security import SecurityMonitor
from server.stats import Stats

log = logging.getLogger("switchboard.http")

# /websocket/stats lists this many rooms, by local subscriptions.
STATS_TOP_ROOMS = 10


class JSONHandler(RequestHandler):
    """Writes JSON bodies and turns :class:`GatewayError` into JSON errors."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, errors.GatewayError):
            code = {404: "NOT_FOUND", 405: "BAD_REQUEST", 400: "BAD_REQUEST"}.get(
                status_code, "INTERNAL_ERROR"
            )
            message = self._reason if status_code < 500 else "Internal error"
            exc = errors.GatewayError(message)
            body = {"error": {"code": code, "message": message, "details": {}}}
        else:
            self.set_status(exc.status)
            if exc.status == 401:
                self.set_header("WWW-Authenticate", 'Bearer realm="switchboard"')
            body = {"error": exc.to_dict()}
        self.finish(orjson.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, errors.GatewayError):
            # A client error, not a server fault: one line, no traceback.
            log.info(
                "%s %s -> %s %s", self.request.method, self.request.path, value.code, value.message
            )
            return
        super().log_exception(typ, value, tb)

    def send_error_for(self, exc: errors.GatewayError) -> None:
        self.set_status(exc.status)
        self.finish(orjson.dumps({"error": exc.to_dict()}))

    async def bearer_identity(
        self,
        verifier: TokenVerifier,
        roles: frozenset[str] | None,
        security: SecurityMonitor | None = None,
        *,
        db: Database,
    ) -> Identity:
        """The caller from ``Authorization: Bearer <jwt>``, holding one of ``roles``.

        Every HTTP endpoint that takes a token authenticates here.
        UNAUTHORIZED/TOKEN_EXPIRED (401) without a valid token, reported to
        ``security`` (repeated failures alert the user and the admins);
        FORBIDDEN (403) without one of ``roles`` (None: any role will do);
        BANNED (403, details ``{reason, expiresAt}``) while the token's user
        has a ban in force, as at a socket's admission.
        """
        header = self.request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        try:
            identity = verifier.verify(token)
        except (errors.Unauthorized, errors.TokenExpired) as exc:
            if security is not None:
                security.auth_failed(token, exc.code)
            raise
        if roles is not None and not identity.has_any(roles):
            raise errors.Forbidden(f"Needs one of the roles {', '.join(sorted(roles))}")
        # Read per request (no cache): a ban or unban made on any node counts at once.
        ban = await db.run("user.ban", mod_db.ban_in_force, identity.user_id)
        if ban is not None:
            raise errors.Banned(details=ban)
        return identity


class LivenessHandler(JSONHandler):
    """``GET /health``: the process answers."""

    def initialize(self, node_id: str) -> None:
        self.node_id = node_id

    def get(self) -> None:
        self.write_json({"status": "ok", "node": self.node_id})


class ReadinessHandler(JSONHandler):
    """``GET /health/ready``: database and Redis really pinged; 503 if not."""

    def initialize(self, health: Health) -> None:
        self.health = health

    async def get(self) -> None:
        ok, body = await self.health.ready()
        self.write_json(body, 200 if ok else 503)


class WebSocketHealthHandler(JSONHandler):
    """``GET /health/websocket``: healthy | degraded | unhealthy with figures."""

    def initialize(self, health: Health) -> None:
        self.health = health

    async def get(self) -> None:
        body = await self.health()
        self.write_json(body, 503 if body["status"] == "unhealthy" else 200)


class MetricsHandler(RequestHandler):
    """``GET /metrics``: Prometheus text, or OpenMetrics when the scraper asks."""

    def initialize(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def get(self) -> None:
        accept = self.request.headers.get("Accept", "")
        if "application/openmetrics-text" in accept:
            self.set_header("Content-Type", OPENMETRICS_CONTENT_TYPE)
            self.finish(generate_openmetrics(self.registry))  # type: ignore[no-untyped-call]
        else:
            self.set_header("Content-Type", CONTENT_TYPE_LATEST)
            self.finish(generate_latest(self.registry))


class WebSocketStatsHandler(JSONHandler):
    """``GET /websocket/stats``: this node's detailed figures, for admins.

    Needs ``Authorization: Bearer <jwt>`` with a role in :attr:`allowed_roles`
    (401 without a valid token, 403 without the role). Figures are this
    node's own, read from the hub, the sliding-window stats and the metric
    counters; the configuration comes from :meth:`Config.public_view`, so
    secrets are masked.
    """

    #: Roles of which the caller needs one.
    allowed_roles: ClassVar[frozenset[str]] = frozenset({"admin"})

    def initialize(
        self,
        config: Config,
        hub: Hub,
        verifier: TokenVerifier,
        metrics: Metrics,
        stats: Stats,
        state: NodeState,
        health: Health,
        security: SecurityMonitor,
        db: Database,
        **_unused: Any,
    ) -> None:
        self.config = config
        self.hub = hub
        self.db = db
        self.verifier = verifier
        self.metrics = metrics
        self.stats = stats
        self.state = state
        self.health = health
        self.security = security

    async def prepare(self) -> None:
        await self.bearer_identity(self.verifier, self.allowed_roles, self.security, db=self.db)

    async def get(self) -> None:
        now = time.time()
        by_ns = self.hub.count_by_namespace()
        rooms = self.hub.active_rooms()
        top = heapq.nlargest(STATS_TOP_ROOMS, rooms.items(), key=lambda item: (item[1], item[0]))
        messages, events = self.stats.messages, self.stats.events
        p50, p95, p99 = self.stats.latency.percentiles(50, 95, 99)
        memory = await asyncio.get_running_loop().run_in_executor(None, rss_bytes)
        m = self.metrics
        self.write_json(
            {
                "node": self.state.node_id,
                "uptimeSeconds": round(now - self.state.started_at, 3),
                "shuttingDown": self.state.shutting_down,
                "connections": {
                    "total": sum(by_ns.values()),
                    "byNamespace": by_ns,
                    "uniqueUsers": len(self.hub.online_users()),
                    "opened": _by_label(m.connections_opened, "namespace"),
                    "closedByReason": _by_label(m.connections_closed, "reason"),
                    "authFailuresByReason": _by_label(m.auth_failures, "reason"),
                },
                "rooms": {
                    "active": len(rooms),
                    "subscriptions": sum(rooms.values()),
                    "top": [
                        {
                            "roomId": room_id,
                            "subscriptions": count,
                            "messagesPerMinute": self.stats.rooms.per_minute(room_id, now),
                        }
                        for room_id, count in top
                    ],
                },
                "messages": {
                    "total": messages.total,
                    "perSecond": messages.per_second(now),
                    "perMinute": messages.count(59, now),
                },
                "events": {
                    "total": events.total,
                    "perSecond": events.per_second(now),
                    "p50Ms": round(p50 * 1000, 3),
                    "p95Ms": round(p95 * 1000, 3),
                    "p99Ms": round(p99 * 1000, 3),
                    "errorRate": round(self.stats.error_ratio(), 4),
                },
                "rateLimitViolations": _by_label(m.rate_limited, "bucket"),
                "slowConsumers": int(_total(m.slow_consumers)),
                "errorsByCode": _by_label(m.errors, "code"),
                "eventLoopLagMs": round(self.health.loop_monitor.lag_secs * 1000, 2),
                "memoryBytes": memory,
                "config": self.config.public_view(),
                "timestamp": protocol.iso(protocol.now()),
            }
        )


def _by_label(counter: Counter, label: str) -> dict[str, int]:
    """A labelled counter's current values by one label (summed over the others)."""
    out: dict[str, int] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels[label]
                out[key] = out.get(key, 0) + int(sample.value)
    return out


def _total(counter: Counter) -> float:
    return sum(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )
