"""Cluster-wide presence, limits and the dead-node reaper (server/cluster/redis_link.py,
server/cluster/redis_presence.py, server/cluster/redis_limits.py, server/cluster/node_registry.py,
server/services/node_loss.py, server/cluster/lua/).

Real parts: a redis-server and a PostgreSQL cluster started by the suite,
two gateway :class:`~server.app.Node` s in this process sharing one database
URL and one Redis (each test gets its own key prefix), real WebSocket
clients. The reaper test runs a third node as a ``python -m server serve``
process and kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from server.cluster.node_registry import NodeLoss, NodeRegistry
from server.cluster.redis_limits import RedisConnectionLimiter, RedisRateLimiter
from server.cluster.redis_link import LUA_DIR, ClusterLink
from server.cluster.redis_presence import RedisPresence
from server.core.auth import mint_token
from server.core.config import Config, RateLimit
from server.core.limits import RateLimiter
from server.realtime.hub import Target
from switchboard_client import Client, ClientError
from tests.conftest import ROOMY_RATE_LIMITS, Gateway
from tests.support.client_checks import assert_no_event, background_done, sentinel_event
from tests.support.services import RedisServer, require_binary
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

DATABASE = "postgres"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Short, so the reaper's bound (two intervals) is quick to test.
HEARTBEAT_SECS = 0.5


@pytest.fixture(scope="module")
def redis_server() -> Any:
    require_binary("redis-server", "redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest_asyncio.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


StartCluster = Callable[..., Awaitable[list[Gateway]]]


@pytest.fixture
def cluster(
    gateway_factory: Callable[..., Any], postgres: Any, redis_server: RedisServer
) -> StartCluster:
    """Start ``n`` nodes (node-a, node-b...) sharing a fresh database and key prefix."""

    async def start(n: int = 2, *, redis_url: str | None = None, **overrides: Any) -> list[Gateway]:
        db_url = postgres.create_database(f"t{os.urandom(6).hex()}")
        prefix = f"t{os.urandom(4).hex()}"
        nodes = []
        for i in range(n):
            gw: Gateway = await gateway_factory(
                node_id=f"node-{'abc'[i]}", database_url=db_url,
                redis_url=redis_url or redis_server.url, redis_prefix=prefix,
                heartbeat_interval=HEARTBEAT_SECS, **overrides,
            )  # fmt: skip
            nodes.append(gw)
        return nodes

    return start


async def status_of(gw: Gateway, user: str) -> str:
    return (await gw.node.presence.statuses([user]))[user]


async def make_room(owner: Client, room_id: str) -> None:
    await owner.emit("room:create", {"roomId": room_id, "name": room_id})
    await owner.emit("room:join", {"roomId": room_id})


# -- presence ------------------------------------------------------------------------


async def test_user_is_online_until_the_last_connection_on_any_node_closes(
    cluster: StartCluster,
) -> None:
    a, b = await cluster()
    bob = await b.connect("bob")
    alice_a = await a.connect("alice")
    await make_room(alice_a, "lobby")
    await bob.emit("room:join", {"roomId": "lobby"})
    alice_b = await b.connect("alice")
    for gw in (a, b):
        assert await status_of(gw, "alice") == "online"
        assert await gw.node.presence.online_users() == ["alice", "bob"]
    bob.drain_events()

    await alice_a.aclose()
    # Still connected on B: online everywhere, and nobody is told otherwise.
    # A's clean-up decides; then a sentinel from A through the room's channel.
    await background_done(a.node, alice_a)
    await sentinel_event(a.node.hub, Target.room("lobby"), bob)
    await assert_no_event(bob, "user:status_changed", ping=False)
    for gw in (a, b):
        assert await status_of(gw, "alice") == "online"

    await alice_b.aclose()
    frame = await bob.next_event("user:status_changed")
    assert frame["data"] == {"userId": "alice", "status": "offline"}
    for gw in (a, b):
        await eventually(lambda gw=gw: _is(status_of(gw, "alice"), "offline"))
        assert await gw.node.presence.online_users() == ["bob"]


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def test_second_node_connection_does_not_announce_online_again(
    cluster: StartCluster,
) -> None:
    a, b = await cluster()
    alice = await a.connect("alice")
    await make_room(alice, "lobby")
    bob = await b.connect("bob")
    await bob.emit("room:join", {"roomId": "lobby"})
    bob.drain_events()
    await b.connect("alice")
    # The first connection (on A) made her online; B's is not a change (B would
    # tell bob, on B, directly).
    await background_done(b.node)
    await assert_no_event(bob, "user:status_changed")


async def test_status_set_on_one_node_is_seen_on_the_other(cluster: StartCluster) -> None:
    a, b = await cluster()
    alice = await a.connect("alice")
    await make_room(alice, "lobby")
    await alice.emit("user:status_update", {"status": "busy"})
    assert await status_of(b, "alice") == "busy"
    bob = await b.connect("bob")
    joined = await bob.emit("room:join", {"roomId": "lobby"})
    assert {m["userId"]: m["status"] for m in joined["members"]}["alice"] == "busy"
    members = await bob.emit("room:members", {"roomId": "lobby"})
    assert {m["userId"]: m["status"] for m in members["members"]} == {
        "alice": "busy", "bob": "online",
    }  # fmt: skip


# -- limits --------------------------------------------------------------------------


async def test_connection_limit_counts_every_node(cluster: StartCluster) -> None:
    a, b = await cluster(max_connections_per_user=2)
    await a.connect("alice")
    second = await b.connect("alice")
    for gw in (a, b):
        with pytest.raises(ClientError) as info:
            await gw.connect("alice")
        assert info.value.code == "TOO_MANY_CONNECTIONS"
        assert info.value.close_code == 4429
    # Other users are not affected; a freed slot can be taken from any node.
    await a.connect("bob")
    await second.aclose()

    async def third_admitted() -> bool:
        try:
            await a.connect("alice")
        except ClientError:
            return False
        return True

    await eventually(third_admitted)


async def test_chat_connections_are_known_on_every_node(cluster: StartCluster) -> None:
    a, b = await cluster()
    alice = await a.connect("alice")
    await b.connect("bob", namespace="notifications")
    for gw in (a, b):
        limiter = gw.node.connection_limiter
        assert await limiter.connected("chat", ["alice", "bob", "carol"]) == {"alice"}
    await alice.aclose()

    async def alice_gone() -> bool:
        return await b.node.connection_limiter.connected("chat", ["alice"]) == set()

    await eventually(alice_gone)


async def test_rate_limit_bucket_is_shared_by_all_nodes(cluster: StartCluster) -> None:
    a, b = await cluster(rate_limits=ROOMY_RATE_LIMITS.replace("messages=1000/1m", "messages=3/1m"))
    alice_a = await a.connect("alice")
    await make_room(alice_a, "lobby")
    alice_b = await b.connect("alice")
    await alice_b.emit("room:join", {"roomId": "lobby"})
    await alice_a.emit("message:send", {"roomId": "lobby", "content": "1"})
    await alice_b.emit("message:send", {"roomId": "lobby", "content": "2"})
    await alice_a.emit("message:send", {"roomId": "lobby", "content": "3"})
    for client in (alice_b, alice_a):
        with pytest.raises(ClientError) as info:
            await client.emit("message:send", {"roomId": "lobby", "content": "4"})
        assert info.value.code == "RATE_LIMITED"
        details = info.value.details
        assert details["limit"] == 3 and details["window"] == 60_000
        # One token per 20 s; less than a second has passed since it ran out.
        assert 19_000 <= details["retryAfter"] <= 20_000
    # Another user's bucket is untouched.
    bob = await b.connect("bob")
    await bob.emit("room:join", {"roomId": "lobby"})
    await bob.emit("message:send", {"roomId": "lobby", "content": "hi"})


async def test_redis_token_bucket_decides_like_the_local_one(
    redis: aioredis.Redis,
) -> None:
    limits = {"messages": RateLimit(4, 2.0)}
    link = ClusterLink(redis, f"t{os.urandom(4).hex()}", "node-a")
    shared, local = RedisRateLimiter(link, limits), RateLimiter(limits)
    # Never answered from this node's buckets while Redis is there: handlers await hit().
    assert shared.hit_now("u", "messages") is None
    for _ in range(4):
        assert (await shared.hit("u", "messages")).allowed
        assert (await local.hit("u", "messages")).allowed
    denied, local_denied = await shared.hit("u", "messages"), await local.hit("u", "messages")
    assert not denied.allowed and not local_denied.allowed
    assert abs(denied.retry_after_ms - local_denied.retry_after_ms) <= 50
    assert denied.details() == {"retryAfter": denied.retry_after_ms, "limit": 4, "window": 2000}
    # Continuous refill: after retryAfter one more event fits, not two. A
    # real-clock wait: the bucket refills with Redis' clock, not on an event.
    await asyncio.sleep(denied.retry_after_ms / 1000 + 0.02)
    assert (await shared.hit("u", "messages")).allowed
    assert not (await shared.hit("u", "messages")).allowed
    await shared.reset("u")
    assert (await shared.hit("u", "messages")).allowed


def cluster_parts(
    redis: aioredis.Redis, prefix: str, node_id: str, on_loss: Callable[[NodeLoss], Awaitable[None]]
) -> tuple[ClusterLink, RedisPresence, NodeRegistry]:
    """One node's cluster state without a gateway: link, presence, limiters, registry."""
    link = ClusterLink(redis, prefix, node_id)
    presence = RedisPresence(link)
    limiter = RedisConnectionLimiter(link, per_user=5, per_ip=20)
    RedisRateLimiter(link, {"messages": RateLimit(4, 2.0)})
    registry = NodeRegistry(link, presence, limiter, HEARTBEAT_SECS,
                            local_connections=lambda: 0, on_loss=on_loss)  # fmt: skip
    return link, presence, registry


