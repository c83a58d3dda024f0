"""A real cluster: three gateway processes mirrored through one redis-server.

One cluster per module (tests/support/cluster.py: redis-server, PostgreSQL, nodes
``a``, ``b``, ``c`` as ``python -m server serve`` processes with a 0.5 s
heartbeat); each test uses its own users and rooms. The tests that kill a
node or Redis run last and put things back for whatever follows.

What is checked is what clients and operators see: frames on real WebSocket
connections, ``/metrics`` and ``/health/websocket`` of each node, Redis'
own ``PUBSUB NUMSUB`` and the rows in the shared PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from tornado.httpclient import AsyncHTTPClient

from switchboard_client import Client, ClientError
from tests.support.client_checks import assert_no_event, barrier, sentinel_message
from tests.support.cluster import (
    CLUSTER_MAX_CONNECTIONS_PER_USER,
    Clients,
    Cluster,
    lock_rows,
    waiting_for_locks,
)
from tests.support.services import require_binary
from tests.support.waiting import eventually

# Presence bound: a killed node's users are reaped within 2 heartbeat
# intervals; the margin covers the reaper's own period and a busy 2-core box.
REAP_MARGIN_SECS = 1.0
DELIVERY_TIMEOUT_SECS = 10.0
# After Redis comes back the mirror retries with backoff capped at 5 s (+ jitter).
REDIS_RECOVERY_TIMEOUT_SECS = 20.0
# How long a test holds Redis' write commands (PUBLISH among them).
REDIS_PAUSE_MS = 2500

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_binary("redis-server", "redis-server is not installed")
    require_binary("initdb", "PostgreSQL (initdb/pg_ctl) is not installed")
    with Cluster(("a", "b", "c")) as running:
        yield running


@pytest_asyncio.fixture
async def clients(cluster: Cluster) -> AsyncIterator[Clients]:
    # A test that killed a node or Redis and failed half-way must not take
    # the following tests down with it.
    cluster.ensure_running()
    opened = Clients(cluster)
    yield opened
    await opened.aclose()


def uid(prefix: str) -> str:
    """A user or room id no other test (or run) uses."""
    return f"{prefix}-{secrets.token_hex(4)}"


async def make_room(owner: Client, prefix: str = "room") -> str:
    room_id = uid(prefix)
    await owner.emit("room:create", {"roomId": room_id, "name": room_id, "type": "public"})
    return room_id


async def join(room_id: str, *members: Client) -> None:
    for member in members:
        await member.emit("room:join", {"roomId": room_id})


async def numsub(cluster: Cluster, channel: str) -> int:
    client = aioredis.from_url(cluster.redis.url)
    try:
        reply = await client.pubsub_numsub(channel)
    finally:
        await client.aclose()
    return int(reply[0][1])


async def room_subscribers(cluster: Cluster, room_id: str) -> int:
    return await numsub(cluster, cluster.redis_key("room", room_id))


def seqs_of(frames: list[dict[str, Any]]) -> list[int]:
    return [f["data"]["message"]["seq"] for f in frames]


async def collect_messages(
    client: Client, room_id: str, count: int, timeout: float = DELIVERY_TIMEOUT_SECS
) -> list[int]:
    """The seqs of the next ``count`` ``message:new`` frames of ``room_id``."""
    got = []
    deadline = time.monotonic() + timeout
    for _ in range(count):
        frame = await client.next_event(
            "message:new",
            timeout=max(0.05, deadline - time.monotonic()),
            predicate=lambda f: f["data"]["message"]["roomId"] == room_id,
        )
        got.append(frame["data"]["message"]["seq"])
    return got


async def history_seqs(client: Client, room_id: str) -> list[int]:
    """Every seq in the room's history, paging with ``beforeSeq`` (ascending)."""
    seqs: list[int] = []
    before: int | None = None
    while True:
        request: dict[str, Any] = {"roomId": room_id, "limit": 100}
        if before is not None:
            request["beforeSeq"] = before
        page = await client.emit("room:get_messages", request)
        batch = [m["seq"] for m in page["messages"]]
        seqs.extend(batch)
        if not page["hasMore"] or not batch:
            return sorted(seqs)
        before = min(batch)


def node_ids(stats: dict[str, Any]) -> set[str]:
    return {n["id"] if isinstance(n, dict) else str(n) for n in stats.get("nodes", [])}


# ---------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_message_sent_on_a_reaches_members_on_b_and_c_exactly_once(
    cluster: Cluster, clients: Clients
) -> None:
    alice_id = uid("alice")
    alice = await clients.connect("a", alice_id)
    alice_elsewhere = await clients.connect("c", alice_id)
    bob = await clients.connect("b", uid("bob"))
    dora = await clients.connect("b", uid("dora"))
    carol = await clients.connect("c", uid("carol"))
    room = await make_room(alice)
    await join(room, alice, alice_elsewhere, bob, dora, carol)
    # Subscriptions are made asynchronously; this test is about delivery, not
    # that race (test_message_right_after_a_remote_join is).
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 3), timeout=5,
        what="three nodes subscribed to the room",
    )  # fmt: skip
    for client in (alice, alice_elsewhere, bob, dora, carol):
        client.drain_events()

    count = 20
    acked = [
        (await alice.emit("message:send", {"roomId": room, "content": f"m{i}"}))["message"]["seq"]
        for i in range(count)
    ]
    assert acked == list(range(1, count + 1))
    for member in (bob, dora, carol, alice_elsewhere):
        assert await collect_messages(member, room, count) == acked, member.url
    # Exactly once: nothing more arrives, on any node; the sender gets acks only.
    await sentinel_message(alice, room, bob, dora, carol, alice_elsewhere)
    for member in (bob, dora, carol, alice_elsewhere):
        await assert_no_event(member, "message:new", ping=False)
    await assert_no_event(alice, "message:new")


async def _equals(value: Any, expected: Any) -> bool:
    return bool((await value) == expected)


@pytest.mark.asyncio
async def test_message_right_after_a_remote_join_is_delivered(
    cluster: Cluster, clients: Clients
) -> None:
    """A member whose join was acked gets the next message, even from another node."""
    sender = await clients.connect("a", uid("sender"))
    member = await clients.connect("b", uid("member"))
    for attempt in range(5):
        room = await make_room(sender, f"race{attempt}")
        await join(room, sender)
        await member.emit("room:join", {"roomId": room})
        sent = await sender.emit("message:send", {"roomId": room, "content": "right away"})
        got = await collect_messages(member, room, 1, timeout=5)
        assert got == [sent["message"]["seq"]]


