"""Each metric family moves when its event happens.

Every test starts its own node, and a node builds its own
``CollectorRegistry``, so samples never leak between tests. Traffic comes
from real WebSocket clients; values are read with ``get_sample_value``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from tornado.httpclient import AsyncHTTPClient

from server.core import protocol
from server.ops.metrics import Metrics
from server.realtime.hub import Target
from switchboard_client import ClientError, ConnectionClosed, HandshakeError
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio


def value(gw: Any, name: str, **labels: str) -> float:
    """One sample's value; 0.0 when the labelled child does not exist yet."""
    found = gw.node.registry.get_sample_value(name, labels)
    return 0.0 if found is None else float(found)


def total(gw: Any, name: str) -> float:
    """Sum of a family's samples called ``name`` over every label set."""
    return sum(
        s.value for metric in gw.node.registry.collect() for s in metric.samples if s.name == name
    )


async def chat_pair(gw: Any, room_id: str = "metrics") -> tuple[Any, Any]:
    alice = await gw.connect("alice")
    bob = await gw.connect("bob")
    await alice.emit("room:create", {"roomId": room_id, "name": "Metrics"})
    await alice.emit("room:join", {"roomId": room_id})
    await bob.emit("room:join", {"roomId": room_id})
    return alice, bob


async def test_connections_opened_and_closed_with_reason(gateway: Any) -> None:
    client = await gateway.connect("alice")
    assert value(gateway, "switchboard_connections", namespace="chat") == 1
    assert value(gateway, "switchboard_connections_opened_total", namespace="chat") == 1
    client.close()
    await client.wait_closed()
    await eventually(
        lambda: value(gateway, "switchboard_connections_closed_total",
                      namespace="chat", reason="client") == 1
    )  # fmt: skip
    assert value(gateway, "switchboard_connections", namespace="chat") == 0


async def test_auth_failures_by_reason(gateway: Any) -> None:
    with pytest.raises((ClientError, ConnectionClosed, HandshakeError)):
        await gateway.client("mallory", token="not-a-jwt").connect()
    await eventually(lambda: value(gateway, "switchboard_auth_failures_total",
                                   reason="unauthorized") == 1)  # fmt: skip
    assert value(gateway, "switchboard_connections_opened_total", namespace="chat") == 0


async def test_events_frames_bytes_and_duration(gateway: Any) -> None:
    client = await gateway.connect("alice")
    sent_before = value(gateway, "switchboard_frames_sent_total")
    bytes_before = value(gateway, "switchboard_sent_bytes_total")
    await client.emit("system:ping", {"t": 1})
    labels = {"namespace": "chat", "event": "system:ping"}
    assert value(gateway, "switchboard_events_received_total", **labels) == 1
    assert value(gateway, "switchboard_event_duration_seconds_count", **labels) == 1
    assert value(gateway, "switchboard_frames_received_total") == 1
    assert value(gateway, "switchboard_received_bytes_total") > 10
    assert value(gateway, "switchboard_frames_sent_total") == sent_before + 1
    assert value(gateway, "switchboard_sent_bytes_total") > bytes_before + 10


async def test_each_event_counts_on_its_series_looked_up_once(gateway: Any) -> None:
    client = await gateway.connect("alice")
    for _ in range(3):
        await client.emit("system:ping", {"t": 1})
    labels = {"namespace": "chat", "event": "system:ping"}
    assert value(gateway, "switchboard_events_received_total", **labels) == 3
    assert value(gateway, "switchboard_event_duration_seconds_count", **labels) == 3
    metrics = gateway.node.metrics
    series = metrics.event_series("chat", "system:ping")
    assert metrics.event_series("chat", "system:ping") is series
    assert series == (metrics.events.labels(*labels.values()),
                      metrics.event_duration.labels(*labels.values()))  # fmt: skip


async def test_unknown_events_share_one_label_and_count_errors(gateway: Any) -> None:
    client = await gateway.connect("alice")
    for name in ("nope:one", "nope:two"):
        with pytest.raises(ClientError):
            await client.emit(name, {})
    assert value(gateway, "switchboard_events_received_total",
                 namespace="chat", event="unknown") == 2  # fmt: skip
    assert value(gateway, "switchboard_errors_total", code="UNKNOWN_EVENT") == 2
    events = [s.labels["event"] for m in gateway.node.registry.collect()
              for s in m.samples if s.name == "switchboard_events_received_total"]  # fmt: skip
    assert "nope:one" not in events