async def ignore_loss(loss: NodeLoss) -> None:
    pass


async def test_every_lua_file_is_registered_and_scripts_run_on_redis(
    redis: aioredis.Redis,
) -> None:
    link, presence, _ = cluster_parts(redis, f"t{os.urandom(4).hex()}", "node-a", ignore_loss)
    files = sorted(LUA_DIR.glob("*.lua"))
    assert files, f"no Lua scripts in {LUA_DIR}"
    sources = [script.script for script in link.scripts.values()]
    for path in files:
        assert any(path.read_text() in source for source in sources), f"{path.name} unused"
    for name in link.scripts:
        assert (LUA_DIR / f"{name}.lua").is_file()
    # The registered script is what runs: Redis holds it (by its SHA) once called.
    assert await presence.connect("alice") is True
    assert await redis.script_exists(link.scripts["presence_connect"].sha) == [True]
    assert await presence.online_users() == ["alice"]


async def test_registry_reports_a_dead_nodes_users_to_its_callback(
    redis: aioredis.Redis,
) -> None:
    """The registry publishes nothing itself: what a reaped node held goes to on_loss."""
    prefix = f"t{os.urandom(4).hex()}"
    losses: list[NodeLoss] = []

    async def on_loss(loss: NodeLoss) -> None:
        losses.append(loss)

    _, _, registry_a = cluster_parts(redis, prefix, "node-a", on_loss)
    _, presence_b, registry_b = cluster_parts(redis, prefix, "node-b", on_loss)
    await registry_a.tick()
    await registry_b.tick()  # node B's only heartbeat: it dies now
    alice = {"userId": "alice", "username": "alice", "displayName": "Alice"}
    await presence_b.connect("alice")
    await presence_b.joined(alice, "general")
    await presence_b.connect("bob")

    async def reaped() -> bool:
        await registry_a.tick()
        return list(registry_a.reaped) == ["node-b"]

    await eventually(reaped)
    [loss] = losses
    assert loss.node_id == "node-b" and sorted(loss.offline) == ["alice", "bob"]
    [left] = loss.left
    assert (dict(left.user), left.room_ids) == (alice, ("general",))