@pytest.mark.asyncio
async def test_node_without_members_of_a_room_gets_none_of_its_traffic(
    cluster: Cluster, clients: Clients
) -> None:
    u1 = await clients.connect("a", uid("u1"))
    u2 = await clients.connect("b", uid("u2"))
    room = await make_room(u1)
    await join(room, u1, u2)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 2), timeout=5,
        what="nodes a and b subscribed to the room",
    )  # fmt: skip
    received_c = await cluster.metric("c", "switchboard_redis_received_total")
    received_b = await cluster.metric("b", "switchboard_redis_received_total")
    published_a = await cluster.metric("a", "switchboard_redis_published_total")

    count = 30
    for i in range(count):
        await u1.emit("message:send", {"roomId": room, "content": f"m{i}"})
    assert len(await collect_messages(u2, room, count)) == count
    assert await room_subscribers(cluster, room) == 2  # a and b; c never subscribed

    delta_c = await cluster.metric("c", "switchboard_redis_received_total") - received_c
    delta_b = await cluster.metric("b", "switchboard_redis_received_total") - received_b
    delta_a = await cluster.metric("a", "switchboard_redis_published_total") - published_a
    assert delta_b >= count, f"b received {delta_b} from Redis for {count} messages"
    assert delta_a >= count, f"a published {delta_a} for {count} messages"
    # Node c's Redis traffic does not grow with this room's (it may hear its
    # own liveness pings, a handful over the test, never one per message).
    assert delta_c < count / 3, f"node c received {delta_c} for {count} messages it has no use for"

    # Interest follows the audience: a member on c subscribes c, the last one
    # leaving unsubscribes it.
    u3 = await clients.connect("c", uid("u3"))
    await join(room, u3)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 3), timeout=5, what="c subscribed"
    )
    await u3.aclose()
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 2), timeout=5, what="c unsubscribed"
    )


# ---------------------------------------------------------------------------
# Cluster-wide limits and admin actions
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class MissedWhileAway:
    bob: Client
    carol_id: str
    room: str
    #: Carol's notifications connection (node c).
    inbox: Client
    #: The missed-messages notification she got.
    notice: dict[str, Any]


async def missed_while_away(cluster: Cluster, clients: Clients) -> MissedWhileAway:
    """Alice (node a), bob (b) and carol in one room; carol leaves chat on every node
    and, with only a notifications connection (c), misses alice's message."""
    alice = await clients.connect("a", uid("alice"))
    bob = await clients.connect("b", uid("bob"))
    carol_id = uid("carol")
    carol = await clients.connect("c", carol_id)
    room = await make_room(alice)
    await join(room, alice, bob, carol)
    carol.close()
    await carol.wait_closed()
    # Carol stays a member with no chat connection on any node.
    key = cluster.redis_key("conns", "user", "chat", carol_id)
    await eventually(lambda: _equals(redis_exists(cluster, key), False), timeout=5,
                     what="carol's chat connection released cluster-wide")  # fmt: skip
    inbox = await clients.connect("c", carol_id, "notifications")
    await alice.emit("message:send", {"roomId": room, "content": "while you were out"})
    frame = await inbox.next_event(
        "notification:created", timeout=DELIVERY_TIMEOUT_SECS,
        predicate=lambda f: f["data"]["notification"]["data"].get("roomId") == room,
    )  # fmt: skip
    return MissedWhileAway(bob, carol_id, room, inbox, frame["data"]["notification"])


@pytest.mark.asyncio
async def test_missed_message_notices_go_only_to_members_away_from_every_node(
    cluster: Cluster, clients: Clients
) -> None:
    """A member whose chat socket is on another node is not "away" (issue 3's notices)."""
    away = await missed_while_away(cluster, clients)
    bob, carol_id, room = away.bob, away.carol_id, away.room
    assert away.notice["data"]["count"] == 1
    await collect_messages(bob, room, 1)
    rows = await cluster.asql(
        "SELECT user_id FROM notification WHERE group_key = %s", f"missed:{room}"
    )
    assert rows == [(carol_id,)]  # not bob (online on node b), not alice (the sender)


@pytest.mark.asyncio
async def test_room_deleted_by_an_admin_is_gone_from_every_node(
    cluster: Cluster, clients: Clients
) -> None:
    """admin:delete_room on node a: a member on b is told and unsubscribed there,
    an away member's missed-messages notice goes (the one deletion path)."""
    away = await missed_while_away(cluster, clients)
    bob, room, inbox = away.bob, away.room, away.inbox
    await eventually(lambda: _equals(room_subscribers(cluster, room), 2), timeout=5,
                     what="nodes a and b subscribed to the room")  # fmt: skip

    admin = await clients.connect("a", uid("boss"), namespace="admin", roles=("admin",))
    assert await admin.emit("admin:delete_room", {"roomId": room}) == {"roomId": room, "members": 3}
    deleted = await bob.next_event("room:deleted", timeout=DELIVERY_TIMEOUT_SECS)
    assert deleted["data"]["roomId"] == room
    gone = await inbox.next_event("notification:deleted", timeout=DELIVERY_TIMEOUT_SECS)
    assert gone["data"] == {"notificationId": away.notice["id"]}
    # Node b let go of the room as node a did: nobody listens to its channel.
    await eventually(lambda: _equals(room_subscribers(cluster, room), 0), timeout=5,
                     what="every node unsubscribed from the deleted room")  # fmt: skip
    with pytest.raises(ClientError) as info:
        await bob.emit("typing:start", {"roomId": room})
    assert info.value.code == "NOT_IN_ROOM"
    rows = await cluster.asql(
        "SELECT user_id FROM notification WHERE group_key = %s", f"missed:{room}"
    )
    assert rows == []


@pytest.mark.asyncio
async def test_room_updated_on_a_reaches_members_on_every_node_once(
    cluster: Cluster, clients: Clients
) -> None:
    """room:update on node a: a member in the room on b and that member's socket
    on c that never joined the room hear it once each; a non-member does not."""
    alice_id, bob_id = uid("alice"), uid("bob")
    alice = await clients.connect("a", alice_id)
    bob = await clients.connect("b", bob_id)
    bob_elsewhere = await clients.connect("c", bob_id)
    carol = await clients.connect("c", uid("carol"))
    room = await make_room(alice)
    await join(room, alice, bob)
    await eventually(lambda: _equals(room_subscribers(cluster, room), 2), timeout=5,
                     what="nodes a and b subscribed to the room")  # fmt: skip
    ack = await alice.emit("room:update", {"roomId": room, "topic": "Shipping", "type": "private"})
    expected = {"roomId": room, "room": ack["room"], "changes": ["topic", "type"],
                "by": alice_id}  # fmt: skip
    for member in (alice, bob, bob_elsewhere):
        got = await member.next_event("room:updated", timeout=DELIVERY_TIMEOUT_SECS)
        assert got["data"] == expected, member.url
    # Node a publishes the update and then the sentinel on one Redis connection,
    # so a second room:updated would be buffered before the sentinel arrives.
    await sentinel_message(alice, room, bob)
    await assert_no_event(bob, "room:updated", ping=False)
    # bob_elsewhere never joined the room (room:updated reached it as bob's user
    # event) and carol is no member: neither hears the room's sentinel.
    for client in (bob_elsewhere, carol):
        await assert_no_event(client, "room:updated")
    rows = await cluster.asql("SELECT topic, type FROM room WHERE id = %s", room)
    assert rows == [("Shipping", "private")]


