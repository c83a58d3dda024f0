"""server/batch.py: group commit of message:send and of connection admission, through real clients.

To make a batch of a known shape, a test holds the node's database worker
with a job that waits on an event, queues the sends (or connections) it
wants batched (``node.sends.waiting`` / ``node.admissions.waiting`` say when
they are all in), then lets go: whatever waited goes to the database in one
transaction (the batch-size histograms count it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio
from tornado.httpclient import AsyncHTTPClient

from models import Room, utcnow
from server.client import Client, ClientError
from tests.cluster import eventually
from tests.test_chat import join, member, nothing_arrived, room, send, settle, went_offline
from tests.test_presence import statuses as statuses_of

pytestmark = pytest.mark.asyncio


@asynccontextmanager
async def held_database(gw: Any) -> AsyncIterator[None]:
    """The node's database worker is busy until the block ends."""
    release = threading.Event()
    holder = asyncio.ensure_future(gw.node.db.run_bare("test.hold", release.wait, 30.0))
    try:
        yield
    finally:
        release.set()
        await holder


async def queued(gw: Any, count: int) -> None:
    await eventually(lambda: gw.node.sends.waiting == count, timeout=10,
                     what=f"{count} sends waiting for the database")  # fmt: skip


def delete_room(room_id: str) -> int:
    return Room.update(deleted_at=utcnow()).where(Room.id == room_id).execute()


def batch_sizes(gw: Any) -> tuple[float, float]:
    """(batches committed, sends they carried) so far."""
    registry = gw.node.registry
    count = registry.get_sample_value("switchboard_write_batch_size_count") or 0.0
    total = registry.get_sample_value("switchboard_write_batch_size_sum") or 0.0
    return count, total


async def outcome(request: asyncio.Future[Any]) -> Any:
    """The ack's data, or the error code it failed with."""
    try:
        return await request
    except ClientError as exc:
        return exc.code


async def test_a_batch_fails_its_bad_sends_alone_and_commits_the_rest(gateway):
    gw = gateway
    owner = await gw.connect("owner")
    await room(owner, "general")
    await room(owner, "other")
    await room(owner, "doomed")
    senders = [await gw.connect(f"s{n}") for n in range(4)]
    alice1, alice2 = await gw.connect("alice"), await gw.connect("alice")
    muted, stray, doomed_member = [await gw.connect(n) for n in ("muted", "stray", "erin")]
    watcher = await gw.connect("watcher")
    for client in (*senders, alice1, alice2, muted, stray, watcher):
        await join(client, "general")
    await join(doomed_member, "doomed")
    elsewhere = await send(owner, "other", "a message of another room")
    admin = await gw.connect("mod", "admin", roles=("admin",))
    await admin.emit("admin:mute", {"userId": "muted", "roomId": "general",
                                    "durationSeconds": 600})  # fmt: skip
    await settle(watcher)
    before = batch_sizes(gw)

    async with held_database(gw):
        primer = asyncio.ensure_future(owner.emit(
            "message:send", {"roomId": "general", "content": "primer"}))  # fmt: skip
        await eventually(lambda: batch_sizes(gw)[0] == before[0] + 1, timeout=10,
                         what="the primer's batch waiting for the database")  # fmt: skip
        # As if another node deleted the room: after the primer's batch, before the
        # next one (one database worker: jobs run in the order they are submitted;
        # the task submits its job on its first step, which sleep(0) lets it take).
        deletion = asyncio.ensure_future(gw.node.db.run("test.delete", delete_room, "doomed"))
        await asyncio.sleep(0)
        retry = {"roomId": "general", "content": "twice", "clientMsgId": "c-1"}
        requests = {
            **{f"s{n}": c.emit("message:send", {"roomId": "general", "content": f"from s{n}"})
               for n, c in enumerate(senders)},
            "alice1": alice1.emit("message:send", retry),
            "alice2": alice2.emit("message:send", retry),
            "muted": muted.emit("message:send", {"roomId": "general", "content": "shh"}),
            "stray": stray.emit("message:send", {
                "roomId": "general", "content": "re", "parentMessageId": elsewhere["id"]}),
            "erin": doomed_member.emit("message:send", {"roomId": "doomed", "content": "x"}),
        }  # fmt: skip
        futures = {name: asyncio.ensure_future(r) for name, r in requests.items()}
        await queued(gw, len(futures))

    primed = (await primer)["message"]
    assert await deletion == 1
    got = {name: await outcome(f) for name, f in futures.items()}
    assert got["muted"] == "MUTED"
    assert got["stray"] == "MESSAGE_NOT_FOUND"
    assert got["erin"] == "ROOM_NOT_FOUND"
    pair = [got["alice1"], got["alice2"]]
    assert sorted(a["duplicate"] for a in pair) == [False, True]
    assert pair[0]["message"] == pair[1]["message"]
    stored = [got[f"s{n}"]["message"] for n in range(4)] + [pair[0]["message"]]
    assert all(not got[f"s{n}"]["duplicate"] for n in range(4))
    # Gapless after the primer, one seq per stored message.
    assert sorted(m["seq"] for m in stored) == list(range(primed["seq"] + 1, primed["seq"] + 6))
    # Two batches: the primer alone, then every send that waited, bad ones included.
    after = batch_sizes(gw)
    assert after[0] - before[0] == 2
    assert after[1] - before[1] == 1 + len(futures)

    # The watcher gets each stored message once, in seq order, and nothing else.
    arrived = [(await watcher.next_event("message:new"))["data"]["message"] for _ in range(6)]
    assert [m["seq"] for m in arrived] == list(range(primed["seq"], primed["seq"] + 6))
    await nothing_arrived([watcher], "message:new")
    page = await watcher.emit("room:get_messages", {"roomId": "general", "limit": 10})
    assert [m["seq"] for m in page["messages"]] == list(range(primed["seq"] + 5, 0, -1))
    assert [m["content"] for m in page["messages"]].count("twice") == 1


