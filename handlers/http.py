"""Plain HTTP handlers: health, readiness, metrics.

JSON errors everywhere use the socket protocol's codes:
``{"error": {"code", "message", "details"}}`` with the matching status.
"""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from tornado.web import RequestHandler

from server import errors
from server.health import Health


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
            body = {"error": exc.to_dict()}
        self.finish(orjson.dumps(body))

    def send_error_for(self, exc: errors.GatewayError) -> None:
        self.set_status(exc.status)
        self.finish(orjson.dumps({"error": exc.to_dict()}))


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