async def redis_exists(cluster: Cluster, key: str) -> bool:
    client = aioredis.from_url(cluster.redis.url)
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_connection_limit_per_user_counts_every_node(
    cluster: Cluster, clients: Clients
) -> None:
    user = uid("many")
    limit = CLUSTER_MAX_CONNECTIONS_PER_USER
    held = [await clients.connect(node, user) for node in ("a", "b", "c")[:limit]]
    assert len(held) == limit
    for node in ("a", "b", "c"):
        with pytest.raises(ClientError) as info:
            await clients.connect(node, user)
        assert info.value.code == "TOO_MANY_CONNECTIONS", node
        assert info.value.close_code == 4429
    # A slot freed on b can be taken on c.
    await held[1].aclose()

    async def connect_on_c() -> Client | None:
        try:
            return await clients.connect("c", user)
        except ClientError as exc:
            assert exc.code == "TOO_MANY_CONNECTIONS"
            return None

    await eventually(connect_on_c, timeout=5, what="the slot freed on b usable on c")


@pytest.mark.asyncio
async def test_rate_limit_is_shared_by_the_users_connections_on_all_nodes(
    cluster: Cluster, clients: Clients
) -> None:
    limit = cluster.config.rate_limit("typing").count  # 10/1m (tests/support/cluster.py)
    user = uid("typist")
    on_a = await clients.connect("a", user)
    on_b = await clients.connect("b", user)
    room = await make_room(on_a)
    await join(room, on_a, on_b)
    on_a_share = limit // 2 + 1
    for _ in range(on_a_share):
        await on_a.emit("typing:start", {"roomId": room})
    for _ in range(limit - on_a_share):
        await on_b.emit("typing:start", {"roomId": room})
    # b alone has seen fewer than ``limit`` events; the bucket is the cluster's.
    for client in (on_b, on_a):
        with pytest.raises(ClientError) as info:
            await client.emit("typing:start", {"roomId": room})
        assert info.value.code == "RATE_LIMITED"
        assert info.value.details["retryAfter"] > 0
        assert info.value.details["limit"] == limit


@pytest.mark.asyncio
async def test_ban_on_node_a_closes_the_users_connection_on_node_b(
    cluster: Cluster, clients: Clients
) -> None:
    troll = uid("troll")
    victim_b = await clients.connect("b", troll)
    victim_c = await clients.connect("c", troll, namespace="notifications")
    admin = await clients.connect("a", uid("boss"), namespace="admin", roles=("admin",))
    ack = await admin.emit("admin:ban", {"userId": troll, "reason": "spam"})
    assert ack["connectionsClosed"] == 2  # one on node B, one on node C; none on A
    for victim in (victim_b, victim_c):
        error = await victim.next_event("system:error", timeout=5)
        assert error["data"]["code"] == "BANNED"
        code, _ = await victim.wait_closed(timeout=5)
        assert code == 4403, victim.url
    with pytest.raises(ClientError) as info:
        await clients.connect("c", troll)
    assert info.value.code == "BANNED"


@pytest.mark.asyncio
async def test_kick_broadcast_and_typing_reach_every_node(
    cluster: Cluster, clients: Clients
) -> None:
    admin = await clients.connect("a", uid("boss"), namespace="admin", roles=("admin",))
    listeners = [await clients.connect(node, uid(f"l{node}")) for node in ("a", "b", "c")]
    # No wait for the nodes' subscriptions: a welcome comes once its node hears
    # the connection's namespace channel.
    sent = await admin.emit("admin:broadcast", {"message": "maintenance at noon"})
    for listener in listeners:
        frame = await listener.next_event("admin:broadcast", timeout=5)
        assert frame["data"]["message"] == "maintenance at noon"
        assert frame["data"]["sentAt"] == sent["sentAt"]
    # Once each: a second broadcast from the same node is the sentinel.
    await admin.emit("admin:broadcast", {"message": "sentinel"})
    for listener in listeners:
        await listener.next_event(
            "admin:broadcast", timeout=5, predicate=lambda f: f["data"]["message"] == "sentinel"
        )
        await assert_no_event(listener, "admin:broadcast", ping=False)

    typist_id = uid("typist")
    typist = await clients.connect("b", typist_id)
    room = await make_room(listeners[0])
    await join(room, listeners[0], typist)
    await typist.emit("typing:start", {"roomId": room})
    typing = await listeners[0].next_event("user:typing", timeout=5)
    assert (typing["data"]["roomId"], typing["data"]["userId"]) == (room, typist_id)

    victim = listeners[2]
    assert victim.welcome is not None
    await admin.emit("admin:kick", {"userId": victim.welcome["userId"], "reason": "cool off"})
    kicked = await victim.next_event("system:kicked", timeout=5)
    assert kicked["data"]["reason"] == "cool off"
    code, _ = await victim.wait_closed(timeout=5)
    assert code == 4403


async def publish(cluster: Cluster, node: str, target: dict[str, Any], event: str) -> int:
    """``POST /api/v1/publish`` on ``node`` as a service; its local ``delivered`` count."""
    response = await AsyncHTTPClient().fetch(
        cluster.node(node).http + "/api/v1/publish", method="POST",
        headers={"Authorization": f"Bearer {cluster.token(uid('svc'), ('service',))}"},
        body=orjson.dumps({"target": target, "event": event, "data": {}}),
    )  # fmt: skip
    delivered: int = orjson.loads(response.body)["delivered"]
    return delivered


