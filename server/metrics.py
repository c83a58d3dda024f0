"""Prometheus metrics, each defined once.

A :class:`Metrics` instance owns its metric objects on the registry it is
given, so tests build a fresh ``CollectorRegistry`` and read samples with
``registry.get_sample_value(...)``. Label values are bounded: namespaces,
known event names (others count as ``unknown``), error codes, close reasons.

Example::

    registry = CollectorRegistry()
    metrics = Metrics(registry, node_id="n1")
    metrics.events.labels("chat", "message:send").inc()
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

# Latency buckets in seconds, from 0.5 ms to 5 s: gateway events are fast.
_LATENCY_BUCKETS_SECS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class Metrics:
    """All of the gateway's metric families on one registry."""

    def __init__(self, registry: CollectorRegistry, node_id: str, version: str = "0") -> None:
        self.registry = registry
        p = "switchboard"
        self.build_info = Info(f"{p}_build", "Build and node information", registry=registry)
        self.build_info.info({"version": version, "node": node_id})
        self.connections = Gauge(
            f"{p}_connections", "Open WebSocket connections", ["namespace"], registry=registry
        )
        self.connections_opened = Counter(
            f"{p}_connections_opened_total", "Accepted connections",
            ["namespace"], registry=registry,
        )  # fmt: skip
        self.connections_closed = Counter(
            f"{p}_connections_closed_total", "Closed connections by reason",
            ["namespace", "reason"], registry=registry,
        )  # fmt: skip
        self.auth_failures = Counter(
            f"{p}_auth_failures_total", "Refused handshakes and authentications by reason",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.events = Counter(
            f"{p}_events_received_total", "Inbound events",
            ["namespace", "event"], registry=registry,
        )  # fmt: skip
        self.event_duration = Histogram(
            f"{p}_event_duration_seconds", "Time to handle an inbound event",
            ["namespace", "event"], buckets=_LATENCY_BUCKETS_SECS, registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            f"{p}_errors_total", "Errors answered to clients by code",
            ["code"], registry=registry,
        )  # fmt: skip
        self.frames_received = Counter(
            f"{p}_frames_received_total", "WebSocket frames received", registry=registry
        )
        self.bytes_received = Counter(
            f"{p}_received_bytes_total", "WebSocket payload bytes received", registry=registry
        )
        self.frames_sent = Counter(
            f"{p}_frames_sent_total", "WebSocket frames sent", registry=registry
        )
        self.bytes_sent = Counter(
            f"{p}_sent_bytes_total", "WebSocket frame bytes sent", registry=registry
        )
        self.deliveries = Counter(
            f"{p}_broadcast_deliveries_total", "Frames delivered by broadcasts",
            registry=registry,
        )  # fmt: skip
        self.rate_limited = Counter(
            f"{p}_rate_limited_total", "Requests refused by a rate limit",
            ["bucket"], registry=registry,
        )  # fmt: skip
        self.slow_consumers = Counter(
            f"{p}_slow_consumers_total", "Connections closed for not reading fast enough",
            registry=registry,
        )  # fmt: skip
        self.messages_persisted = Counter(
            f"{p}_messages_persisted_total", "Chat messages committed", registry=registry
        )
        self.db_duration = Histogram(
            f"{p}_db_query_duration_seconds", "Database job duration by operation",
            ["operation"], buckets=_LATENCY_BUCKETS_SECS, registry=registry,
        )  # fmt: skip
        self.rooms_active = Gauge(
            f"{p}_rooms_active", "Rooms with at least one local subscriber", registry=registry
        )
        self.room_members = Gauge(
            f"{p}_room_subscriptions", "Local room subscriptions (connection x room)",
            registry=registry,
        )  # fmt: skip
        self.event_loop_lag = Gauge(
            f"{p}_event_loop_lag_seconds", "Delay of a periodic timer behind schedule",
            registry=registry,
        )  # fmt: skip
