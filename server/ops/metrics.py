"""Prometheus metrics, each defined once.

A :class:`Metrics` instance owns its metric objects on the registry it is
given, so tests build a fresh ``CollectorRegistry`` and read samples with
``registry.get_sample_value(...)``. Label values are bounded: namespaces,
known event names (others count as ``unknown``), error codes, close reasons.

Example::

    registry = CollectorRegistry()
    metrics = Metrics(registry, node_id="n1")
    metrics.events.labels("chat", "message:send").inc()

Families fed by other components (attribute → metric):

- ``notifications_created`` → ``switchboard_notifications_created_total{category}``
- ``log_entries_streamed`` → ``switchboard_log_entries_streamed_total``
- ``log_entries_dropped`` → ``switchboard_log_entries_dropped_total``
- ``security_alerts``, ``security_alerts_suppressed`` →
  ``switchboard_security_alerts_total{kind}``, ``…_suppressed_total{kind}``
- ``tcp_connections``, ``tcp_refused``, ``accept_errors`` → ``switchboard_tcp_connections``,
  ``switchboard_tcp_refused_total{reason}``, ``switchboard_accept_errors_total{errno}``
  (the accept loop, server/listener.py)
- ``redis_up``, ``redis_published``, ``redis_received``, ``redis_reconnects``,
  ``redis_dropped``, ``redis_pubsub_lag`` → the ``switchboard_redis_*`` families (cluster mirror)
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

from server.core.config import RATE_LIMIT_CLASSES

#: The notification categories of the product contract (SPEC §3), a bounded label.
NOTIFICATION_CATEGORIES = (
    "chat", "mention", "moderation", "security", "system", "event", "user",
    "resource", "reservation", "limit", "error",
)  # fmt: skip

#: Why server/listener.py closed a TCP connection at accept, a bounded label.
TCP_REFUSAL_REASONS = ("ip_limit",)
#: The accept() errors server/listener.py backs off from, a bounded label ("other":
#: any error of the listening socket that is not about one queued connection).
ACCEPT_ERRNOS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "other")

#: What server/services/security.py alerts on, a bounded label.
SECURITY_ALERT_KINDS = ("auth_failures", "rate_limit_abuse")

# Publish-to-deliver spans the database commit as well, so it reaches further.
_DELIVERY_BUCKETS_SECS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Requests per group-commit batch (server/store/batch.py): 1 is an idle node.
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2000)

# Latency buckets in seconds, from 0.5 ms to 5 s: gateway events are fast.
_LATENCY_BUCKETS_SECS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class Metrics:
    """All of the gateway's metric families on one registry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        node_id: str,
        version: str = "0",
        *,
        redis_enabled: bool = False,
    ) -> None:
        self.registry = registry
        p = "switchboard"
        self.build_info = Info(f"{p}_build", "Build and node information", registry=registry)
        # ``redis`` tells alerts whether switchboard_redis_up == 0 means "down" or "not used".
        redis = "enabled" if redis_enabled else "disabled"
        self.build_info.info({"version": version, "node": node_id, "redis": redis})
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
        self.tcp_connections = Gauge(
            f"{p}_tcp_connections",
            "Open TCP connections accepted by this node (HTTP, keep-alive and WebSocket)",
            registry=registry,
        )  # fmt: skip
        self.tcp_refused = Counter(
            f"{p}_tcp_refused_total",
            "TCP connections closed at accept, before any HTTP, by reason",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.accept_errors = Counter(
            f"{p}_accept_errors_total",
            "accept() failures: out of descriptors or memory, or other (accepting pauses briefly)",
            ["errno"], registry=registry,
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
        self._event_series: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
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
        self.write_batch_size = Histogram(
            f"{p}_write_batch_size", "Requests one group-commit transaction carried",
            buckets=_BATCH_SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.admission_batch_size = Histogram(
            f"{p}_admission_batch_size", "Connections one admission transaction carried",
            buckets=_BATCH_SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        # How far the write path is behind: sends queued for the next transaction.
        self.write_batch_waiting = Gauge(
            f"{p}_write_batch_waiting", "Requests waiting for the next group-commit transaction",
            registry=registry,
        )  # fmt: skip
        self.notification_initial_batch_size = Histogram(
            f"{p}_notification_initial_batch_size",
            "Notifications connections one initial-state read answered",
            buckets=_BATCH_SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.notification_backlog = Gauge(
            f"{p}_notification_backlog",
            "Chat messages whose mention and missed-message notifications are not done yet",
            registry=registry,
        )  # fmt: skip
        self.rooms_active = Gauge(
            f"{p}_rooms_active", "Rooms with at least one local subscriber", registry=registry
        )
        self.room_members = Gauge(
            f"{p}_room_subscriptions", "Local room subscriptions (connection x room)",
            registry=registry,
        )  # fmt: skip
        self.room_subscribers = Gauge(
            f"{p}_room_subscribers", "Local subscribers of the busiest rooms (opt-in, top N)",
            ["room"], registry=registry,
        )  # fmt: skip
        self.event_loop_lag = Gauge(
            f"{p}_event_loop_lag_seconds", "Delay of a periodic timer behind schedule",
            registry=registry,
        )  # fmt: skip
        self.publish_latency = Histogram(
            f"{p}_publish_deliver_seconds",
            "From receiving a message to its delivery to local subscribers",
            ["namespace"], buckets=_DELIVERY_BUCKETS_SECS, registry=registry,
        )  # fmt: skip
        self.notifications_created = Counter(
            f"{p}_notifications_created_total", "Notifications stored, by category",
            ["category"], registry=registry,
        )  # fmt: skip
        self.log_entries_streamed = Counter(
            f"{p}_log_entries_streamed_total", "Log entries sent to live log subscribers",
            registry=registry,
        )  # fmt: skip
        self.log_entries_dropped = Counter(
            f"{p}_log_entries_dropped_total",
            "Log entries not delivered to a live subscriber (buffer full or too slow)",
            registry=registry,
        )  # fmt: skip
        self.security_alerts = Counter(
            f"{p}_security_alerts_total",
            "Security alerts raised (server/services/security.py), by kind",
            ["kind"], registry=registry,
        )  # fmt: skip
        self.security_alerts_suppressed = Counter(
            f"{p}_security_alerts_suppressed_total",
            "Security alerts only logged because the node-wide alert budget was spent",
            ["kind"], registry=registry,
        )  # fmt: skip
        # Known label values start at zero so rate() sees their first increase
        # and dashboards show 0 rather than "no data".
        for category in NOTIFICATION_CATEGORIES:
            self.notifications_created.labels(category)
        for bucket in RATE_LIMIT_CLASSES:
            self.rate_limited.labels(bucket)
        for reason in TCP_REFUSAL_REASONS:
            self.tcp_refused.labels(reason)
        for name in ACCEPT_ERRNOS:
            self.accept_errors.labels(name)
        for kind in SECURITY_ALERT_KINDS:
            self.security_alerts.labels(kind)
            self.security_alerts_suppressed.labels(kind)
        # The Redis mirror (cluster) feeds these; a single node leaves them at zero.
        self.redis_up = Gauge(
            f"{p}_redis_up", "1 while the Redis mirror is connected", registry=registry
        )
        self.redis_published = Counter(
            f"{p}_redis_published_total", "Messages published to the Redis mirror",
            registry=registry,
        )  # fmt: skip
        self.redis_received = Counter(
            f"{p}_redis_received_total", "Messages received from the Redis mirror",
            registry=registry,
        )  # fmt: skip
        self.redis_reconnects = Counter(
            f"{p}_redis_reconnects_total", "Reconnections of the Redis mirror", registry=registry
        )
        self.redis_dropped = Counter(
            f"{p}_redis_dropped_total",
            "Publishes for other nodes dropped (Redis down or the publish queue full)",
            registry=registry,
        )
        self.redis_pubsub_lag = Histogram(
            f"{p}_redis_pubsub_lag_seconds", "From publish on one node to receipt on another",
            buckets=_LATENCY_BUCKETS_SECS, registry=registry,
        )  # fmt: skip

    def event_series(self, namespace: str, event: str) -> tuple[Counter, Histogram]:
        """The ``events`` counter and ``event_duration`` histogram of one (namespace, event).

        Looked up once per pair: ``labels()`` checks and joins its values and
        takes a lock at every call, twice for every inbound frame. The pairs
        are bounded (known events; others count as ``unknown``).
        """
        key = (namespace, event)
        series = self._event_series.get(key)
        if series is None:
            series = self._event_series[key] = (
                self.events.labels(namespace, event),
                self.event_duration.labels(namespace, event),
            )
        return series

    def set_room_gauges(self, rooms: Mapping[str, int], top_n: int = 0) -> None:
        """Refresh the room gauges from ``room id -> local subscribers``.

        Per-room series exist only for the ``top_n`` busiest rooms (none when
        0): every room as a label would grow without bound. Rooms that drop
        out of the top N lose their series.
        """
        self.rooms_active.set(len(rooms))
        self.room_members.set(sum(rooms.values()))
        if top_n <= 0:
            return
        self.room_subscribers.clear()
        for room, count in heapq.nlargest(top_n, rooms.items(), key=lambda item: item[1]):
            self.room_subscribers.labels(room).set(count)