async def test_a_retry_in_another_room_is_a_conflict_not_a_duplicate(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "general")
    await room(alice, "random")
    data = {"roomId": "general", "content": "hello", "clientMsgId": "k-1"}
    first = await alice.emit("message:send", data)
    with pytest.raises(ClientError) as info:
        await alice.emit("message:send", {**data, "roomId": "random"})
    assert info.value.code == "CONFLICT" and info.value.details == {"clientMsgId": "k-1"}
    again = await alice.emit("message:send", data)
    assert again["duplicate"] is True and again["message"] == first["message"]


async def test_batches_keep_each_rooms_seqs_gapless_under_concurrent_senders(gateway):
    """Several rooms, several senders per room, many batches: no gap, no duplicate."""
    gw = gateway
    owner = await gw.connect("owner")
    rooms = ["r0", "r1", "r2"]
    for room_id in rooms:
        await room(owner, room_id)
    clients: list[tuple[Client, str]] = []
    for n in range(9):
        client = await gw.connect(f"u{n}")
        await join(client, rooms[n % 3])
        clients.append((client, rooms[n % 3]))

    async def burst(client: Client, room_id: str) -> list[int]:
        return [(await send(client, room_id, f"m{i}"))["seq"] for i in range(15)]

    results = await asyncio.gather(*(burst(c, r) for c, r in clients))
    for room_id in rooms:
        seqs = sorted(s for (_, r), got in zip(clients, results, strict=True) if r == room_id
                      for s in got)  # fmt: skip
        assert seqs == list(range(1, 46)), room_id
    count, total = batch_sizes(gw)
    assert total >= 135 and count < total  # some sends shared a transaction


async def test_one_transaction_per_message_when_group_commit_is_off(gateway_factory):
    gw = await gateway_factory(write_batch_max=1)
    alice, bob = await gw.connect("alice"), await gw.connect("bob")
    await room(alice, "general")
    await join(bob, "general")
    async with held_database(gw):
        futures = [asyncio.ensure_future(c.emit("message:send", {"roomId": "general",
                                                                  "content": "x"}))
                   for c in (alice, bob)]  # fmt: skip
        await eventually(lambda: gw.node.sends.waiting == 1, timeout=10, what="one waiting")
    acks = [await f for f in futures]
    assert sorted(a["message"]["seq"] for a in acks) == [1, 2]
    assert batch_sizes(gw) == (2.0, 2.0)


# -- connection admission (op user.connect) -----------------------------------------


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def any_db(request: pytest.FixtureRequest, gateway_factory: Any) -> Any:
    """A node on SQLite, then one on PostgreSQL: the upsert's SQL differs between them."""
    if request.param == "postgres":
        pg = request.getfixturevalue("postgres")
        return await gateway_factory(database_url=pg.create_database(f"t{os.urandom(6).hex()}"))
    return await gateway_factory()