@pytest.mark.asyncio
async def test_publish_and_broadcast_to_a_role_reach_its_connections_on_every_node_once(
    cluster: Cluster, clients: Clients
) -> None:
    mod_b = await clients.connect("b", uid("mod"), roles=("user", "moderator"))
    mod_c = await clients.connect("c", uid("mod"), namespace="admin", roles=("moderator",))
    plain = {node: await clients.connect(node, uid("plain")) for node in ("b", "c")}
    # Node a has no moderator: it is the publisher and hears nothing of the role.
    assert await publish(cluster, "a", {"role": "moderator"}, "ops:mods") == 0
    for mod in (mod_b, mod_c):
        await mod.next_event("ops:mods", timeout=DELIVERY_TIMEOUT_SECS)
    assert await publish(cluster, "a", {"role": "moderator", "namespace": "admin"}, "ops:x") == 0
    await mod_c.next_event("ops:x", timeout=DELIVERY_TIMEOUT_SECS)
    # Once each: a later publish on the same channel from the same node is the sentinel.
    assert await publish(cluster, "a", {"role": "moderator"}, "ops:sentinel") == 0
    for mod in (mod_b, mod_c):
        await mod.next_event("ops:sentinel", timeout=DELIVERY_TIMEOUT_SECS)
        await assert_no_event(mod, "ops:mods", ping=False)
    await assert_no_event(mod_b, "ops:x", ping=False)

    async def nothing_for_plain(*events: str) -> None:
        # Their nodes heard the role channel (their moderators) and kept it from
        # them: a later publish from a to each is the barrier (node a publishes
        # in order on one Redis connection, each node reads one).
        for client in plain.values():
            assert client.welcome is not None
            await publish(cluster, "a", {"userId": client.welcome["userId"]}, "ops:sentinel")
            await client.next_event("ops:sentinel", timeout=DELIVERY_TIMEOUT_SECS)
            for event in events:
                await assert_no_event(client, event, ping=False)

    await nothing_for_plain("ops:mods", "ops:x")

    admin = await clients.connect("a", uid("boss"), namespace="admin", roles=("admin",))
    ack = await admin.emit("admin:broadcast", {"message": "mods only", "role": "moderator"})
    assert (ack["delivered"], ack["role"]) == (0, "moderator")
    for mod in (mod_b, mod_c):
        frame = await mod.next_event("admin:broadcast", timeout=DELIVERY_TIMEOUT_SECS)
        assert frame["data"]["message"] == "mods only"
    await nothing_for_plain("admin:broadcast")


# ---------------------------------------------------------------------------
# Ordering and recovery across nodes
# ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_sends_from_two_nodes_get_gapless_unique_seqs(
    cluster: Cluster, clients: Clients
) -> None:
    s1 = await clients.connect("a", uid("s1"))
    s2 = await clients.connect("b", uid("s2"))
    watcher = await clients.connect("c", uid("watcher"))
    room = await make_room(s1)
    await join(room, s1, s2, watcher)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 3), timeout=5, what="subscribed"
    )
    per_sender = 100

    async def burst(client: Client, tag: str) -> list[int]:
        acks = await asyncio.gather(*(
            client.emit("message:send", {"roomId": room, "content": f"{tag}{i}"}, timeout=60)
            for i in range(per_sender)
        ))  # fmt: skip
        return [ack["message"]["seq"] for ack in acks]

    seq1, seq2 = await asyncio.gather(burst(s1, "a"), burst(s2, "b"))
    total = 2 * per_sender
    assert sorted(seq1 + seq2) == list(range(1, total + 1))
    assert await history_seqs(watcher, room) == list(range(1, total + 1))
    rows = await cluster.asql(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM message WHERE room_id = %s",
        room,
    )
    assert rows == [(total, total, 1, total)]
    # The watcher on the third node got each of them once.
    assert sorted(await collect_messages(watcher, room, total)) == list(range(1, total + 1))
    await sentinel_message(s1, room, watcher)
    await sentinel_message(s2, room, watcher)
    await assert_no_event(watcher, "message:new", ping=False)


async def messages_until_markers(
    client: Client, room_id: str, markers: set[str]
) -> list[dict[str, Any]]:
    """The room's ``message:new`` frames before the ``markers`` (by content), then nothing.

    A barrier across nodes: each marker was sent after every ack the test
    waited for, and a node publishes in order (one Redis connection, one
    local fan-out), so once a client has a node's marker it has everything
    that node broadcast before; whatever else is buffered is extra.
    """
    got: list[dict[str, Any]] = []
    missing = set(markers)
    while missing:
        frame = await client.next_event(
            "message:new", timeout=DELIVERY_TIMEOUT_SECS,
            predicate=lambda f: f["data"]["message"]["roomId"] == room_id,
        )  # fmt: skip
        message = frame["data"]["message"]
        if message["content"] in missing:
            missing.discard(message["content"])
        else:
            got.append(message)
    await assert_no_event(
        client, "message:new", lambda f: f["data"]["message"]["roomId"] == room_id, ping=False
    )
    return got


async def batch_sizes(cluster: Cluster, node: str) -> tuple[float, float]:
    """(group-commit batches, sends they carried) on ``node`` so far."""
    metrics = await cluster.metrics(node)
    return (
        metrics.get("switchboard_write_batch_size_count", 0.0),
        metrics.get("switchboard_write_batch_size_sum", 0.0),
    )


@pytest.mark.asyncio
async def test_group_commit_on_two_nodes_stores_and_delivers_each_acked_message_once(
    cluster: Cluster, clients: Clients
) -> None:
    """Several senders per node, many in flight each: batches form on both nodes."""
    senders = {
        node: [await clients.connect(node, uid(f"s{node}{n}")) for n in range(3)]
        for node in ("a", "b")
    }
    watchers = [await clients.connect(node, uid(f"w{node}")) for node in ("a", "b")]
    everyone = [*senders["a"], *senders["b"], *watchers]
    room = await make_room(senders["a"][0])
    await join(room, *everyone)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 2), timeout=5, what="subscribed"
    )
    for client in everyone:
        client.drain_events()
    before = {node: await batch_sizes(cluster, node) for node in ("a", "b")}
    per_sender = 30

    async def burst(client: Client, tag: str) -> list[dict[str, Any]]:
        acks = await asyncio.gather(*(
            client.emit("message:send", {
                "roomId": room, "content": f"{tag}-{i}", "clientMsgId": f"{tag}-{i}",
            }, timeout=60)
            for i in range(per_sender)
        ))  # fmt: skip
        assert not any(ack["duplicate"] for ack in acks)
        return [ack["message"] for ack in acks]

    tagged = [(client, f"{node}{n}") for node in ("a", "b")
              for n, client in enumerate(senders[node])]  # fmt: skip
    results = await asyncio.gather(*(burst(client, tag) for client, tag in tagged))
    acked = [m for messages in results for m in messages]
    total = len(acked)
    assert sorted(m["seq"] for m in acked) == list(range(1, total + 1))

    # Stored exactly once each: the rows are the acked messages, no more.
    rows = await cluster.asql(
        "SELECT id, seq, sender_id, content, client_msg_id FROM message WHERE room_id = %s",
        room,
    )
    assert sorted(rows) == sorted(
        (int(m["id"]), m["seq"], m["senderId"], m["content"], m["content"]) for m in acked
    )
    assert await cluster.asql("SELECT last_seq FROM room WHERE id = %s", room) == [(total,)]
    # Sends shared transactions on both nodes.
    for node in ("a", "b"):
        count, carried = await batch_sizes(cluster, node)
        batches, sends = count - before[node][0], carried - before[node][1]
        assert sends == 3 * per_sender and batches < sends, (node, batches, sends)

    # Every member on both nodes gets each message once (its own sends excepted).
    markers = {"a": "marker-a", "b": "marker-b"}
    for node, content in markers.items():
        await senders[node][0].emit("message:send", {"roomId": room, "content": content})
    sent_by = {id(client): {m["id"] for m in messages}
               for (client, _), messages in zip(tagged, results, strict=True)}  # fmt: skip
    for client in everyone:
        own_marker = {markers[n] for n in markers if client is senders[n][0]}
        got = await messages_until_markers(client, room, set(markers.values()) - own_marker)
        expected = {m["id"] for m in acked} - sent_by.get(id(client), set())
        assert sorted(m["id"] for m in got) == sorted(expected), client.url