async def test_broadcast_persisted_publish_latency_and_db_duration(gateway: Any) -> None:
    alice, bob = await chat_pair(gateway)
    deliveries_before = value(gateway, "switchboard_broadcast_deliveries_total")
    db_before = value(gateway, "switchboard_db_query_duration_seconds_count",
                      operation="message.send")  # fmt: skip
    await alice.emit("message:send", {"roomId": "metrics", "content": "hello"})
    await bob.next_event("message:new", timeout=5)
    assert value(gateway, "switchboard_messages_persisted_total") == 1
    assert value(gateway, "switchboard_broadcast_deliveries_total") >= deliveries_before + 1
    assert value(gateway, "switchboard_publish_deliver_seconds_count", namespace="chat") == 1
    assert value(gateway, "switchboard_publish_deliver_seconds_sum", namespace="chat") > 0
    assert value(gateway, "switchboard_db_query_duration_seconds_count",
                 operation="message.send") == db_before + 1  # fmt: skip


async def test_a_broadcast_counts_one_frame_and_its_bytes_per_recipient(gateway: Any) -> None:
    alice, bob = await chat_pair(gateway)
    frames_before = value(gateway, "switchboard_frames_sent_total")
    bytes_before = value(gateway, "switchboard_sent_bytes_total")
    deliveries_before = value(gateway, "switchboard_broadcast_deliveries_total")
    data = {"note": "n" * 100}
    assert gateway.node.hub.publish(Target.room("metrics"), "test:note", data) == 2
    size = len(protocol.frame(protocol.event_payload("test:note", data)))
    for client in (alice, bob):
        assert (await client.next_event("test:note", timeout=5))["data"] == data
    assert value(gateway, "switchboard_frames_sent_total") == frames_before + 2
    assert value(gateway, "switchboard_sent_bytes_total") == bytes_before + 2 * size
    assert value(gateway, "switchboard_broadcast_deliveries_total") == deliveries_before + 2


async def test_rooms_active_and_subscriptions(gateway: Any) -> None:
    await chat_pair(gateway)
    await eventually(lambda: value(gateway, "switchboard_rooms_active") == 1)
    await eventually(lambda: value(gateway, "switchboard_room_subscriptions") == 2)


async def test_rate_limited_by_bucket(gateway_factory: Callable[..., Any]) -> None:
    gw = await gateway_factory(rate_limits="messages=1/1m")
    alice, _ = await chat_pair(gw)
    await alice.emit("message:send", {"roomId": "metrics", "content": "one"})
    with pytest.raises(ClientError) as info:
        await alice.emit("message:send", {"roomId": "metrics", "content": "two"})
    assert info.value.code == "RATE_LIMITED"
    assert value(gw, "switchboard_rate_limited_total", bucket="messages") == 1
    assert value(gw, "switchboard_errors_total", code="RATE_LIMITED") == 1


async def test_slow_consumer_closed_and_counted(gateway_factory: Callable[..., Any]) -> None:
    # An outbound budget smaller than the welcome frame: the first write overflows it.
    gw = await gateway_factory(max_outbound_bytes=16)
    with pytest.raises((ClientError, ConnectionClosed, TimeoutError)):
        await gw.client("alice", connect_timeout=3).connect()
    await eventually(lambda: value(gw, "switchboard_slow_consumers_total") == 1)
    await eventually(
        lambda: value(gw, "switchboard_connections_closed_total",
                      namespace="chat", reason="slow_consumer") == 1
    )  # fmt: skip


async def test_event_loop_lag_follows_a_blocked_loop(gateway: Any) -> None:
    # Block the loop on purpose, as a CPU-heavy handler would.
    until = time.perf_counter() + 0.8
    while time.perf_counter() < until:
        pass
    await eventually(lambda: value(gateway, "switchboard_event_loop_lag_seconds") > 0.2)


async def test_build_info_and_runtime_collectors(gateway: Any) -> None:
    node_id = gateway.config.node_id
    assert value(gateway, "switchboard_build_info", node=node_id, version="0.1.0",
                 redis="disabled") == 1  # fmt: skip
    assert total(gateway, "process_cpu_seconds_total") > 0
    assert total(gateway, "process_resident_memory_bytes") > 0
    assert any(m.name == "python_gc_objects_collected" for m in gateway.node.registry.collect())


async def test_families_for_other_components_start_at_zero() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "n1", redis_enabled=True)
    assert registry.get_sample_value("switchboard_build_info", {
        "node": "n1", "version": "0", "redis": "enabled"}) == 1  # fmt: skip
    for name in ("switchboard_log_entries_streamed_total", "switchboard_redis_published_total",
                 "switchboard_redis_received_total", "switchboard_redis_reconnects_total",
                 "switchboard_redis_up"):  # fmt: skip
        assert registry.get_sample_value(name) == 0, name
    metrics.notifications_created.labels("mention").inc()
    metrics.log_entries_streamed.inc(3)
    metrics.log_entries_dropped.inc()
    metrics.redis_up.set(1)
    metrics.redis_pubsub_lag.observe(0.002)
    assert (
        registry.get_sample_value(
            "switchboard_notifications_created_total", {"category": "mention"}
        )
        == 1
    )
    assert registry.get_sample_value("switchboard_log_entries_streamed_total") == 3
    assert registry.get_sample_value("switchboard_log_entries_dropped_total") == 1
    assert (
        registry.get_sample_value("switchboard_notifications_created_total", {"category": "chat"})
        == 0
    )
    assert registry.get_sample_value("switchboard_rate_limited_total", {"bucket": "joins"}) == 0
    assert registry.get_sample_value("switchboard_redis_up") == 1
    assert registry.get_sample_value("switchboard_redis_pubsub_lag_seconds_count") == 1


