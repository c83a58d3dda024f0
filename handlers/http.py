"""Plain HTTP handlers: health, readiness, metrics, WebSocket statistics.

:class:`JSONHandler` is the base of every JSON endpoint (here, the REST API,
the log endpoints, the dev-token endpoint): its one error renderer answers
with the socket protocol's codes, ``{"error": {"code", "message",
"details"}}`` with the matching status, and :meth:`JSONHandler.bearer_identity`
admits a caller with the sockets' rules (:mod:`server.services.admission`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from marshmallow import Schema
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from tornado.web import RequestHandler

from handlers.schemas import Int, NoQuery, Str, Strict, load
from server.core import errors, protocol
from server.core.auth import Identity
from server.ops.health import rss_bytes

if TYPE_CHECKING:
    from handlers.deps import Deps

log = logging.getLogger("switchboard.http")

# /websocket/stats lists this many rooms, by local subscriptions.
STATS_TOP_ROOMS = 10
# ... and pages the cluster's connections (by connection id) this many at a time.
STATS_CONNECTIONS_DEFAULT = 50
STATS_CONNECTIONS_MAX = 500


class JSONHandler(RequestHandler):
    """Base of every JSON endpoint: JSON bodies, and every error rendered here, once.

    A :class:`~server.core.errors.GatewayError` raised anywhere in a request (or
    passed to :meth:`send_error_for`) answers ``{"error": {code, message,
    details}}`` with its status, ``WWW-Authenticate: Bearer`` on 401 and
    ``Retry-After`` (seconds) on ``RATE_LIMITED``; it is logged as one INFO
    line on :attr:`error_log`, without a traceback. Tornado's own errors (404,
    405, a bad body) get the same shape with a matching code; an unexpected
    exception is logged with its traceback and answers ``INTERNAL_ERROR``.

    Example::

        class Hello(JSONHandler):
            async def get(self) -> None:
                identity = await self.bearer_identity(frozenset({"admin"}))
                self.write_json({"hello": identity.user_id})
    """

    #: Where client errors are logged (one line each): the surface's own logger.
    error_log: ClassVar[logging.Logger] = log

    def initialize(self, deps: Deps) -> None:
        self.deps = deps

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, errors.GatewayError):
            self.send_error_for(exc)
            return
        # Tornado's errors keep their status; anything unexpected is a 500 whose
        # cause log_exception has logged: the client sees only "Internal error".
        code = {404: "NOT_FOUND", 405: "BAD_REQUEST", 400: "BAD_REQUEST"}.get(
            status_code, "INTERNAL_ERROR"
        )
        message = self._reason if status_code < 500 else "Internal error"
        self.finish(orjson.dumps({"error": {"code": code, "message": message, "details": {}}}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, errors.GatewayError):
            # A client error, not a server fault: one line, no traceback.
            self.error_log.info(
                "%s %s -> %s %s", self.request.method, self.request.path, value.code, value.message
            )
            return
        super().log_exception(typ, value, tb)

    def send_error_for(self, exc: errors.GatewayError) -> None:
        """Answer with ``exc``: its status, headers and JSON error body."""
        self.set_status(exc.status)
        if exc.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="switchboard"')
        retry_ms = exc.details.get("retryAfter")
        if isinstance(exc, errors.RateLimited) and isinstance(retry_ms, int):
            self.set_header("Retry-After", str(max(1, -(-retry_ms // 1000))))
        self.finish(orjson.dumps({"error": exc.to_dict()}))

    def query_args(
        self, schema: type[Schema] = NoQuery, *, blank_is_absent: bool = False
    ) -> dict[str, Any]:
        """The query string loaded by ``schema``, strictly.

        An unknown parameter (``schema`` being a :class:`~handlers.schemas.Strict`
        one), a repeated one or a malformed value is a 400 ``VALIDATION_ERROR``
        naming it: query parameters are not payloads a newer client may
        extend, and a misspelt filter must not answer as if there were none.
        ``blank_is_absent`` reads ``?level=`` as no ``level`` at all.
        """
        values: dict[str, str] = {}
        repeated: dict[str, list[str]] = {}
        for name, raw in self.request.query_arguments.items():
            if len(raw) > 1:
                repeated[name] = ["Give this parameter once."]
            value = raw[-1].decode("utf-8", "replace")
            if value or not blank_is_absent:
                values[name] = value
        if repeated:
            raise errors.ValidationFailed(details=repeated)
        return load(schema, values)

    async def bearer_identity(self, roles: frozenset[str] | None) -> Identity:
        """The caller from ``Authorization: Bearer <jwt>``, holding one of ``roles``.

        Every HTTP endpoint that takes a token authenticates here, with the
        sockets' rules (:meth:`server.services.admission.Admission.bearer`): 401
        UNAUTHORIZED/TOKEN_EXPIRED without a valid token (counted towards a
        security alert), 403 FORBIDDEN without one of ``roles`` (None: any role
        will do), 403 BANNED (details ``{reason, expiresAt}``) while the token's
        user has a ban in force.
        """
        authorization = self.request.headers.get("Authorization", "")
        return await self.deps.admission.bearer(authorization, roles)


class LivenessHandler(JSONHandler):
    """``GET /health``: the process answers."""

    def get(self) -> None:
        self.write_json({"status": "ok", "node": self.deps.config.node_id})


class ReadinessHandler(JSONHandler):
    """``GET /health/ready``: database and Redis really pinged; 503 if not."""

    async def get(self) -> None:
        ok, body = await self.deps.health.ready()
        self.write_json(body, 200 if ok else 503)


class WebSocketHealthHandler(JSONHandler):
    """``GET /health/websocket``: healthy | degraded | unhealthy with figures."""

    async def get(self) -> None:
        body = await self.deps.health()
        self.write_json(body, 503 if body["status"] == "unhealthy" else 200)


class MetricsHandler(RequestHandler):
    """``GET /metrics``: Prometheus text, or OpenMetrics when the scraper asks."""

    def initialize(self, deps: Deps) -> None:
        self.registry = deps.metrics.registry

    def get(self) -> None:
        accept = self.request.headers.get("Accept", "")
        if "application/openmetrics-text" in accept:
            self.set_header("Content-Type", OPENMETRICS_CONTENT_TYPE)
            self.finish(generate_openmetrics(self.registry))  # type: ignore[no-untyped-call]
        else:
            self.set_header("Content-Type", CONTENT_TYPE_LATEST)
            self.finish(generate_latest(self.registry))


class StatsQuery(Strict):
    """``/websocket/stats``' page of the cluster's connections."""

    limit = Int(1, STATS_CONNECTIONS_MAX, load_default=STATS_CONNECTIONS_DEFAULT)
    #: The last connection id of the previous page (``connections.list.next``).
    after = Str(64, load_default=None)


class WebSocketStatsHandler(JSONHandler):
    """``GET /websocket/stats``: this node's detailed figures, for admins.

    Needs ``Authorization: Bearer <jwt>`` with a role in :attr:`allowed_roles`
    (401 without a valid token, 403 without the role). Figures are this
    node's own, read from the hub, the sliding-window stats and the metric
    counters; the configuration comes from :meth:`Config.public_view`, so
    secrets are masked. ``connections.list`` is a page of the cluster's
    connections (``?limit=&after=``), each with its client address and user
    agent: admin-only data, listed only for a caller holding ``admin``.
    """

    #: Roles of which the caller needs one.
    allowed_roles: ClassVar[frozenset[str]] = frozenset({"admin"})

    async def prepare(self) -> None:
        self.identity = await self.bearer_identity(self.allowed_roles)

    async def get(self) -> None:
        deps = self.deps
        query = self.query_args(StatsQuery)
        listed = await self._connection_page(query["limit"], query["after"])
        now = time.time()
        by_ns = deps.hub.count_by_namespace()
        rooms = deps.hub.active_rooms()
        top = heapq.nlargest(STATS_TOP_ROOMS, rooms.items(), key=lambda item: (item[1], item[0]))
        messages, events = deps.stats.messages, deps.stats.events
        p50, p95, p99 = deps.stats.latency.percentiles(50, 95, 99)
        memory = await asyncio.get_running_loop().run_in_executor(None, rss_bytes)
        m = deps.metrics
        self.write_json(
            {
                "node": deps.state.node_id,
                "uptimeSeconds": round(now - deps.state.started_at, 3),
                "shuttingDown": deps.state.shutting_down,
                "connections": {
                    "total": sum(by_ns.values()),
                    "byNamespace": by_ns,
                    "uniqueUsers": len(deps.hub.online_users()),
                    "opened": _by_label(m.connections_opened, "namespace"),
                    "closedByReason": _by_label(m.connections_closed, "reason"),
                    "authFailuresByReason": _by_label(m.auth_failures, "reason"),
                    **listed,
                },
                "rooms": {
                    "active": len(rooms),
                    "subscriptions": sum(rooms.values()),
                    "top": [
                        {
                            "roomId": room_id,
                            "subscriptions": count,
                            "messagesPerMinute": deps.stats.rooms.per_minute(room_id, now),
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
                    "errorRate": round(deps.stats.error_ratio(), 4),
                    "clientErrorRate": round(deps.stats.client_error_ratio(), 4),
                },
                "rateLimitViolations": _by_label(m.rate_limited, "bucket"),
                "slowConsumers": int(_total(m.slow_consumers)),
                "errorsByCode": _by_label(m.errors, "code"),
                "eventLoopLagMs": round(deps.health.loop_monitor.lag_secs * 1000, 2),
                "memoryBytes": memory,
                "config": deps.config.public_view(),
                "timestamp": protocol.iso(protocol.now()),
            }
        )

    async def _connection_page(self, limit: int, after: str | None) -> dict[str, Any]:
        """``{"list": ...}``, a page of the cluster's connections, for an admin only."""
        if "admin" not in self.identity.roles:
            return {}
        listing = await self.deps.connection_list.page(limit, after)
        conns = listing.connections
        return {
            "list": {
                "items": conns,
                "total": listing.total,
                "next": conns[-1]["connectionId"] if listing.more and conns else None,
                "missingNodes": listing.missing_nodes,
            }
        }


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