@pytest.mark.asyncio
async def test_retry_on_another_node_while_the_original_is_in_flight_stores_one_message(
    cluster: Cluster, clients: Clients
) -> None:
    """The retry's batch meets the original on the unique index; the rest of it stands.

    Node a's batch (the original) and node b's (the retry plus two other
    sends) both pass their checks, then wait in PostgreSQL on the room's row,
    which the test holds; released, a commits first and b's insert meets the
    (sender, clientMsgId) index: b's batch is undone and each of its sends
    stored on its own.
    """
    alice_id = uid("alice")
    alice_a = await clients.connect("a", alice_id)
    alice_b = await clients.connect("b", alice_id)
    bob_b = await clients.connect("b", uid("bob"))
    carol_b = await clients.connect("b", uid("carol"))
    pete_b = await clients.connect("b", uid("pete"))
    watch_a = await clients.connect("a", uid("wa"))
    watch_c = await clients.connect("c", uid("wc"))
    members = [alice_a, alice_b, bob_b, carol_b, watch_a, watch_c]
    room = await make_room(alice_a)
    side = await make_room(pete_b, "side")
    await join(room, *members)
    await join(side, pete_b)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 3), timeout=5, what="subscribed"
    )
    for client in members:
        client.drain_events()
    url = cluster.database_url
    duplicate_key = "duplicate key value violates unique constraint"
    rejected_before = cluster.pg.log_path.read_text(errors="replace").count(duplicate_key)
    side_lock = await asyncio.to_thread(lock_rows, url, "room", [side])
    room_lock = await asyncio.to_thread(lock_rows, url, "room", [room])
    before = await batch_sizes(cluster, "b")
    try:
        # b's batcher busy with a primer waiting on the side room's row...
        primer = asyncio.ensure_future(pete_b.emit(
            "message:send", {"roomId": side, "content": "primer"}, timeout=30))  # fmt: skip
        await eventually(lambda: waiting_for_locks(url, 1), timeout=10,
                         what="b's primer waiting for its room")  # fmt: skip
        # ...the original on a waiting on the room's row...
        send = {"roomId": room, "content": "once", "clientMsgId": "c-1"}
        original = asyncio.ensure_future(alice_a.emit("message:send", send, timeout=30))
        await eventually(lambda: waiting_for_locks(url, 2), timeout=10,
                         what="the original waiting for the room")  # fmt: skip
        # ...and on b the retry with two other sends, queued for b's next batch.
        others = [
            asyncio.ensure_future(c.emit("message:send", {"roomId": room, "content": text},
                                         timeout=30))
            for c, text in ((bob_b, "from bob"), (carol_b, "from carol"))
        ]  # fmt: skip
        retry = asyncio.ensure_future(alice_b.emit("message:send", send, timeout=30))
        await eventually(
            lambda: _metric_is(cluster, "b", "switchboard_write_batch_waiting", 3.0),
            timeout=10, what="three sends queued on b",
        )  # fmt: skip
        await asyncio.to_thread(side_lock.rollback)
        assert (await primer)["message"]["seq"] == 1
        # b's batch of three passed its checks (the original is not committed)
        # and waits for the room's row behind the original.
        await eventually(lambda: _equals(batch_sizes(cluster, "b"), (before[0] + 2, before[1] + 4)),
                         timeout=10, what="b's batch of three started")  # fmt: skip
        await eventually(lambda: waiting_for_locks(url, 2), timeout=10,
                         what="both batches waiting for the room")  # fmt: skip
    finally:
        await asyncio.to_thread(side_lock.close)
        await asyncio.to_thread(room_lock.close)  # releases the room: a commits first
    first, again = await original, await retry
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert again["message"] == first["message"] and first["message"]["seq"] == 1
    stored = [(await f)["message"] for f in others]
    assert sorted(m["seq"] for m in stored) == [2, 3]  # no gap from the rejected duplicate
    assert cluster.pg.log_path.read_text(errors="replace").count(duplicate_key) == (
        rejected_before + 1
    )  # the retry's batch really met the index

    rows = await cluster.asql(
        "SELECT id, seq, content, client_msg_id FROM message WHERE room_id = %s ORDER BY seq",
        room,
    )
    in_order = [first["message"], *sorted(stored, key=lambda m: m["seq"])]
    assert rows == [(int(m["id"]), m["seq"], m["content"], "c-1" if m["seq"] == 1 else None)
                    for m in in_order]  # fmt: skip
    assert await cluster.asql("SELECT last_seq FROM room WHERE id = %s", room) == [(3,)]

    # One broadcast each, on every node: markers from a and b are the barrier.
    markers = {"marker-a": alice_a, "marker-b": bob_b}
    for content, client in markers.items():
        await client.emit("message:send", {"roomId": room, "content": content})
    ids = {"once": first["message"]["id"], **{m["content"]: m["id"] for m in stored}}
    own = {id(alice_a): "once", id(bob_b): "from bob", id(carol_b): "from carol"}
    for client in members:
        expected_markers = {c for c, sender in markers.items() if sender is not client}
        got = await messages_until_markers(client, room, expected_markers)
        expected = sorted(i for text, i in ids.items() if own.get(id(client)) != text)
        assert sorted(m["id"] for m in got) == expected, client.url