async def test_metrics_endpoint_text_and_openmetrics(gateway: Any) -> None:
    await gateway.connect("alice")
    http = AsyncHTTPClient()
    text = await http.fetch(f"{gateway.http}/metrics")
    assert text.headers["Content-Type"].startswith("text/plain")
    body = text.body.decode()
    assert 'switchboard_connections{namespace="chat"} 1.0' in body
    assert "# TYPE switchboard_publish_deliver_seconds histogram" in body
    om = await http.fetch(
        f"{gateway.http}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.body.decode().rstrip().endswith("# EOF")


async def test_per_room_series_only_for_the_busiest_rooms() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "n1")
    metrics.set_room_gauges({"a": 3, "b": 1, "c": 2})
    assert registry.get_sample_value("switchboard_rooms_active") == 3
    assert registry.get_sample_value("switchboard_room_subscriptions") == 6
    assert registry.get_sample_value("switchboard_room_subscribers", {"room": "a"}) is None
    metrics.set_room_gauges({"a": 3, "b": 1, "c": 2}, top_n=2)
    rooms = {"a": 3.0, "c": 2.0}
    for room, count in rooms.items():
        assert registry.get_sample_value("switchboard_room_subscribers", {"room": room}) == count
    assert registry.get_sample_value("switchboard_room_subscribers", {"room": "b"}) is None
    # A room that falls out of the top N loses its series.
    metrics.set_room_gauges({"b": 5, "c": 2}, top_n=1)
    assert registry.get_sample_value("switchboard_room_subscribers", {"room": "a"}) is None
    assert registry.get_sample_value("switchboard_room_subscribers", {"room": "b"}) == 5


async def test_node_publishes_per_room_series_when_enabled(
    gateway_factory: Callable[..., Any],
) -> None:
    gw = await gateway_factory(metrics_room_series=1)
    await chat_pair(gw, "busy")
    await eventually(lambda: value(gw, "switchboard_room_subscribers", room="busy") == 2)


async def test_notifications_created_by_category(gateway: Any) -> None:
    def created(category: str) -> float:
        return value(gateway, "switchboard_notifications_created_total", category=category)

    inbox = await gateway.connect("bob", "notifications")
    alice, bob = await chat_pair(gateway, "notes")
    # A mention (one per mentioned member) through real chat.
    await alice.emit("message:send", {"roomId": "notes", "content": "hi @bob"})
    await inbox.next_event("notification:created")
    assert created("mention") == 1
    # The server API, to two users at once.
    response = await AsyncHTTPClient().fetch(
        f"{gateway.http}/api/v1/notifications",
        method="POST",
        headers={"Authorization": f"Bearer {gateway.token('billing', ('service',))}"},
        body=b'{"userIds": ["bob", "carol"], "title": "Invoice", "category": "event"}',
    )
    assert response.code == 201
    assert created("event") == 2
    # A missed message for a member with no chat connection: one created, then updated.
    await bob.aclose()
    await eventually(lambda: not gateway.node.hub.user_connections("bob", "chat"))
    await alice.emit("message:send", {"roomId": "notes", "content": "one"})
    await eventually(lambda: created("chat") == 1)
    await alice.emit("message:send", {"roomId": "notes", "content": "two"})
    await inbox.next_event("notification:updated")
    assert created("chat") == 1  # coalesced: updated in place, not created again
    assert created("system") == 0


async def test_log_entries_streamed_to_subscribers(gateway: Any) -> None:
    streamed = lambda: value(gateway, "switchboard_log_entries_streamed_total")  # noqa: E731
    ops = await gateway.connect("ops", "logs", roles=("logs",))
    other = await gateway.connect("ops2", "logs", roles=("logs",))
    await ops.emit("logs:subscribe", {"services": ["billing"]})
    await other.emit("logs:subscribe", {"services": ["billing"], "contains": "paid"})
    entries = [{"level": "info", "message": f"invoice {i} paid"} for i in range(3)]
    entries.append({"level": "info", "message": "invoice 3 sent"})
    response = await AsyncHTTPClient().fetch(
        f"{gateway.http}/api/v1/logs",
        method="POST",
        headers={"Authorization": f"Bearer {gateway.token('billing', ('service',))}"},
        body=orjson.dumps({"entries": entries}),
    )
    assert response.code == 200
    for _ in range(4):
        await ops.next_event("log:entry")
    for _ in range(3):
        await other.next_event("log:entry")
    # One per entry per subscriber that received it.
    await eventually(lambda: streamed() == 7)
    assert value(gateway, "switchboard_log_entries_dropped_total") == 0