# -- admin ---------------------------------------------------------------------------


async def test_admin_lists_online_users_and_live_nodes_of_the_cluster(
    cluster: StartCluster,
) -> None:
    a, b = await cluster()
    await a.connect("alice")
    bob_token = b.token("bob", name="bobby", display_name="Bob Builder")
    await b.connect("bob", token=bob_token)
    await b.connect("bob", namespace="notifications", token=bob_token)
    root = await a.connect("root", namespace="admin", roles=("admin",))
    result = await root.emit("admin:online_users", {"limit": 10, "offset": 0})
    by_user = {u["userId"]: u for u in result["users"]}
    assert result["total"] == 3 and set(by_user) == {"alice", "bob", "root"}
    # Bob is only on node B: his names come from the shared database.
    assert (by_user["bob"]["username"], by_user["bob"]["displayName"]) == ("bobby", "Bob Builder")
    assert by_user["bob"]["connections"]["total"] == 2
    assert by_user["bob"]["connections"]["byNode"] == {"node-b": 2}
    assert by_user["alice"]["connections"]["byNode"] == {"node-a": 1}
    stats = await root.emit("admin:stats", {})
    nodes = {n["id"]: n for n in stats["nodes"]}
    assert set(nodes) == {"node-a", "node-b"}
    assert nodes["node-a"]["self"] and not nodes["node-b"]["self"]
    assert stats["users"]["online"] == 3


# -- dead nodes ----------------------------------------------------------------------