@pytest.mark.asyncio
async def test_retry_answered_duplicate_delivers_a_message_no_node_broadcast(
    cluster: Cluster, clients: Clients
) -> None:
    """A node stored a send and died before acking and broadcasting; the retry lands on b.

    The stored-but-never-broadcast row is written as the dead node left it
    (the room's seq bumped, the message in); the retry is answered
    ``duplicate`` and every other member, on every node, gets the message
    once. A second retry reaches nobody again: each node delivers a seq once.
    """
    alice_id = uid("alice")
    alice_b = await clients.connect("b", alice_id)
    bob_b = await clients.connect("b", uid("bob"))
    dave_a = await clients.connect("a", uid("dave"))
    watch_c = await clients.connect("c", uid("wc"))
    room = await make_room(alice_b)
    await join(room, alice_b, bob_b, dave_a, watch_c)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 3), timeout=5, what="subscribed"
    )
    # Stored as a node that died right after its commit left it: (id, seq).
    (stored,) = await cluster.asql(
        "WITH bumped AS (UPDATE room SET last_seq = last_seq + 1 WHERE id = %s RETURNING last_seq)"
        " INSERT INTO message (room_id, seq, sender_id, sender_name, content, type,"
        " attachments, metadata, client_msg_id, created_at)"
        " SELECT %s, last_seq, %s, %s, 'lost', 'text', '[]', '{}', 'lost-1',"
        " now() AT TIME ZONE 'utc' FROM bumped RETURNING id, seq",
        room, room, alice_id, alice_id,
    )  # fmt: skip
    send = {"roomId": room, "content": "lost", "clientMsgId": "lost-1"}
    first = await alice_b.emit("message:send", send)
    assert first["duplicate"] is True and first["message"]["seq"] == stored[1]
    for member in (bob_b, dave_a, watch_c):
        assert await collect_messages(member, room, 1) == [stored[1]]
    again = await alice_b.emit("message:send", send)
    assert again["duplicate"] is True
    await sentinel_message(bob_b, room, dave_a, watch_c)
    await sentinel_message(dave_a, room, bob_b, watch_c)
    for member in (bob_b, dave_a, watch_c):
        await assert_no_event(member, "message:new", ping=False)
    # The retrying connection has the message in its ack, not as an event.
    await barrier(alice_b)
    assert stored[1] not in seqs_of(alice_b.drain_events("message:new"))


@pytest.mark.asyncio
async def test_client_moving_to_another_node_recovers_without_gap_or_duplicate(
    cluster: Cluster, clients: Clients
) -> None:
    talker = await clients.connect("c", uid("talker"))
    mover_id = uid("mover")
    first = await clients.connect("a", mover_id)
    room = await make_room(talker)
    await join(room, talker, first)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 2), timeout=5, what="subscribed"
    )
    total = 150
    acked: list[int] = []

    async def talk() -> None:
        for i in range(total):
            ack = await talker.emit("message:send", {"roomId": room, "content": f"t{i}"})
            acked.append(ack["message"]["seq"])
            await asyncio.sleep(0.005)  # pacing: the talk spans the move, not one burst

    sending = asyncio.create_task(talk())
    try:
        seen_first = await collect_messages(first, room, 40)
        await first.aclose()
        away_from = len(acked)  # messages keep flowing while the client is away
        await eventually(lambda: len(acked) >= away_from + 5, timeout=5, what="sent while away")
        second = await clients.connect("b", mover_id)
        since = seen_first[-1]
        ack = await second.emit("room:join", {"roomId": room, "sinceSeq": since})
        assert ack["recovered"] is True
        missed = [m["seq"] for m in ack["missed"]]
        await sending
    finally:
        sending.cancel()
    assert acked == list(range(1, total + 1))
    live_expected = total - (missed[-1] if missed else since)
    live = await collect_messages(second, room, live_expected)
    await sentinel_message(talker, room, second)
    await assert_no_event(second, "message:new", ping=False)
    everything = seen_first + missed + live
    assert len(everything) == len(set(everything)), "a message arrived twice"
    assert sorted(everything) == list(range(1, total + 1)), "a message is missing"
    assert everything == sorted(everything)


@pytest.mark.asyncio
async def test_resume_on_b_of_rooms_talked_in_on_a_recovers_each_once_in_order(
    cluster: Cluster, clients: Clients
) -> None:
    """room:resume on another node: per room, what was missed in the ack, then the
    live stream from node a through Redis, without a gap or a duplicate."""
    talker = await clients.connect("a", uid("talker"))
    mover_id = uid("mover")
    first = await clients.connect("a", mover_id)
    rooms = [await make_room(talker) for _ in range(3)]
    entries = []
    for room in rooms:
        await join(room, talker)
        joined = await first.emit("room:join", {"roomId": room})
        entries.append({"roomId": room, "sinceSeq": 0, "epoch": joined["room"]["epoch"]})
    await first.aclose()
    per_room = 30

    async def talk(room: str) -> None:
        for i in range(per_room):
            await talker.emit("message:send", {"roomId": room, "content": f"t{i}"})
            await asyncio.sleep(0.005)  # pacing: the talk spans the resume

    sending = asyncio.gather(*(talk(room) for room in rooms))
    try:
        second = await clients.connect("b", mover_id)
        ack = await second.emit("room:resume", {"rooms": entries})
        await sending
    finally:
        sending.cancel()
    for room, answer in zip(rooms, ack["rooms"], strict=True):
        assert (answer["roomId"], answer["status"], answer["recovered"]) == (room, "resumed", True)
        missed = [m["seq"] for m in answer["missed"]]
        live = await collect_messages(second, room, per_room - len(missed))
        everything = missed + live
        assert everything == list(range(1, per_room + 1)), (room, missed, live)
    for room in rooms:
        await sentinel_message(talker, room, second)
    await assert_no_event(second, "message:new", ping=False)