@asynccontextmanager
async def held_admissions(gw: Any) -> AsyncIterator[None]:
    """No admission batch commits until the block ends.

    SQLite: the node's one database worker is busy. PostgreSQL has a pool of
    workers, so a transaction holds a lock on the user table that every
    upsert waits for (reads go on).
    """
    release = threading.Event()
    db = gw.node.db

    def hold() -> None:
        with db.db.atomic():
            if not db.is_sqlite:
                db.db.execute_sql('LOCK TABLE "user" IN EXCLUSIVE MODE')
            release.wait(30.0)

    holder = asyncio.ensure_future(db.run_bare("test.hold", hold))
    try:
        yield
    finally:
        release.set()
        await holder


def admission_batches(gw: Any) -> tuple[float, float]:
    """(admission batches committed, connections they carried) so far."""
    registry = gw.node.registry
    count = registry.get_sample_value("switchboard_admission_batch_size_count") or 0.0
    total = registry.get_sample_value("switchboard_admission_batch_size_sum") or 0.0
    return count, total


@asynccontextmanager
async def one_admission_batch(gw: Any, size: int) -> AsyncIterator[Client]:
    """The block's ``size`` connects are admitted in one transaction (asserted at the end).

    A primer connection goes first and alone (an idle batcher sends the first
    request at once); its batch is stuck behind the hold, so the connects the
    block starts wait and go together once it ends. Yields the primer.
    """
    before = admission_batches(gw)
    async with held_admissions(gw):
        primer = gw.client("primer")
        primed = asyncio.ensure_future(primer.connect())
        await eventually(lambda: admission_batches(gw)[0] == before[0] + 1, timeout=10,
                         what="the primer's admission batch in the database")  # fmt: skip
        yield primer
        await eventually(lambda: gw.node.admissions.waiting == size, timeout=10,
                         what=f"{size} connections waiting for admission")  # fmt: skip
    await primed
    assert admission_batches(gw) == (before[0] + 2, before[1] + 1 + size)


async def admitted(connect: asyncio.Future[Any]) -> Any:
    """The welcome's data, or (error code, close code) the connect was refused with."""
    try:
        return await connect
    except ClientError as exc:
        return exc.code, exc.close_code


async def test_connections_arriving_together_share_one_admission_transaction(any_db):
    gw = any_db
    owner = await gw.connect("owner")
    sider = await gw.connect("sider")
    users = [f"u{n}" for n in range(4)]
    await room(owner, "lobby", members=users)
    await room(sider, "side", members=["u2"])
    await settle(owner, sider)

    clients = {name: gw.client(name) for name in users}
    async with one_admission_batch(gw, len(users)):
        connects = {name: asyncio.ensure_future(c.connect()) for name, c in clients.items()}

    for name, connect in connects.items():
        welcome = await connect
        assert welcome["userId"] == name and welcome["user"]["displayName"] == name
    # Each user's rooms came back with it: the members of those rooms, and only
    # they, hear that the user came online.
    online = {(await owner.next_event("user:status_changed"))["data"]["userId"]
              for _ in users}  # fmt: skip
    assert online == set(users)
    assert (await sider.next_event("user:status_changed"))["data"] == {
        "userId": "u2", "status": "online"}  # fmt: skip
    await nothing_arrived([owner, sider], "user:status_changed")
    # Recorded from their tokens, and each connection can use its rooms.
    members = (await owner.emit("room:members", {"roomId": "lobby"}))["members"]
    assert {m["userId"]: m["displayName"] for m in members if m["userId"] in users} == {
        u: u for u in users}  # fmt: skip
    await join(clients["u2"], "side")
    await send(clients["u2"], "side", "here")


