"""The Redis mirror (server/cluster/redis_broker.py) between real nodes and a real redis-server.

Every test starts its own ``redis-server`` and two or three :class:`Node`
instances in this process, sharing one SQLite file (peewee models are bound
process-wide, so the nodes must share the database URL) and that Redis. The
assertions are what clients see (events, exactly once, closes), what Redis
sees (``PUBSUB NUMSUB`` of each channel, ``CLIENT KILL``) and what an
operator sees (``/health/websocket``, ``switchboard_redis_*`` metrics).

The deaf-subscription test puts a small TCP proxy between one node and
Redis that can swallow everything Redis sends on the subscriber connection
while keeping it open: a subscription that hears nothing and reports no
error, which only the self-check can notice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from tornado.httpclient import AsyncHTTPClient

from server.app import Node
from server.cluster.redis_broker import RedisBroker
from server.realtime.hub import Target
from switchboard_client import Client
from tests.conftest import Gateway, make_config
from tests.support.client_checks import (
    assert_no_event,
    barrier,
    sentinel_event,
    sentinel_message,
    settle,
)
from tests.support.services import RedisServer, require_binary
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

PREFIX = "switchboard"
#: Redis reconnects go through capped backoff: allow a few rounds of it.
MIRROR_TIMEOUT_SECS = 15.0


def channel(kind: str, key: str) -> str:
    return f"{PREFIX}:{kind}:{key}"


def mirror(gw: Gateway) -> RedisBroker:
    broker = gw.node.broker
    assert isinstance(broker, RedisBroker)
    return broker


def sample(gw: Gateway, name: str) -> float:
    return gw.node.registry.get_sample_value(name) or 0.0


async def health(gw: Gateway) -> dict[str, Any]:
    resp = await AsyncHTTPClient().fetch(
        f"{gw.http}/health/websocket", raise_error=False, request_timeout=10
    )
    body: dict[str, Any] = orjson.loads(resp.body)
    return body


class Proxy:
    """A TCP proxy to Redis that can make its subscriber connections deaf, or cut them all."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[dict[str, Any]] = []
        self._cut = False
        self._subscribe_delay_secs = 0.0

    def cut(self) -> None:
        """Close every connection and refuse new ones until :meth:`mend`: Redis, as
        this proxy's users see it, is down while it runs for everyone else."""
        self._cut = True
        for link in self._links:
            for w in link["writers"]:
                w.close()

    def mend(self) -> None:
        self._cut = False

    def delay_subscribes(self, secs: float) -> None:
        """Hold each SUBSCRIBE for ``secs`` before Redis sees it (a slow link)."""
        self._subscribe_delay_secs = secs

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def deafen_subscribers(self) -> int:
        """From now on, swallow what Redis sends to connections that subscribed."""
        links = [link for link in self._links if link["subscriber"] and not link["closed"]]
        for link in links:
            link["deaf"] = True
        return len(links)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        link = {"subscriber": False, "deaf": False, "closed": False, "writers": (writer, up_writer)}
        self._links.append(link)

        async def client_to_redis() -> None:
            while data := await reader.read(65536):
                if b"SUBSCRIBE" in data.upper():
                    link["subscriber"] = True
                    await asyncio.sleep(self._subscribe_delay_secs)
                up_writer.write(data)
                await up_writer.drain()

        async def redis_to_client() -> None:
            while data := await up_reader.read(65536):
                if not link["deaf"]:
                    writer.write(data)
                    await writer.drain()

        await asyncio.wait(
            [asyncio.create_task(client_to_redis()), asyncio.create_task(redis_to_client())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        link["closed"] = True
        for w in (writer, up_writer):
            w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            for w in link["writers"]:
                w.close()


class Cluster:
    """Nodes on one Redis and one database, plus a plain Redis client for assertions."""

    def __init__(self, tmp_path: Any, redis_server: RedisServer) -> None:
        self.tmp_path = tmp_path
        self.redis_server = redis_server
        self.db_url = f"sqlite:///{tmp_path}/shared.db"
        self.redis = aioredis.Redis.from_url(redis_server.url)
        self.gateways: list[Gateway] = []
        self.proxies: list[Proxy] = []

    async def node(
        self,
        node_id: str,
        *,
        redis_url: str | None = None,
        self_check_secs: tuple[float, float] | None = None,
    ) -> Gateway:
        home = self.tmp_path / node_id
        home.mkdir(exist_ok=True)
        config = make_config(
            home, node_id=node_id, database_url=self.db_url,
            redis_url=redis_url or self.redis_server.url,
        )  # fmt: skip
        node = Node(config)
        if self_check_secs is not None:
            broker = node.broker
            assert isinstance(broker, RedisBroker)
            broker.self_check_interval_secs, broker.self_check_timeout_secs = self_check_secs
        await node.start()
        gw = Gateway(node)
        self.gateways.append(gw)
        return gw

    async def proxy(self) -> Proxy:
        proxy = Proxy(self.redis_server.port)
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    async def numsub(self, name: str) -> int:
        reply = await self.redis.pubsub_numsub(name)
        return int(reply[0][1])

    async def wait_numsub(self, name: str, count: int) -> None:
        async def check() -> bool:
            try:
                return await self.numsub(name) == count
            except (aioredis.RedisError, OSError):
                return False

        await eventually(
            check, timeout=MIRROR_TIMEOUT_SECS, what=f"{count} subscriber(s) of {name}"
        )

    async def close(self) -> None:
        for gw in self.gateways:
            await gw.close_clients()
        for gw in self.gateways:
            stop = asyncio.ensure_future(gw.node.stop(grace_secs=1.0))
            await asyncio.wait([stop], timeout=10)
            if not stop.done():
                for task in asyncio.all_tasks():
                    task.print_stack(limit=12)
                raise AssertionError("node did not stop")
        for proxy in self.proxies:
            await proxy.close()
        await self.redis.aclose()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    require_binary("redis-server", "redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest_asyncio.fixture
async def cluster(tmp_path: Any, redis_server: RedisServer) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, redis_server)
    yield c
    await c.close()


async def in_room(
    cluster: Cluster, room_id: str, owner: Client, *members: Client, nodes: int
) -> None:
    """``owner`` creates ``room_id``; everyone joins; wait until ``nodes`` nodes subscribe."""
    await owner.emit("room:create", {"roomId": room_id, "name": room_id.title()})
    for client in (owner, *members):
        await client.emit("room:join", {"roomId": room_id})
    await cluster.wait_numsub(channel("room", room_id), nodes)
    await settle(owner, *members)


async def send(client: Client, room_id: str, content: str) -> dict[str, Any]:
    ack = await client.emit("message:send", {"roomId": room_id, "content": content})
    message: dict[str, Any] = ack["message"]
    return message


def is_message(content: str) -> Callable[[Any], bool]:
    return lambda frame: frame["data"]["message"]["content"] == content


# -- delivery ------------------------------------------------------------------


async def test_room_message_reaches_other_node_once_and_idle_node_not_at_all(
    cluster: Cluster,
) -> None:
    a, b, c = [await cluster.node(n) for n in ("node-a", "node-b", "node-c")]
    alice, dave = await a.connect("alice"), await a.connect("dave")
    bob = await b.connect("bob")
    carol = await c.connect("carol")  # connected, but never in the room
    await in_room(cluster, "lobby", alice, dave, bob, nodes=2)
    # Node C has no member: not subscribed to the room, so Redis never sends it the traffic.
    assert await cluster.numsub(channel("room", "lobby")) == 2
    assert channel("room", "lobby") not in mirror(c).subscribed_channels()
    assert channel("room", "lobby") in mirror(b).subscribed_channels()
    await settle(carol)
    received_b = sample(b, "switchboard_redis_received_total")
    received_c = sample(c, "switchboard_redis_received_total")
    published_a = sample(a, "switchboard_redis_published_total")

    message = await send(alice, "lobby", "hello from a")
    for client in (dave, bob):
        frame = await client.next_event("message:new", predicate=is_message("hello from a"))
        assert frame["data"]["message"]["seq"] == message["seq"]
    # Exactly once: no second copy on either node, and no echo back to the sender.
    await sentinel_message(alice, "lobby", dave, bob)
    for client in (dave, bob):
        await assert_no_event(client, "message:new", ping=False)
    await assert_no_event(alice, "message:new")
    await assert_no_event(carol, "message:new")
    # (B may also get bob's notification events on his user channel.)
    assert sample(b, "switchboard_redis_received_total") >= received_b + 1
    assert sample(c, "switchboard_redis_received_total") == received_c
    assert sample(a, "switchboard_redis_published_total") >= published_a + 1
    assert sample(b, "switchboard_redis_pubsub_lag_seconds_count") >= 1

    # And back the other way: B's sender gets its ack, A's members get it once.
    await send(bob, "lobby", "hello from b")
    for client in (alice, dave):
        await client.next_event("message:new", predicate=is_message("hello from b"))
    await sentinel_message(bob, "lobby", alice, dave)
    for client in (alice, dave):
        await assert_no_event(client, "message:new", ping=False)
    await assert_no_event(bob, "message:new")


async def test_unsubscribes_when_the_last_local_member_leaves(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    alice = await a.connect("alice")
    bob, bob2 = await b.connect("bob"), await b.connect("bob")
    await in_room(cluster, "quiet", alice, bob, bob2, nodes=2)
    await cluster.wait_numsub(channel("user", "bob"), 1)

    await bob.emit("room:leave", {"roomId": "quiet"})
    # Sentinel: B subscribes to another room; its subscriptions are synced in
    # order, so a wrong unsubscribe of "quiet" would be done by then.
    await in_room(cluster, "marker", alice, bob2, nodes=2)
    assert await cluster.numsub(channel("room", "quiet")) == 2  # bob2 is still in it
    await bob2.aclose()
    await cluster.wait_numsub(channel("room", "quiet"), 1)
    await bob.aclose()
    await cluster.wait_numsub(channel("user", "bob"), 0)
    assert await cluster.numsub(channel("ns", "chat")) == 1

    received_b = sample(b, "switchboard_redis_received_total")
    await send(alice, "quiet", "nobody on b")
    await send(alice, "quiet", "still nobody")
    # Sentinel: B does hear A's broadcasts to every node, sent after the messages.
    a.node.hub.publish(Target.all(), "test:sentinel", {})
    await eventually(
        lambda: sample(b, "switchboard_redis_received_total") > received_b,
        what="B received the sentinel",
    )
    assert sample(b, "switchboard_redis_received_total") == received_b + 1


async def test_the_welcome_waits_until_the_node_hears_the_connections_channels(
    cluster: Cluster,
) -> None:
    """A broadcast another node sends right after the welcome reaches the new connection."""
    proxy = await cluster.proxy()
    a, b = await cluster.node("node-a"), await cluster.node("node-b", redis_url=proxy.url)
    proxy.delay_subscribes(0.4)  # b hears a new channel 0.4 s after it asks
    bob = await b.connect("bob", namespace="notifications", roles=("user", "moderator"))
    hub = a.node.hub
    hub.publish(Target.user("bob"), "test:user", {})
    hub.publish(Target.ns("notifications"), "test:ns", {})
    hub.publish(Target.role("moderator"), "test:role", {})
    for event in ("test:user", "test:ns", "test:role"):
        await bob.next_event(event, timeout=5)


async def test_user_namespace_and_all_targets_cross_nodes(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    alice = await a.connect("alice")
    bob_chat = await b.connect("bob")
    bob_notes = await b.connect("bob", namespace="notifications")
    carol_notes = await a.connect("carol", namespace="notifications")
    everyone = (alice, bob_chat, bob_notes, carol_notes)
    await cluster.wait_numsub(channel("user", "bob"), 1)
    await cluster.wait_numsub(channel("ns", "notifications"), 2)
    await settle(*everyone)
    hub = a.node.hub

    async def expect(event: str, receivers: tuple[Client, ...]) -> None:
        for client in receivers:
            await client.next_event(event)
        await sentinel_event(hub, Target.all(), *everyone)
        for client in everyone:
            await assert_no_event(client, event, ping=False)

    hub.publish(Target.user("bob"), "test:user", {})
    await expect("test:user", (bob_chat, bob_notes))
    hub.publish(Target.user("bob", "chat"), "test:user_chat", {})
    await expect("test:user_chat", (bob_chat,))
    hub.publish(Target.ns("notifications"), "test:ns", {})
    await expect("test:ns", (bob_notes, carol_notes))
    hub.publish(Target("all", "", "chat"), "test:all_chat", {})
    await expect("test:all_chat", (alice, bob_chat))
    hub.publish(Target.all(), "test:all", {})
    await expect("test:all", everyone)
    # A connection id is node-local: another node's connection is not reachable by id.
    conn_id = next(iter(b.node.hub.connections))
    hub.publish(Target.connection(conn_id), "test:conn", {})
    await expect("test:conn", ())


async def test_publish_many_delivers_once_per_connection_across_nodes(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    alice = await a.connect("alice")
    bob = await b.connect("bob")
    erin = await b.connect("erin")
    await in_room(cluster, "dup", alice, bob, nodes=2)
    await settle(erin)
    hub = a.node.hub

    # bob is reached through the room and his user channel: one copy each, one delivery.
    delivered = hub.publish_many(
        [Target.room("dup"), Target.user("bob", "chat"), Target.user("alice")], "test:few", {}
    )
    assert delivered == 1  # alice, once, locally
    await bob.next_event("test:few")
    await alice.next_event("test:few")
    await sentinel_event(hub, Target.all(), alice, bob, erin)
    for client in (alice, bob, erin):
        await assert_no_event(client, "test:few", ping=False)

    # Many targets go once over the all channel, still one delivery per connection.
    many = [Target.room("dup"), *(Target.user(f"u{i}") for i in range(30)), Target.user("bob")]
    received_b = sample(b, "switchboard_redis_received_total")
    hub.publish_many(many, "test:many", {})
    await bob.next_event("test:many")
    await sentinel_event(hub, Target.all(), bob, erin)
    for client in (bob, erin):
        await assert_no_event(client, "test:many", ping=False)
    # One message for the many targets, one for the sentinel.
    assert sample(b, "switchboard_redis_received_total") == received_b + 2


async def test_kick_and_ban_on_one_node_close_the_user_on_the_other(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    admin = await a.connect("root", namespace="admin", roles=("admin",))
    mallory_a = await a.connect("mallory")
    mallory_b = await b.connect("mallory")
    mallory_notes = await b.connect("mallory", namespace="notifications")
    await cluster.wait_numsub(channel("user", "mallory"), 2)

    ack = await admin.emit("admin:kick", {"userId": "mallory", "reason": "spam"})
    # Every node's: one here, two that node B closes when the relay reaches it.
    assert ack["connectionsClosed"] == 3
    for client in (mallory_a, mallory_b, mallory_notes):
        kicked = await client.next_event("system:kicked")
        assert kicked["data"]["reason"] == "spam"
        await client.wait_closed()
        assert client.close_code == 4403

    trudy = await b.connect("trudy")
    await cluster.wait_numsub(channel("user", "trudy"), 1)
    await admin.emit("admin:ban", {"userId": "trudy", "reason": "abuse"})
    error = await trudy.next_event("system:error")
    assert error["data"]["code"] == "BANNED"
    assert error["data"]["details"]["reason"] == "abuse"
    await trudy.wait_closed()
    assert trudy.close_code == 4403


# -- failures ------------------------------------------------------------------------


def contents(frames: list[dict[str, Any]]) -> list[str]:
    """The messages' contents, in arrival order, less the sentinels."""
    texts = [frame["data"]["message"]["content"] for frame in frames]
    return [text for text in texts if not text.startswith("sentinel ")]


async def test_redis_killed_mid_traffic_then_back(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    # What the nodes deliver, as they deliver it: the clients' own hole repair
    # (which would fetch b-during from history during the outage) is off.
    raw = {"hole_wait": None}
    alice, dave = await a.connect("alice", **raw), await a.connect("dave", **raw)
    bob, carol = await b.connect("bob", **raw), await b.connect("carol", **raw)
    await in_room(cluster, "ops", alice, dave, bob, carol, nodes=2)
    await send(alice, "ops", "before")
    await bob.next_event("message:new", predicate=is_message("before"))
    await carol.next_event("message:new", predicate=is_message("before"))
    await dave.next_event("message:new", predicate=is_message("before"))
    assert (await health(a))["status"] == "healthy"

    await asyncio.to_thread(redis_server.kill)
    await eventually(
        lambda: not mirror(a).ok and not mirror(b).ok,
        timeout=MIRROR_TIMEOUT_SECS,
        what="both mirrors down",
    )
    # Local delivery goes on; the other node cannot hear it. Seqs interleave:
    # node b's own message falls between node a's.
    for content in ("during-1", "during-2"):
        await send(alice, "ops", content)
    await send(carol, "ops", "b-during")
    await send(alice, "ops", "during-3")
    await barrier(dave, bob)
    assert contents(dave.drain_events("message:new")) == ["during-1", "during-2", "during-3"]
    assert contents(bob.drain_events("message:new")) == ["b-during"]
    for gw in (a, b):
        doc = await health(gw)
        assert doc["status"] == "degraded", doc
        assert doc["services"]["redis"] == "down"
        assert any(r.startswith("redis:") for r in doc["reasons"]), doc
        assert sample(gw, "switchboard_redis_up") == 0
    assert sample(a, "switchboard_redis_dropped_total") >= 1

    await asyncio.to_thread(redis_server.start)
    for gw in (a, b):
        await eventually(
            lambda gw=gw: mirror(gw).ok,
            timeout=MIRROR_TIMEOUT_SECS,
            what=f"{gw.config.node_id} reconnected",
        )
        assert sample(gw, "switchboard_redis_reconnects_total") >= 1
        assert sample(gw, "switchboard_redis_up") == 1
    # Re-subscribed to everything needed on the new (empty) server.
    await cluster.wait_numsub(channel("room", "ops"), 2)
    await cluster.wait_numsub(channel("user", "bob"), 1)
    await cluster.wait_numsub(channel("node", "node-b"), 1)
    await send(alice, "ops", "after")
    await sentinel_message(alice, "ops", bob, carol)
    await sentinel_message(carol, "ops", alice, dave)
    # Each node caught its members up from the database when its link came
    # back, before live traffic: every message the outage kept from them,
    # once, in order, on the same connections.
    missed_on_b = ["during-1", "during-2", "during-3", "after"]
    assert contents(bob.drain_events("message:new")) == missed_on_b
    assert contents(carol.drain_events("message:new")) == missed_on_b
    assert contents(dave.drain_events("message:new")) == ["b-during", "after"]
    assert contents(alice.drain_events("message:new")) == ["b-during"]
    assert (await health(a))["status"] == "healthy"
    assert not alice.closed and not bob.closed
    assert all(client.reconnects == 0 for client in (alice, dave, bob, carol))


async def outage_past_the_catch_up_bound(
    cluster: Cluster, *, hole_wait: float | None
) -> tuple[Client, Client, list[dict[str, Any]]]:
    """alice on a, bob on b (catch-up bound 3, hole repair after ``hole_wait``) in "ops";
    b loses Redis while alice sends during-0..4, and is back: (alice, bob, sent)."""
    proxy = await cluster.proxy()
    a, b = await cluster.node("node-a"), await cluster.node("node-b", redis_url=proxy.url)
    b.node.catch_up.max_per_room = 3
    alice, bob = await a.connect("alice"), await b.connect("bob", hole_wait=hole_wait)
    await in_room(cluster, "ops", alice, bob, nodes=2)
    proxy.cut()  # only b loses Redis: a publishes, b does not hear
    await eventually(lambda: not mirror(b).ok, timeout=MIRROR_TIMEOUT_SECS, what="b down")
    sent = [await send(alice, "ops", f"during-{i}") for i in range(5)]
    proxy.mend()
    await eventually(lambda: mirror(b).ok, timeout=MIRROR_TIMEOUT_SECS, what="b back")
    return alice, bob, sent


async def test_a_catch_up_beyond_its_bound_tells_members_to_resync(cluster: Cluster) -> None:
    # bob's client repair is off: it would fetch what the bound left out itself.
    alice, bob, sent = await outage_past_the_catch_up_bound(cluster, hole_wait=None)
    await sentinel_message(alice, "ops", bob)
    assert contents(bob.drain_events("message:new")) == ["during-0", "during-1", "during-2"]
    (resync,) = bob.drain_events("room:resync")
    assert resync["data"] == {"roomId": "ops", "afterSeq": sent[2]["seq"]}
    # What the bound left out is in the history, right after afterSeq.
    page = await bob.emit(
        "room:get_messages", {"roomId": "ops", "afterSeq": resync["data"]["afterSeq"]}
    )
    in_order = sorted(page["messages"], key=lambda m: m["seq"])
    assert [m["content"] for m in in_order][:2] == ["during-3", "during-4"]


async def test_the_client_fetches_what_a_bounded_catch_up_left_out_on_resync(
    cluster: Cluster,
) -> None:
    # Hole repair waits an hour: only room:resync can bring the rest in time.
    alice, bob, _ = await outage_past_the_catch_up_bound(cluster, hole_wait=3600)
    # The sentinel follows the gap the bound left: it is delivered only once
    # the client has fetched during-3 and during-4.
    await sentinel_message(alice, "ops", bob)
    received = bob.drain_events("message:new")
    assert contents(received) == [f"during-{i}" for i in range(5)]
    assert [frame.get("recovered", False) for frame in received] == [False] * 3 + [True] * 2
    assert bob.reconnects == 0


async def test_a_node_back_on_redis_has_the_others_catch_up_what_it_could_not_publish(
    cluster: Cluster,
) -> None:
    """Only node a loses Redis: b's link never drops, yet b's members get a's messages."""
    proxy = await cluster.proxy()
    a = await cluster.node("node-a", redis_url=proxy.url)
    b = await cluster.node("node-b")
    alice, bob = await a.connect("alice"), await b.connect("bob")
    await in_room(cluster, "ops", alice, bob, nodes=2)
    proxy.cut()  # only a loses Redis
    await eventually(lambda: not mirror(a).ok, timeout=MIRROR_TIMEOUT_SECS, what="a down")
    for content in ("during-1", "during-2"):
        await send(alice, "ops", content)
    assert mirror(b).ok
    proxy.mend()
    await eventually(lambda: mirror(a).ok, timeout=MIRROR_TIMEOUT_SECS, what="a back")
    await sentinel_message(alice, "ops", bob)
    assert contents(bob.drain_events("message:new")) == ["during-1", "during-2"]
    assert bob.reconnects == 0


async def test_node_starts_without_redis_and_joins_later(tmp_path: Any) -> None:
    require_binary("redis-server", "redis-server is not installed")
    server = RedisServer()  # port reserved, not started yet
    cluster = Cluster(tmp_path, server)
    try:
        a = await cluster.node("node-a")
        assert not mirror(a).ok
        doc = await health(a)
        assert doc["status"] == "degraded" and doc["services"]["redis"] == "down"
        alice = await a.connect("alice")
        await asyncio.to_thread(server.start)
        await eventually(lambda: mirror(a).ok, timeout=MIRROR_TIMEOUT_SECS, what="mirror up")
        await cluster.wait_numsub(channel("user", "alice"), 1)
        assert not alice.closed
    finally:
        await cluster.close()
        await asyncio.to_thread(server.stop)


async def test_killed_subscriber_connection_is_detected_and_restored(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    alice = await a.connect("alice")
    bob = await b.connect("bob")
    await in_room(cluster, "kill", alice, bob, nodes=2)

    killed = await cluster.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    assert int(killed) == 2
    for gw in (a, b):
        await eventually(
            lambda gw=gw: sample(gw, "switchboard_redis_reconnects_total") >= 1,
            timeout=MIRROR_TIMEOUT_SECS,
            what=f"{gw.config.node_id} reconnected",
        )
    await cluster.wait_numsub(channel("room", "kill"), 2)
    await send(alice, "kill", "still here")
    await bob.next_event("message:new", predicate=is_message("still here"))
    await sentinel_message(alice, "kill", bob)
    await assert_no_event(bob, "message:new", ping=False)


async def test_deaf_subscription_is_caught_by_the_self_check(cluster: Cluster) -> None:
    proxy = await cluster.proxy()
    a = await cluster.node("node-a")
    b = await cluster.node("node-b", redis_url=proxy.url, self_check_secs=(0.2, 0.5))
    alice = await a.connect("alice")
    bob = await b.connect("bob")
    await in_room(cluster, "deaf", alice, bob, nodes=2)

    assert proxy.deafen_subscribers() == 1
    # The subscription is still there as far as Redis knows; B just hears nothing.
    assert await cluster.numsub(channel("room", "deaf")) == 2
    await eventually(
        lambda: sample(b, "switchboard_redis_reconnects_total") >= 1,
        timeout=MIRROR_TIMEOUT_SECS,
        what="deaf subscription noticed",
    )
    await eventually(lambda: mirror(b).ok, timeout=MIRROR_TIMEOUT_SECS, what="mirror up again")
    await cluster.wait_numsub(channel("room", "deaf"), 2)
    await send(alice, "deaf", "can you hear me")
    await bob.next_event("message:new", predicate=is_message("can you hear me"))
    await sentinel_message(alice, "deaf", bob)
    await assert_no_event(bob, "message:new", ping=False)
    assert not bob.closed


async def test_stopping_a_node_drops_its_subscriptions(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    await b.connect("bob")
    await cluster.wait_numsub(channel("user", "bob"), 1)
    await b.close_clients()
    await b.node.stop(grace_secs=1.0)
    await cluster.wait_numsub(channel("node", "node-b"), 0)
    assert await cluster.numsub(f"{PREFIX}:all") == 1  # only node A is left
    assert mirror(a).ok