# ---------------------------------------------------------------------------
# Failures: a node killed, Redis killed
# ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_killed_node_users_go_offline_and_leave_their_rooms_in_time(
    cluster: Cluster, clients: Clients
) -> None:
    watcher = await clients.connect("a", uid("watcher"))
    victim_id = uid("victim")
    limit = CLUSTER_MAX_CONNECTIONS_PER_USER
    victims = [await clients.connect("c", victim_id) for _ in range(limit)]
    room = await make_room(watcher)
    await join(room, watcher, victims[0])
    members = (await watcher.emit("room:members", {"roomId": room}))["members"]
    assert {m["userId"]: m["status"] for m in members}[victim_id] == "online"
    await victims[0].emit("typing:start", {"roomId": room})
    await watcher.next_event("user:typing", predicate=lambda f: f["data"]["userId"] == victim_id)
    watcher.drain_events()

    cluster.node("c").kill()
    killed_at = time.monotonic()
    bound = 2 * cluster.heartbeat_interval + REAP_MARGIN_SECS
    left = await watcher.next_event(
        "room:user_left", timeout=bound + 5,
        predicate=lambda f: f["data"]["user"]["userId"] == victim_id,
    )  # fmt: skip
    left_after = time.monotonic() - killed_at
    # The typing indicator of the dead node's typist is cleared, before the leave.
    typing_stops = watcher.drain_events("user:stopped_typing")
    assert [f["data"]["userId"] for f in typing_stops] == [victim_id]
    assert typing_stops[0]["data"]["roomId"] == room
    # One live node reaps (the others see it done): announced once, not once per node.
    # A real-clock wait: the other live node checks the registry on its heartbeat
    # timer, and nothing announces "checked and found it reaped".
    await asyncio.sleep(cluster.heartbeat_interval)
    await assert_no_event(
        watcher, "room:user_left", lambda f: f["data"]["user"]["userId"] == victim_id
    )
    offline = await watcher.next_event(
        "user:status_changed", timeout=bound + 5,
        predicate=lambda f: f["data"]["userId"] == victim_id,
    )  # fmt: skip
    offline_after = time.monotonic() - killed_at
    assert left["data"]["roomId"] == room
    assert left["data"].get("reason") == "node_lost"
    assert offline["data"]["status"] == "offline"
    assert left_after <= bound, f"room:user_left {left_after:.2f}s after kill -9 (bound {bound}s)"
    assert offline_after <= bound, f"offline {offline_after:.2f}s after kill -9 (bound {bound}s)"
    members = (await watcher.emit("room:members", {"roomId": room}))["members"]
    assert {m["userId"]: m["status"] for m in members}[victim_id] == "offline"
    # The dead node's connection slots are released: the user gets the full quota back.
    for node in ("a", "b", "a")[:limit]:
        await clients.connect(node, victim_id)
    with pytest.raises(ClientError) as info:
        await clients.connect("b", victim_id)
    assert info.value.code == "TOO_MANY_CONNECTIONS"

    cluster.node("c").start()


@pytest.mark.asyncio
async def test_admins_list_connections_of_every_node_from_any_node(
    cluster: Cluster, clients: Clients
) -> None:
    x, y = uid("listed-x"), uid("listed-y")
    on_a = await clients.connect("a", x, headers={"User-Agent": "x-agent/1"})
    on_b = await clients.connect("b", y, "notifications", headers={"User-Agent": "y-agent/2"})
    admins = {n: await clients.connect(n, uid("ops"), "admin", ("admin",)) for n in ("a", "b")}
    expected = {
        x: (on_a.welcome["connectionId"], "a", "chat", "x-agent/1"),
        y: (on_b.welcome["connectionId"], "b", "notifications", "y-agent/2"),
    }

    async def listed(admin: Client) -> dict[str, dict[str, Any]]:
        result = await admin.emit("admin:online_users", {"limit": 500})
        assert result["missingNodes"] == []
        found = {}
        for user in result["users"]:
            if user["userId"] in expected:
                (conn,) = user["connections"]["list"]
                found[user["userId"]] = conn
        return found

    for node, admin in admins.items():
        found = await listed(admin)
        assert {
            u: (c["connectionId"], c["node"], c["namespace"], c["userAgent"])
            for u, c in found.items()
        } == expected, node
        assert found[x]["ip"] == found[y]["ip"] == "127.0.0.1"

    # The counters are live on the other node too.
    before = (await listed(admins["b"]))[x]
    await on_a.emit("system:ping", {})
    after = (await listed(admins["b"]))[x]
    assert after["framesIn"] == before["framesIn"] + 1
    assert after["framesOut"] > before["framesOut"]

    # /websocket/stats on c (where neither is connected) pages the whole cluster.
    token = cluster.token(uid("root"), ("admin",))
    items: list[dict[str, Any]] = []
    query = "?limit=3"
    while True:
        resp = await AsyncHTTPClient().fetch(
            cluster.node("c").http + "/websocket/stats" + query,
            headers={"Authorization": f"Bearer {token}"}, request_timeout=10,
        )  # fmt: skip
        page = orjson.loads(resp.body)["connections"]["list"]
        assert page["missingNodes"] == [] and len(page["items"]) <= 3
        items += page["items"]
        if page["next"] is None:
            break
        query = f"?limit=3&after={page['next']}"
    # Each once, in connection id order (a connection of an earlier test may close meanwhile).
    ids = [c["connectionId"] for c in items]
    assert ids == sorted(set(ids))
    seen = {c["connectionId"]: c for c in items}
    for conn_id, node, namespace, _ in expected.values():
        assert (seen[conn_id]["node"], seen[conn_id]["namespace"]) == (node, namespace)
    assert {admin.welcome["connectionId"] for admin in admins.values()} <= seen.keys()


@pytest.mark.asyncio
async def test_kill_9_right_after_an_ack_loses_no_broadcast_to_the_other_nodes(
    cluster: Cluster, clients: Clients
) -> None:
    """The ack left, the publish had not reached Redis, the node died: b and c still get it.

    Redis holds node a's PUBLISH (``CLIENT PAUSE ... WRITE``: the command
    waits in Redis, as a publish waits in a's queue when a is busy), the
    ack reaches the sender, a is killed -9 and the held PUBLISH dies with
    its connection. The other nodes deliver the message from the database
    once a is reaped (or their own links come back), once each.
    """
    sender = await clients.connect("a", uid("sender"))
    watch_b = await clients.connect("b", uid("wb"))
    watch_c = await clients.connect("c", uid("wc"))
    room = await make_room(sender)
    await join(room, sender, watch_b, watch_c)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 3), timeout=5, what="subscribed"
    )
    await sender.emit("message:send", {"roomId": room, "content": "before"})
    for watcher in (watch_b, watch_c):
        await collect_messages(watcher, room, 1)
    redis = aioredis.from_url(cluster.redis.url)
    try:
        await redis.execute_command("CLIENT", "PAUSE", REDIS_PAUSE_MS, "WRITE")  # type: ignore[no-untyped-call]
    finally:
        await redis.aclose()
    ack = await sender.emit("message:send", {"roomId": room, "content": "acked"}, timeout=10)
    cluster.node("a").kill()
    bound = REDIS_PAUSE_MS / 1000 + 2 * cluster.heartbeat_interval + REAP_MARGIN_SECS + 5
    for watcher in (watch_b, watch_c):
        got = await collect_messages(watcher, room, 1, timeout=bound)
        assert got == [ack["message"]["seq"]]
    # Once: the sentinels from b and c come after anything else either would deliver.
    await sentinel_message(watch_b, room, watch_c)
    await sentinel_message(watch_c, room, watch_b)
    for watcher in (watch_b, watch_c):
        await assert_no_event(watcher, "message:new", ping=False)
    assert watch_b.reconnects == 0 and watch_c.reconnects == 0
    cluster.node("a").start()