async def test_a_banned_user_in_an_admission_batch_is_refused_alone(gateway_factory):
    # One connection per user: a refusal that kept its slot would lock mallory out.
    gw = await gateway_factory(max_connections_per_user=1)
    admin = await gw.connect("boss", "admin", roles=("admin",))
    owner = await gw.connect("owner")
    await room(owner, "lobby", members=["mallory", "alice", "bob"])
    await admin.emit("admin:ban", {"userId": "mallory", "reason": "spam"})
    await settle(owner)

    async with one_admission_batch(gw, 3):
        connects = {name: asyncio.ensure_future(gw.client(name).connect())
                    for name in ("alice", "mallory", "bob")}  # fmt: skip

    got = {name: await admitted(f) for name, f in connects.items()}
    assert got["mallory"] == ("BANNED", 4403)
    assert got["alice"]["userId"] == "alice" and got["bob"]["userId"] == "bob"
    online = {(await owner.next_event("user:status_changed"))["data"]["userId"]
              for _ in range(2)}  # fmt: skip
    assert online == {"alice", "bob"}
    await nothing_arrived([owner], "user:status_changed")

    await admin.emit("admin:unban", {"userId": "mallory"})
    welcome = await gw.client("mallory").connect()
    assert welcome["userId"] == "mallory"


async def test_the_same_user_twice_in_an_admission_batch(any_db):
    gw = any_db
    owner = await gw.connect("owner")
    await room(owner, "lobby", members=["alice"])
    first = await gw.connect("alice", token=gw.token("alice", display_name="Alice Old"))
    await first.aclose()
    await owner.next_event("user:status_changed", predicate=went_offline("alice"))
    await settle(owner)

    devices = [Client(gw.url(), gw.token("alice", display_name=name))
               for name in ("Alice One", "Alice Two")]  # fmt: skip
    gw.clients.extend(devices)
    connects = []
    async with one_admission_batch(gw, 2):
        for n, device in enumerate(devices, 1):  # One, then Two
            connects.append(asyncio.ensure_future(device.connect()))
            await eventually(lambda n=n: gw.node.admissions.waiting == n, timeout=10,
                             what=f"device {n} waiting for admission")  # fmt: skip
    welcomes = [await c for c in connects]

    # Each connection is welcomed with its own token's claims; the stored user
    # has the claims of the one that arrived last.
    assert [w["user"]["displayName"] for w in welcomes] == ["Alice One", "Alice Two"]
    members = (await owner.emit("room:members", {"roomId": "lobby"}))["members"]
    assert member(members, "alice")["displayName"] == "Alice Two"
    assert statuses_of(members)["alice"] == "online"
    # Both got alice's rooms; her coming online is one piece of news.
    ev = await owner.next_event("user:status_changed")
    assert ev["data"] == {"userId": "alice", "status": "online"}
    await nothing_arrived([owner], "user:status_changed")
    for device in devices:
        await join(device, "lobby")
        await send(device, "lobby", "from a device")


async def test_a_database_failure_refuses_the_admission_batch_as_unavailable(
    gateway_factory, caplog
):
    """Another process holds SQLite's write lock: the batch's connections are told to retry.

    The node waits ``busy_timeout`` for the lock (shortened here from 5 s),
    then the whole batch fails; none is admitted, no limit slot is kept, and
    once the lock is gone connections are admitted without a restart.
    """
    gw = await gateway_factory(max_connections_per_user=1)
    path = gw.config.database_url.removeprefix("sqlite:///")
    await gw.node.db.run_bare("test.busy_timeout", gw.node.db.db.execute_sql,
                              "PRAGMA busy_timeout = 200")  # fmt: skip
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        connects = {name: asyncio.ensure_future(gw.client(name).connect())
                    for name in ("alice", "bob")}  # fmt: skip
        got = {name: await admitted(f) for name, f in connects.items()}
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert got == {"alice": ("SERVICE_UNAVAILABLE", 1001), "bob": ("SERVICE_UNAVAILABLE", 1001)}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert gw.node.hub.user_connections("alice") == []

    for name in ("alice", "bob"):
        assert (await gw.client(name).connect())["userId"] == name


# -- the notification backlog (server/notify.py) -------------------------------------


async def backlog_metric(gw: Any) -> float:
    """``switchboard_notification_backlog`` as an operator's scrape reads it."""
    text = (await AsyncHTTPClient().fetch(f"{gw.http}/metrics")).body.decode()
    [line] = [x for x in text.splitlines() if x.startswith("switchboard_notification_backlog ")]
    return float(line.split()[1])