async def _spawn_node(
    node_id: str, database_url: str, redis_url: str, prefix: str
) -> tuple[asyncio.subprocess.Process, str]:
    """``python -m server serve`` on a free port; returns the process and its chat URL."""
    env = {
        **os.environ,
        "SWITCHBOARD_ENV": "test", "SWITCHBOARD_PORT": "0", "SWITCHBOARD_NODE_ID": node_id,
        "SWITCHBOARD_DATABASE_URL": database_url, "SWITCHBOARD_REDIS_URL": redis_url,
        "SWITCHBOARD_REDIS_PREFIX": prefix, "SWITCHBOARD_HEARTBEAT_INTERVAL": str(HEARTBEAT_SECS),
        "SWITCHBOARD_RATE_LIMITS": ROOMY_RATE_LIMITS, "SWITCHBOARD_LOG_LEVEL": "WARNING",
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError("node exited:\n" + "".join(seen))
            seen.append(line)
            if "listening  chat" in line:
                url = line.split()[-1]
                break

    async def drain() -> None:  # keep the pipe from filling up
        assert proc.stdout is not None
        while await proc.stdout.read(65536):
            pass

    asyncio.get_running_loop().create_task(drain())
    return proc, url


async def test_killed_node_users_go_offline_and_leave_rooms_within_two_intervals(
    cluster: StartCluster, redis_server: RedisServer
) -> None:
    (a,) = await cluster(1)
    config: Config = a.node.config
    proc, url = await _spawn_node("node-c", config.database_url, redis_server.url,
                                  config.redis_prefix)  # fmt: skip
    try:
        bob = await a.connect("bob")
        alice = Client(url, mint_token(config, "alice"))
        await alice.connect()
        await make_room(alice, "lobby")
        await bob.emit("room:join", {"roomId": "lobby"})
        assert await status_of(a, "alice") == "online"
        # Carol is on both nodes: losing node C leaves her online and in the room.
        carol_a = await a.connect("carol")
        await carol_a.emit("room:join", {"roomId": "lobby"})
        carol_c = Client(url, mint_token(config, "carol"))
        await carol_c.connect()
        await carol_c.emit("room:join", {"roomId": "lobby"})
        await bob.emit("system:ping")
        bob.drain_events()

        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        left = await bob.next_event("room:user_left", timeout=5)
        elapsed = time.monotonic() - killed_at
        assert left["data"]["roomId"] == "lobby"
        assert left["data"]["reason"] == "node_lost"
        assert left["data"]["user"]["userId"] == "alice"
        assert left["data"]["user"]["username"] == "alice"
        status = await bob.next_event("user:status_changed", timeout=1)
        assert status["data"] == {"userId": "alice", "status": "offline"}
        assert elapsed < 2 * HEARTBEAT_SECS, f"reaped after {elapsed:.2f}s"
        assert await status_of(a, "alice") == "offline"
        assert await status_of(a, "carol") == "online"
        assert await a.node.presence.online_users() == ["bob", "carol"]
        await assert_no_event(
            bob, "room:user_left", lambda f: f["data"]["user"]["userId"] == "carol"
        )
        assert a.node.node_registry is not None
        assert list(a.node.node_registry.reaped) == ["node-c"]
        nodes = await a.node.presence.nodes()
        assert [n["id"] for n in nodes] == ["node-a"]
        for client in (alice, carol_c):
            client.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_killed_node_connection_slots_are_freed(
    cluster: StartCluster, redis_server: RedisServer
) -> None:
    (a,) = await cluster(1, max_connections_per_user=1)
    config: Config = a.node.config
    proc, url = await _spawn_node("node-c", config.database_url, redis_server.url,
                                  config.redis_prefix)  # fmt: skip
    try:
        alice = Client(url, mint_token(config, "alice"))
        await alice.connect()
        with pytest.raises(ClientError) as info:
            await a.connect("alice")
        assert info.value.close_code == 4429
        proc.send_signal(signal.SIGKILL)
        await eventually(lambda: _is(status_of(a, "alice"), "offline"))
        await a.connect("alice")
        alice.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# -- Redis outage --------------------------------------------------------------------


async def test_redis_outage_falls_back_to_local_state_and_heals(
    cluster: StartCluster, redis_server: RedisServer
) -> None:
    with RedisServer() as private:
        a, b = await cluster(redis_url=private.url, max_connections_per_user=2)
        alice = await a.connect("alice")
        await make_room(alice, "lobby")
        private.kill()

        # Connecting, limits, presence and rate limits keep working on local figures.
        alice_2 = await a.connect("alice")
        with pytest.raises(ClientError) as info:
            await a.connect("alice")
        assert info.value.close_code == 4429
        bob = await a.connect("bob")
        await bob.emit("room:join", {"roomId": "lobby"})
        await bob.emit("message:send", {"roomId": "lobby", "content": "still here"})
        members = await bob.emit("room:members", {"roomId": "lobby"})
        assert {m["userId"]: m["status"] for m in members["members"]} == {
            "alice": "online", "bob": "online",
        }  # fmt: skip
        assert await a.node.presence.online_users() == ["alice", "bob"]
        await alice_2.aclose()
        await a.connect("carol")

        private.start()

        # Within a registry tick the node rewrites its share; B sees A's users again.
        async def b_sees_a() -> bool:
            return await b.node.presence.online_users() == ["alice", "bob", "carol"]

        await eventually(b_sees_a)
        assert await status_of(b, "bob") == "online"
        # Connection counts were rewritten too: alice has 1 of 2 slots in use.
        await b.connect("alice")
        with pytest.raises(ClientError):
            await b.connect("alice")