@pytest.mark.asyncio
async def test_admin_stats_lists_the_live_nodes(cluster: Cluster, clients: Clients) -> None:
    admin = await clients.connect("a", uid("ops"), namespace="admin", roles=("admin",))
    await eventually(
        lambda: _node_set_is(admin, {"a", "b", "c"}), timeout=5, what="a, b and c listed"
    )
    cluster.node("b").kill()
    bound = 2 * cluster.heartbeat_interval + REAP_MARGIN_SECS
    await eventually(lambda: _node_set_is(admin, {"a", "c"}), timeout=bound, what="b unlisted")
    cluster.node("b").start()
    await eventually(lambda: _node_set_is(admin, {"a", "b", "c"}), timeout=5, what="b back")


async def _node_set_is(admin: Client, expected: set[str]) -> bool:
    return node_ids(await admin.emit("admin:stats")) == expected


@pytest.mark.asyncio
async def test_redis_killed_mid_traffic_and_restarted(cluster: Cluster, clients: Clients) -> None:
    sender = await clients.connect("a", uid("sender"))
    local = await clients.connect("a", uid("local"))
    remote = await clients.connect("b", uid("remote"))
    # A member on b whose frames the test only reads at the end.
    watcher = await clients.connect("b", uid("watcher"))
    room = await make_room(sender)
    await join(room, sender, local, remote, watcher)
    await eventually(
        lambda: _equals(room_subscribers(cluster, room), 2), timeout=5, what="subscribed"
    )
    reconnects_before = await cluster.metric("a", "switchboard_redis_reconnects_total")
    acked: dict[int, int] = {}  # seq -> message id
    failures: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            try:
                ack = await sender.emit("message:send", {"roomId": room, "content": f"x{i}"})
                acked[ack["message"]["seq"]] = int(ack["message"]["id"])
            except ClientError as exc:
                failures.append(exc.code)
            i += 1
            await asyncio.sleep(0.02)  # pacing: steady traffic across the Redis outage

    sending = asyncio.create_task(traffic())
    try:
        await eventually(lambda: len(acked) >= 10, timeout=5, what="traffic flowing")
        # Cross-node delivery works before the outage.
        await collect_messages(remote, room, 5)

        cluster.redis.kill()
        seq_at_kill = max(acked)
        down = await eventually(
            lambda: _status(cluster, "a", "degraded"), timeout=10, what="a degraded"
        )
        assert any("redis" in reason.lower() for reason in down["reasons"]), down
        assert down["httpStatus"] == 200
        await eventually(lambda: _status(cluster, "b", "degraded"), timeout=10, what="b degraded")
        await eventually(
            lambda: _metric_is(cluster, "a", "switchboard_redis_up", 0.0), timeout=10,
            what="redis_up 0 on a",
        )  # fmt: skip
        # Local delivery goes on: the member on a gets messages sent after the kill.
        local.drain_events()
        fresh = await collect_messages(local, room, 10)
        assert min(fresh) > seq_at_kill

        cluster.redis.start()  # same port, empty
        seq_at_restart = max(acked)
        for name in ("a", "b", "c"):
            await eventually(
                functools.partial(_status, cluster, name, "healthy"),
                timeout=REDIS_RECOVERY_TIMEOUT_SECS, what=f"{name} healthy again",
            )  # fmt: skip
        # Cross-node delivery resumed, both ways.
        await eventually(
            lambda: _got_after(remote, room, seq_at_restart), timeout=REDIS_RECOVERY_TIMEOUT_SECS,
            what="a's messages reaching b again",
        )  # fmt: skip
        reply = await remote.emit("message:send", {"roomId": room, "content": "back"})
        back = await local.next_event(
            "message:new", timeout=5,
            predicate=lambda f: f["data"]["message"]["id"] == reply["message"]["id"],
        )  # fmt: skip
        assert back["data"]["message"]["content"] == "back"
        acked[reply["message"]["seq"]] = int(reply["message"]["id"])
    finally:
        stop.set()
        await sending
    assert failures == [], f"sends refused during the outage: {failures}"
    assert cluster.alive() == {"a": True, "b": True, "c": True}, cluster.logs()
    for name, node in cluster.nodes.items():
        assert "Traceback" not in node.log_text(), (
            f"node {name} logged a traceback:\n{node.log_tail()}"
        )
    assert await cluster.metric("a", "switchboard_redis_reconnects_total") > reconnects_before
    assert await cluster.metric("a", "switchboard_redis_up") == 1.0
    # Every acknowledged message is in the database, once.
    rows = await cluster.asql("SELECT seq, id FROM message WHERE room_id = %s ORDER BY seq", room)
    assert dict(rows) == acked
    assert sorted(acked) == list(range(1, len(acked) + 1))
    # And reached the member on b live: once, in order, on one connection,
    # the outage's share through node b's catch-up when its link came back.
    await sentinel_message(sender, room, watcher)
    await barrier(watcher)
    got = seqs_of(watcher.drain_events("message:new"))
    missed = sorted(set(acked) - set(got))
    assert not missed, f"{len(missed)} of {len(acked)} acked messages never reached b: {missed}"
    assert got == sorted(acked)
    assert watcher.reconnects == 0


@pytest.mark.asyncio
async def test_readiness_reports_degraded_with_the_reason_while_redis_is_down(
    cluster: Cluster, clients: Clients
) -> None:
    """A node without Redis still serves its own clients: degraded, not taken out of service."""
    assert (await cluster.health("a", "/health/ready"))["httpStatus"] == 200
    cluster.redis.kill()
    try:
        down = await eventually(
            lambda: _status(cluster, "a", "degraded"), timeout=10, what="a degraded"
        )
        ready = await cluster.health("a", "/health/ready")
        assert any("redis" in reason.lower() for reason in ready["reasons"]), ready
        assert ready["httpStatus"] == 200, ready
        assert ready["status"] == "degraded", ready
        assert down["services"]["redis"] == "down"
    finally:
        cluster.redis.start()
    await eventually(lambda: _status(cluster, "a", "healthy"), timeout=REDIS_RECOVERY_TIMEOUT_SECS,
                     what="a healthy again")  # fmt: skip
    ready = await cluster.health("a", "/health/ready")
    assert (ready["httpStatus"], ready["status"]) == (200, "ready"), ready


async def _status(cluster: Cluster, node: str, status: str) -> dict[str, Any] | None:
    doc = await cluster.health(node)
    return doc if doc.get("status") == status else None


async def _metric_is(cluster: Cluster, node: str, name: str, value: float) -> bool:
    return await cluster.metric(node, name) == value


def _got_after(client: Client, room: str, seq: int) -> bool:
    return any(
        f["event"] == "message:new"
        and f["data"]["message"]["roomId"] == room
        and f["data"]["message"]["seq"] > seq
        for f in client.events
    )