async def test_the_notification_backlog_gauge_counts_sent_messages_not_yet_notified(gateway):
    """A message acked while the database is busy waits in the backlog, then drains."""
    gw = gateway
    alice = await gw.connect("alice")
    await room(alice, "general", members=["bob"])
    bob = await gw.connect("bob", namespace="notifications")
    await bob.next_event("notification:recent")
    await gw.node.tasks.drain(5.0)
    assert await backlog_metric(gw) == 0
    before = batch_sizes(gw)

    release_round = threading.Event()
    async with held_database(gw):
        sent = asyncio.ensure_future(alice.emit(
            "message:send", {"roomId": "general", "content": "hi @bob"}))  # fmt: skip
        await eventually(lambda: batch_sizes(gw)[0] == before[0] + 1, timeout=10,
                         what="the send's batch waiting for the database")  # fmt: skip
        # Next in the worker's queue after the send: the notification round waits.
        round_hold = asyncio.ensure_future(
            gw.node.db.run_bare("test.hold", release_round.wait, 30.0))  # fmt: skip
        await asyncio.sleep(0)
    try:
        await sent  # committed and acked
        assert await backlog_metric(gw) == 1
    finally:
        release_round.set()
        await round_hold
    categories = {(await bob.next_event("notification:created"))["data"]["notification"][
        "category"] for _ in range(2)}  # fmt: skip
    assert categories == {"chat", "mention"}
    await eventually(lambda: gw.node.notifications.backlog == 0, timeout=10, what="drained")
    assert await backlog_metric(gw) == 0


async def test_rooms_seen_together_clear_their_missed_notices_in_one_transaction(gateway):
    """room:join and room:read clear the missed-messages notice; a burst of them, together."""
    gw = gateway
    alice = await gw.connect("alice")
    await room(alice, "general", members=["bob", "carol", "dave"])
    await room(alice, "random", members=["bob"])
    await send(alice, "general", "one")
    await send(alice, "random", "two")
    inboxes = {u: await gw.connect(u, namespace="notifications") for u in ("bob", "carol", "erin")}
    for client in inboxes.values():
        await client.next_event("notification:recent")
    await eventually(lambda: gw.node.notifications.backlog == 0, timeout=10, what="notified")
    await gw.node.tasks.drain(5.0)
    missed = {u: {n["data"]["roomId"]: n["id"] for n in (await gw.node.notifications.page(
        u, unread_only=False, limit=10, before=None))["notifications"]}
        for u in ("bob", "carol", "dave")}  # fmt: skip
    assert missed == {"bob": {"general": missed["bob"]["general"],
                              "random": missed["bob"]["random"]},
                      "carol": {"general": missed["carol"]["general"]},
                      "dave": {"general": missed["dave"]["general"]}}  # fmt: skip
    for client in inboxes.values():
        await settle(client)
    jobs = gw.node.registry.get_sample_value(
        "switchboard_db_query_duration_seconds_count", {"operation": "notification.clear_missed"}
    ) or 0.0  # fmt: skip

    seen = [("bob", "general"), ("carol", "general"), ("bob", "random"), ("bob", "general"),
            ("erin", "general")]  # fmt: skip
    async with held_database(gw):
        primer = asyncio.ensure_future(gw.node.notifications.room_seen("dave", "general"))
        await asyncio.sleep(0)  # its batch goes to the database alone
        together = [asyncio.ensure_future(gw.node.notifications.room_seen(u, r)) for u, r in seen]
        await eventually(lambda: gw.node.notifications._seen.waiting == len(seen), timeout=10,
                         what="the rooms seen waiting for the database")  # fmt: skip
    await primer
    for f in together:
        await f

    after = gw.node.registry.get_sample_value(
        "switchboard_db_query_duration_seconds_count", {"operation": "notification.clear_missed"}
    )  # fmt: skip
    assert after == jobs + 2
    for user in ("bob", "carol", "dave"):
        assert (await gw.node.notifications.page(user, unread_only=False, limit=10,
                                                 before=None))["notifications"] == []  # fmt: skip
    # Each notice's deletion is pushed once, with the count after it.
    bob_deleted = {(await inboxes["bob"].next_event("notification:deleted"))["data"][
        "notificationId"] for _ in range(2)}  # fmt: skip
    assert bob_deleted == {missed["bob"]["general"], missed["bob"]["random"]}
    carol = await inboxes["carol"].next_event("notification:deleted")
    assert carol["data"] == {"notificationId": missed["carol"]["general"]}
    assert (await inboxes["carol"].next_event("notification:unread_count"))["data"] == {
        "count": 0}  # fmt: skip
    await nothing_arrived(list(inboxes.values()), "notification:deleted")
