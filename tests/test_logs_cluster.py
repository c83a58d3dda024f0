"""Cluster-wide logs: two gateway processes sharing one redis-server.

An entry ingested on one node reaches ``/ws/logs`` subscribers on the other
exactly once, filtered; ``recent`` and ``stats`` answer for the cluster with
a per-node breakdown, and name a node that does not answer as missing.

The cluster runs with a long heartbeat so that a killed node stays
registered (and so is reported missing, not forgotten) for the last test;
nothing here waits on the heartbeat otherwise. The first tests use two
nodes of this process on a :class:`~server.realtime.broker.MemoryBus`
(a stalled subscriber needs the node's handler at hand).
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from tornado.httpclient import AsyncHTTPClient

from handlers.logs import LogsHandler
from server.app import Node
from server.realtime.broker import MemoryBroker, MemoryBus
from switchboard_client import Client
from tests.conftest import Gateway, make_config
from tests.support.cluster import Clients, Cluster
from tests.support.services import require_binary
from tests.support.waiting import eventually
from tests.test_logs import RawSubscriber
from tests.test_logs import ingest as ingest_on

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

# A killed node is reaped after 1.5 intervals: long enough to see it missing.
HEARTBEAT_INTERVAL_SECS = 20.0
LOG_EVENTS = ("log:entry", "log:warning", "log:error")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_binary("redis-server", "redis-server is not installed")
    require_binary("initdb", "PostgreSQL (initdb/pg_ctl) is not installed")
    with Cluster(("a", "b"), heartbeat_interval=HEARTBEAT_INTERVAL_SECS) as running:
        yield running


@pytest_asyncio.fixture
async def clients(cluster: Cluster) -> AsyncIterator[Clients]:
    cluster.ensure_running()
    opened = Clients(cluster)
    yield opened
    await opened.aclose()


def service_name() -> str:
    """A service name no other test (or run) uses."""
    return f"svc-{secrets.token_hex(4)}"


async def call(
    cluster: Cluster, node: str, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    response = await AsyncHTTPClient().fetch(
        cluster.node(node).http + path,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=None if body is None else orjson.dumps(body),
        raise_error=False,
        request_timeout=10,
    )
    return response.code, orjson.loads(response.body) if response.body else None


async def ingest(cluster: Cluster, node: str, service: str, entries: list[dict[str, Any]]) -> None:
    token = cluster.token(service, ("service",))
    status, body = await call(cluster, node, "POST", "/api/v1/logs", token, {"entries": entries})
    assert (status, body) == (200, {"accepted": len(entries)})


async def read(cluster: Cluster, node: str, path: str) -> Any:
    status, body = await call(cluster, node, "GET", path, cluster.token("ops", ("logs",)))
    assert status == 200, body
    return body


async def log_reader(clients: Clients, node: str, **filter_: Any) -> Client:
    reader = await clients.connect(node, f"ops-{secrets.token_hex(3)}", "logs", roles=("logs",))
    await reader.emit("logs:subscribe", filter_)
    return reader


def messages(client: Client) -> list[str]:
    return [f["data"]["message"] for f in client.events if f["event"] in LOG_EVENTS]


async def until_message(client: Client, text: str) -> dict[str, Any]:
    frame = await client.next_event(
        None, timeout=10,
        predicate=lambda f: f["event"] in LOG_EVENTS and f["data"]["message"] == text,
    )  # fmt: skip
    data: dict[str, Any] = frame["data"]
    return data


async def numsub(cluster: Cluster, channel: str) -> int:
    client = aioredis.from_url(cluster.redis.url)
    try:
        reply = await client.pubsub_numsub(cluster.redis_key(channel))
    finally:
        await client.aclose()
    return int(reply[0][1])


# -- two nodes of this process ----------------------------------------------------------


@pytest_asyncio.fixture
async def pair(tmp_path: Any) -> AsyncIterator[tuple[Gateway, Gateway]]:
    bus = MemoryBus()
    gateways = []
    for node_id in ("a", "b"):
        home = tmp_path / node_id
        home.mkdir()
        config = make_config(
            home, node_id=node_id, database_url=f"sqlite:///{tmp_path}/shared.db",
            max_outbound_bytes=64 * 1024,
        )  # fmt: skip
        node = Node(config, broker=MemoryBroker(node_id, bus))
        await node.start()
        gateways.append(Gateway(node))
    a, b = gateways
    yield a, b
    for gw in (a, b):
        await gw.close_clients()
        await gw.node.stop(grace_secs=1.0)


async def test_a_stalled_subscriber_on_a_does_not_slow_ingestion_on_b(pair: Any) -> None:
    a, b = pair
    raw = await RawSubscriber.open(a.port, a.token("ops", ("logs",)))
    assert (await raw.frame())["event"] == "system:welcome"
    raw.send({"event": "logs:subscribe", "data": {"services": ["flood"]}, "ack": 1})
    assert (await raw.frame())["ack"] == 1
    handler = next(c for c in a.node.hub.connections.values() if isinstance(c, LogsHandler))
    # The subscriber reads nothing while b ingests until a has had to drop some
    # (the kernel's socket buffers take a few MB first).
    batch = [{"level": "info", "message": f"flood {n} " + "x" * 7000} for n in range(120)]
    dropped_total = "switchboard_log_entries_dropped_total"
    produced = 0
    while not a.node.registry.get_sample_value(dropped_total):
        assert produced < 40 * len(batch), "a never started dropping"
        await ingest_on(b, batch, service="flood")  # answered: b does not wait for a
        produced += len(batch)
        b.node.logs.flush()  # relay now rather than in RELAY_FLUSH_SECS
        assert handler.backlog_bytes <= handler.backlog_cap
    assert handler.backlog_peak <= handler.backlog_cap
    assert handler.conn_id in a.node.hub.connections  # losing entries is no reason to close
    # Every entry ingested on b is either delivered to a's subscriber or counted as dropped.
    delivered, dropped = 0, 0
    while delivered + dropped < produced:
        frame = await asyncio.wait_for(raw.frame(), 10)
        if frame.get("event") == "log:entry":
            assert frame["data"]["node"] == "b"
            delivered += 1
        elif frame.get("event") == "log:dropped":
            dropped += frame["data"]["count"]
    assert delivered + dropped == produced and delivered > 0
    raw.close()


async def test_recent_and_stats_on_a_memory_bus_cover_both_nodes(pair: Any) -> None:
    a, b = pair
    await ingest_on(a, [at(1, "info", "a1")], service="paired")
    await ingest_on(b, [at(2, "warn", "b2")], service="paired")
    reader = await a.connect("ops", roles=("logs",), namespace="logs")
    ack = await reader.emit("logs:recent", {"service": "paired"})
    assert [(e["message"], e["node"]) for e in ack["entries"]] == [("a1", "a"), ("b2", "b")]
    assert ack["missing"] == []
    stats = await a.node.logs.stats()
    assert sorted(stats["nodes"]) == ["a", "b"] and stats["byService"]["paired"] == 2
    await b.node.stop(grace_secs=1.0)  # a clean stop leaves the cluster: not missing
    ack = await reader.emit("logs:recent", {"service": "paired"})
    assert [e["message"] for e in ack["entries"]] == ["a1"] and ack["missing"] == []


# -- live entries ---------------------------------------------------------------------


async def test_an_entry_ingested_on_b_reaches_a_filtered_subscriber_on_a_once(
    cluster: Cluster, clients: Clients
) -> None:
    service = service_name()
    reader = await log_reader(clients, "a", level="WARNING", services=[service])
    everything = await log_reader(clients, "a", services=[service])
    await ingest(cluster, "b", service, [
        {"level": "info", "message": "below the level"},
        {"level": "warn", "message": "w1"},
        {"level": "error", "message": "e1", "context": "Pay.Refund"},
    ])  # fmt: skip
    await ingest(cluster, "b", "other-" + service, [{"level": "error", "message": "other"}])
    # The sentinel follows the same path (node b, its publisher, a's subscription).
    await ingest(cluster, "b", service, [{"level": "error", "message": "sentinel"}])
    sentinel = await until_message(reader, "sentinel")
    assert sentinel["node"] == "b" and sentinel["service"] == service
    # Client.events keeps every event frame received, the sentinel's too.
    assert messages(reader) == ["w1", "e1", "sentinel"]
    await until_message(everything, "sentinel")
    assert messages(everything) == ["below the level", "w1", "e1", "sentinel"]
    e1 = next(f for f in reader.events if f["event"] == "log:error")
    assert e1["data"]["context"] == "Pay.Refund" and e1["data"]["node"] == "b"


async def test_a_node_hears_only_the_levels_its_subscribers_want_while_they_are_there(
    cluster: Cluster, clients: Clients
) -> None:
    # Nobody subscribed yet: the module's earlier readers are closed, and their
    # nodes let go of the channels in their clean-up (after the close).
    for name in ("logs:INFO", "logs:WARNING", "logs:ERROR", "logs:CRITICAL"):
        await eventually(functools.partial(numsub_is, cluster, name, 0), what=f"{name} unheard")
    reader = await log_reader(clients, "a", level="ERROR")
    # The subscribe ack came after Redis confirmed the subscription.
    assert [await numsub(cluster, f"logs:{level}") for level in ("INFO", "WARNING")] == [0, 0]
    assert await numsub(cluster, "logs:ERROR") == 1
    assert await numsub(cluster, "logs:CRITICAL") == 1
    await reader.emit("logs:subscribe", {"level": "info"})
    assert await numsub(cluster, "logs:INFO") == 1
    await reader.emit("logs:unsubscribe")
    await eventually(lambda: numsub_is(cluster, "logs:ERROR", 0))
    assert await numsub(cluster, "logs:INFO") == 0


async def numsub_is(cluster: Cluster, channel: str, count: int) -> bool:
    return await numsub(cluster, channel) == count


async def test_an_entry_ingested_on_a_reaches_subscribers_on_both_nodes_once(
    cluster: Cluster, clients: Clients
) -> None:
    service = service_name()
    on_a = await log_reader(clients, "a", services=[service])
    on_b = await log_reader(clients, "b", services=[service])
    await ingest(cluster, "a", service, [{"level": "info", "message": "once"}])
    await ingest(cluster, "a", service, [{"level": "info", "message": "sentinel"}])
    for reader in (on_a, on_b):
        await until_message(reader, "sentinel")
        assert messages(reader) == ["once", "sentinel"]


# -- recent and stats -----------------------------------------------------------------


def at(second: int, level: str, message: str) -> dict[str, Any]:
    """An entry stamped ``second`` seconds into 2030 (so the order by time is known)."""
    return {"level": level, "message": message, "timestamp": f"2030-01-01T00:00:0{second}Z"}


async def test_recent_merges_every_nodes_entries_by_time_then_applies_the_limit(
    cluster: Cluster, clients: Clients
) -> None:
    service = service_name()
    await ingest(cluster, "a", service, [at(1, "info", "a1"), at(3, "error", "a3")])
    await ingest(cluster, "b", service, [at(2, "info", "b2"), at(4, "error", "b4")])
    body = await read(cluster, "a", f"/api/v1/logs/recent?service={service}&limit=3")
    assert [(e["message"], e["node"]) for e in body["entries"]] == [
        ("b2", "b"), ("a3", "a"), ("b4", "b")
    ]  # fmt: skip
    assert body["missing"] == []
    body = await read(cluster, "b", f"/api/v1/logs/recent?service={service}&level=error")
    assert [e["message"] for e in body["entries"]] == ["a3", "b4"]
    reader = await clients.connect("a", "ops-recent", "logs", roles=("logs",))
    ack = await reader.emit("logs:recent", {"service": service, "limit": 2})
    assert [e["message"] for e in ack["entries"]] == ["a3", "b4"]
    assert ack["truncated"] is False and ack["missing"] == []


async def test_stats_total_the_cluster_with_a_breakdown_per_node(
    cluster: Cluster, clients: Clients
) -> None:
    service = service_name()
    await ingest(cluster, "a", service, [{"level": "error", "message": "on a"}])
    on_b = [{"level": "error", "message": f"on b {n}"} for n in range(3)]
    await ingest(cluster, "b", service, on_b)
    reader = await log_reader(clients, "b", level="error")
    stats = await read(cluster, "a", "/api/v1/logs/stats")
    assert stats["missing"] == [] and set(stats["nodes"]) == {"a", "b"}
    assert stats["byService"][service] == 4
    assert stats["nodes"]["a"]["byService"][service] == 1
    assert stats["nodes"]["b"]["byService"][service] == 3
    assert stats["total"] == stats["nodes"]["a"]["total"] + stats["nodes"]["b"]["total"]
    for level, count in stats["byLevel"].items():
        assert count == sum(node["byLevel"][level] for node in stats["nodes"].values())
    assert stats["nodes"]["b"]["subscribers"] >= 1 and "recentErrors" not in stats["nodes"]["b"]
    nodes = stats["nodes"].values()
    assert stats["subscribers"] == sum(node["subscribers"] for node in nodes)
    newest = [e["message"] for e in stats["recentErrors"] if e["service"] == service]
    assert newest == ["on b 2", "on b 1", "on b 0", "on a"]  # the cluster's, newest first
    await reader.aclose()


# -- a node that does not answer (last: kills b, then starts it again) -----------------


async def test_recent_and_stats_answer_without_a_killed_node_and_name_it_missing(
    cluster: Cluster, clients: Clients
) -> None:
    service = service_name()
    await ingest(cluster, "a", service, [{"level": "info", "message": "still here"}])
    await ingest(cluster, "b", service, [{"level": "info", "message": "gone with b"}])
    cluster.node("b").kill()  # kill -9: still registered until reaped
    try:
        body = await read(cluster, "a", f"/api/v1/logs/recent?service={service}")
        assert [e["message"] for e in body["entries"]] == ["still here"]
        assert body["missing"] == ["b"]
        stats = await read(cluster, "a", "/api/v1/logs/stats")
        assert stats["missing"] == ["b"] and set(stats["nodes"]) == {"a"}
        assert stats["byService"][service] == 1
        reader = await clients.connect("a", "ops-missing", "logs", roles=("logs",))
        ack = await reader.emit("logs:recent", {"service": service})
        assert ack["missing"] == ["b"] and len(ack["entries"]) == 1
    finally:
        cluster.node("b").start()
