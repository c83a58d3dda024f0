"""server/store/batch.py: group commit of message:send and of connection admission.

To make a batch of a known shape, a test holds the node's database worker
with a job that waits on an event, queues the sends (or connections) it
wants batched (``node.sends.waiting`` / ``node.admissions.waiting`` say when
they are all in), then lets go: whatever waited goes to the database in one
transaction (the batch-size histograms count it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import pytest_asyncio
from tornado.httpclient import AsyncHTTPClient

from models import Room, utcnow
from models import chat as chat_db
from switchboard_client import Client, ClientError
from tests.conftest import ROOMY_RATE_LIMITS
from tests.support.client_checks import barrier, nothing_arrived, settle
from tests.support.cluster import lock_rows, waiting_for_locks
from tests.support.sql_trace import writer_statements
from tests.support.waiting import eventually
from tests.test_chat import join, member, room, room_with, send, went_offline
from tests.test_hub import decode_frame, split_frames
from tests.test_presence import statuses as statuses_of
from tests.test_shutdown import ServerProcess

pytestmark = pytest.mark.asyncio


@asynccontextmanager
async def held_database(gw: Any, lock_table: str | None = None) -> AsyncIterator[None]:
    """No batch writing to ``lock_table`` commits until the block ends.

    SQLite: the node's one database worker is busy. PostgreSQL has a pool of
    workers: a transaction holds an exclusive lock on ``lock_table`` that
    every write to it waits for (reads go on). Without a table, only the
    worker that runs the hold is busy (enough on SQLite).
    """
    release = threading.Event()
    db = gw.node.db

    def hold() -> None:
        with db.db.atomic():
            if lock_table is not None and not db.is_sqlite:
                db.db.execute_sql(f'LOCK TABLE "{lock_table}" IN EXCLUSIVE MODE')
            release.wait(30.0)

    holder = asyncio.ensure_future(db.run_bare("test.hold", hold))
    try:
        yield
    finally:
        release.set()
        await holder


async def refused(future: Awaitable[Any]) -> ClientError:
    """The error ``future`` (an emit) fails with; the test fails if it succeeds."""
    with pytest.raises(ClientError) as info:
        await future
    return info.value


async def primed_send(gw: Any, client: Client, room_id: str) -> asyncio.Future[Any]:
    """A send that goes to the database alone and waits there (inside ``held_database``).

    An idle batcher sends its first request at once; with that batch held,
    the sends that follow wait and go together in the next one. Returns the
    primer's ack, to await once the hold ends.
    """
    before = batch_sizes(gw)[0]
    primer = asyncio.ensure_future(
        client.emit("message:send", {"roomId": room_id, "content": "primer"})
    )
    await eventually(lambda: batch_sizes(gw)[0] == before + 1, timeout=10,
                     what="the primer's batch waiting for the database")  # fmt: skip
    return primer


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
        primer = await primed_send(gw, owner, "general")
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


async def test_a_batchs_senders_get_their_ack_between_the_rooms_broadcasts_in_seq_order(gateway):
    """Acks leave from the batcher's callback, before the handlers wake; each send's ack
    still follows the broadcasts of the sends committed before it in the batch, so every
    sender reads the room's seqs in order: the others' message:new and its own ack."""
    gw = gateway
    owner, *senders = await room_with(
        gw, "general", "owner", *(f"s{n}" for n in range(4)), settled=True
    )
    seen: dict[str, list[tuple[str, int]]] = {}
    for n in range(4):
        (conn,) = gw.node.hub.user_connections(f"s{n}")
        seen[f"s{n}"] = got = []
        write = conn.write_frame

        def spy(frame: bytes, frames: int = 1, got: list[Any] = got, write: Any = write) -> bool:
            for one in split_frames(frame):
                body = orjson.loads(decode_frame(one))
                if body.get("event") == "message:new":
                    got.append(("new", body["data"]["message"]["seq"]))
                elif "message" in body.get("data", {}):
                    got.append(("ack", body["data"]["message"]["seq"]))
            return write(frame, frames)

        conn.write_frame = spy

    async with held_database(gw):
        primer = await primed_send(gw, owner, "general")
        futures = [
            asyncio.ensure_future(c.emit("message:send", {"roomId": "general", "content": "x"}))
            for c in senders
        ]  # fmt: skip
        await queued(gw, len(futures))
    first = (await primer)["message"]["seq"]
    acks = [(await f)["message"]["seq"] for f in futures]
    assert sorted(acks) == list(range(first + 1, first + 5))
    for client in senders:
        for _ in range(len(senders)):  # the primer's and the three others'
            await client.next_event("message:new")
    await barrier(*senders)
    for n, seq in enumerate(acks):
        others = [("new", s) for s in range(first, first + 5) if s != seq]
        assert seen[f"s{n}"] == sorted([*others, ("ack", seq)], key=lambda kind_seq: kind_seq[1])


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
    alice, bob = await room_with(gw, "general", "alice", "bob")
    async with held_database(gw):
        futures = [asyncio.ensure_future(c.emit("message:send", {"roomId": "general",
                                                                  "content": "x"}))
                   for c in (alice, bob)]  # fmt: skip
        await eventually(lambda: gw.node.sends.waiting == 1, timeout=10, what="one waiting")
    acks = [await f for f in futures]
    assert sorted(a["message"]["seq"] for a in acks) == [1, 2]
    assert batch_sizes(gw) == (2.0, 2.0)


async def test_a_lone_plain_send_is_checked_by_its_seq_bump(gateway):
    """A lone send without clientMsgId or parent costs BEGIN, the bump (with its checks
    as conditions), the insert and COMMIT; one the checks refuse still gets its
    error and takes no seq."""
    gw = gateway
    alice, muted, stranger = await room_with(
        gw, "general", "alice", "muted", outsiders=("stranger",)
    )
    admin = await gw.connect("mod", "admin", roles=("admin",))
    await admin.emit("admin:mute", {"userId": "muted", "roomId": "general",
                                    "durationSeconds": 600})  # fmt: skip
    async with writer_statements(gw) as statements:
        first = await send(alice, "general", "hello")
    assert [s.split()[0] for s in statements[:4]] == ["BEGIN", "UPDATE", "INSERT", "COMMIT"]
    assert "room_member" in statements[1] and "room_mute" in statements[1]
    for client, code in ((muted, "MUTED"), (stranger, "NOT_IN_ROOM")):
        error = await refused(client.emit("message:send", {"roomId": "general", "content": "x"}))
        assert error.code == code and error.details["roomId"] == "general"
    assert (await send(alice, "general", "again"))["seq"] == first["seq"] + 1


async def test_a_lone_send_run_by_hand_rolls_back_whatever_stops_it(gateway, caplog):
    """SQLite's lone plain send runs its transaction by hand (``store_sends``): refused by
    its checks it rolls back before the checks name the error; failing inside (a
    trigger refusing the insert here) it rolls back and takes no seq; inside a
    transaction already open it goes through ``atomic()``, which nests."""
    gw = gateway
    alice, muted = await gw.connect("alice"), await gw.connect("muted")
    await room(alice, "general")
    await join(muted, "general")
    admin = await gw.connect("mod", "admin", roles=("admin",))
    await admin.emit("admin:mute", {"userId": "muted", "roomId": "general",
                                    "durationSeconds": 600})  # fmt: skip
    first = await send(alice, "general", "hello")

    async with writer_statements(gw) as statements:
        error = await refused(muted.emit("message:send", {"roomId": "general", "content": "x"}))
    assert error.code == "MUTED"
    assert [s.split()[0] for s in statements[:4]] == ["BEGIN", "UPDATE", "ROLLBACK", "BEGIN"]

    trigger = (
        "CREATE TEMP TRIGGER boom BEFORE INSERT ON main.message"
        " WHEN NEW.content = 'boom' BEGIN SELECT RAISE(ABORT, 'boom refused'); END"
    )

    def refuse_boom(on: bool) -> None:  # on the writer's own connection, its thread
        gw.node.db.db.connection().execute(trigger if on else "DROP TRIGGER boom")

    await gw.node.db.run_bare("test.trigger", refuse_boom, True)
    with caplog.at_level(logging.ERROR, logger="switchboard.db"):
        async with writer_statements(gw) as statements:
            boom = alice.emit("message:send", {"roomId": "general", "content": "boom"})
            error = await refused(boom)
    await gw.node.db.run_bare("test.trigger", refuse_boom, False)
    assert error.code == "INTERNAL_ERROR"
    words = [s.split()[0] for s in statements]
    # The INSERT shows more than once: the new trigger makes SQLite prepare it again.
    assert words[:3] == ["BEGIN", "UPDATE", "INSERT"] and words[-1] == "ROLLBACK"
    assert "COMMIT" not in words
    assert "message.send batch failed" in caplog.text
    assert (await send(alice, "general", "after"))["seq"] == first["seq"] + 1

    request = chat_db.SendRequest("general", "alice", "Alice", "inside", "text", None, [], {}, None)
    (inside,) = await gw.node.db.run("test.inside", chat_db.store_sends, [request])
    assert isinstance(inside, chat_db.Sent) and inside.message["seq"] == first["seq"] + 2


async def test_sqlite_inserts_a_batch_without_a_savepoint_and_keeps_its_retries(gateway):
    """SQLite: no SAVEPOINT around a batch's insert (``send_messages`` says why it
    cannot meet a racing retry there); a retry of a stored message and one
    within the batch are still duplicates, the fresh sends gapless."""
    gw = gateway
    # One connection per send: a connection's sends are handled one after the other.
    owner, *alices, bob = await room_with(gw, "general", "owner", "alice", "alice", "alice", "bob")
    first = await alices[0].emit("message:send", {"roomId": "general", "content": "one",
                                                  "clientMsgId": "k-1"})  # fmt: skip
    async with writer_statements(gw) as statements:
        async with held_database(gw):
            primer = await primed_send(gw, owner, "general")
            futures = [asyncio.ensure_future(c.emit("message:send", {"roomId": "general", **d}))
                       for c, d in ((alices[0], {"content": "one", "clientMsgId": "k-1"}),
                                    (alices[1], {"content": "two", "clientMsgId": "k-2"}),
                                    (alices[2], {"content": "two", "clientMsgId": "k-2"}),
                                    (bob, {"content": "three"}))]  # fmt: skip
            await queued(gw, len(futures))
        primed = (await primer)["message"]
        got = [await f for f in futures]
    assert got[0] == {"message": first["message"], "duplicate": True}
    assert [a["duplicate"] for a in got[1:]] == [False, True, False]
    assert got[1]["message"] == got[2]["message"]
    fresh = [got[1]["message"]["seq"], got[3]["message"]["seq"]]
    assert fresh == [primed["seq"] + 1, primed["seq"] + 2]
    assert any(s.startswith('INSERT INTO "message"') for s in statements)
    assert not [s for s in statements if "SAVEPOINT" in s.upper()]


# -- message:react (op message.react) ------------------------------------------------


def react_batches(gw: Any) -> tuple[int, int]:
    """(batches of reactions sent to the database, reactions they carried) so far."""
    return gw.node.reacts.batches, gw.node.reacts.carried


async def queued_in(
    batcher: Any, client: Client, event: str, data: dict[str, Any]
) -> asyncio.Future[Any]:
    """Emit and wait until the request waits for ``batcher``'s next batch (keeping this order)."""
    waiting = batcher.waiting
    future = asyncio.ensure_future(client.emit(event, data))
    await eventually(lambda: batcher.waiting == waiting + 1, timeout=10,
                     what=f"{event} {data} waiting for the database")  # fmt: skip
    return future


async def queued_react(gw: Any, client: Client, message_id: str, emoji: str,
                       action: str = "add") -> asyncio.Future[Any]:  # fmt: skip
    data = {"messageId": message_id, "emoji": emoji, "action": action}
    return await queued_in(gw.node.reacts, client, "message:react", data)


async def test_a_batch_fails_its_bad_reactions_alone_and_applies_the_rest(gateway):
    gw = gateway
    owner = await gw.connect("owner")
    await room(owner, "general")
    await room(owner, "vault", type="private")
    alice1, alice2 = await gw.connect("alice"), await gw.connect("alice")
    bob, carol, muted, watcher = [await gw.connect(n) for n in ("bob", "carol", "muted", "w")]
    stray, carol2, carol3 = [await gw.connect(n) for n in ("stray", "carol", "carol")]
    for client in (alice1, alice2, bob, carol, muted, watcher):
        await join(client, "general")
    message = (await send(owner, "general", "react to me"))["id"]
    secret = (await send(owner, "vault", "not for you"))["id"]
    admin = await gw.connect("mod", "admin", roles=("admin",))
    await admin.emit("admin:mute", {"userId": "muted", "roomId": "general",
                                    "durationSeconds": 600})  # fmt: skip
    await settle(watcher)
    before = react_batches(gw)

    async with held_database(gw):
        primer = asyncio.ensure_future(owner.emit(
            "message:react", {"messageId": message, "emoji": "👀"}))  # fmt: skip
        await eventually(lambda: react_batches(gw)[0] == before[0] + 1, timeout=10,
                         what="the primer's batch waiting for the database")  # fmt: skip
        futures = {
            "alice adds": await queued_react(gw, alice1, message, "👍"),
            "bob adds": await queued_react(gw, bob, message, "👍"),
            "muted": await queued_react(gw, muted, message, "👍"),
            "alice removes": await queued_react(gw, alice2, message, "👍", "remove"),
            "stray": await queued_react(gw, stray, message, "👍"),
            "secret": await queued_react(gw, carol2, secret, "👍"),
            "missing": await queued_react(gw, carol3, "999999", "👍"),
            "carol adds": await queued_react(gw, carol, message, "👍"),
        }

    assert (await primer)["reactions"] == {"👀": ["owner"]}
    got = {name: await outcome(f) for name, f in futures.items()}
    assert got["muted"] == "MUTED"
    assert got["stray"] == "NOT_IN_ROOM"
    assert got["secret"] == got["missing"] == "MESSAGE_NOT_FOUND"
    # Each good one acks the reactions as they stood after it, in arrival order.
    expected = {
        "alice adds": {"👀": ["owner"], "👍": ["alice"]},
        "bob adds": {"👀": ["owner"], "👍": ["alice", "bob"]},
        "alice removes": {"👀": ["owner"], "👍": ["bob"]},
        "carol adds": {"👀": ["owner"], "👍": ["bob", "carol"]},
    }
    assert {name: got[name]["reactions"] for name in expected} == expected
    # Two batches: the primer alone, then every reaction that waited, bad ones included.
    after = react_batches(gw)
    assert after == (before[0] + 2, before[1] + 1 + len(futures))
    # The room hears each good one once, in that order, and nothing of the bad ones.
    heard = [(await watcher.next_event("message:reaction"))["data"] for _ in range(5)]
    assert [(h["userId"], h["action"], h["reactions"]) for h in heard] == [
        ("owner", "add", {"👀": ["owner"]}),
        *[(name.split()[0], "remove" if "removes" in name else "add", reactions)
          for name, reactions in expected.items()],
    ]  # fmt: skip
    await nothing_arrived([watcher], "message:reaction")
    page = await watcher.emit("room:get_messages", {"roomId": "general", "limit": 1})
    assert page["messages"][0]["reactions"] == {"👀": ["owner"], "👍": ["bob", "carol"]}


async def test_a_reaction_removed_and_added_back_in_one_batch_goes_last(gateway):
    """What the acks said is what is stored: the re-added reaction comes after the others."""
    gw = gateway
    owner, alice1, alice2, bob = await room_with(gw, "general", "owner", "alice", "alice", "bob")
    message = (await send(owner, "general", "react to me"))["id"]
    await alice1.emit("message:react", {"messageId": message, "emoji": "👍"})
    await bob.emit("message:react", {"messageId": message, "emoji": "👍"})
    before = react_batches(gw)[0]
    async with held_database(gw):
        primer = asyncio.ensure_future(owner.emit(
            "message:react", {"messageId": message, "emoji": "👀"}))  # fmt: skip
        await eventually(lambda: react_batches(gw)[0] == before + 1, timeout=10,
                         what="the primer's batch waiting for the database")  # fmt: skip
        removed = await queued_react(gw, alice1, message, "👍", "remove")
        back = await queued_react(gw, alice2, message, "👍")
    await primer
    assert (await removed)["reactions"] == {"👍": ["bob"], "👀": ["owner"]}
    assert (await back)["reactions"] == {"👍": ["bob", "alice"], "👀": ["owner"]}
    page = await bob.emit("room:get_messages", {"roomId": "general", "limit": 1})
    assert page["messages"][0]["reactions"] == {"👍": ["bob", "alice"], "👀": ["owner"]}


# -- room:read (op room.read) --------------------------------------------------------


async def test_a_batch_fails_its_bad_reads_alone_and_moves_the_rest(gateway):
    gw = gateway
    owner = await gw.connect("owner")
    await room(owner, "general")
    await room(owner, "vault", type="private")
    for n in range(3):
        await send(owner, "general", f"m{n}")
    bob1, bob2, carol = [await gw.connect(n) for n in ("bob", "bob", "carol")]
    for client in (bob1, bob2, carol):
        await join(client, "general")
    strays = [await gw.connect("stray") for _ in range(3)]
    reads = gw.node.reads
    before = (reads.batches, reads.carried)

    def read(room_id: str, seq: int) -> dict[str, Any]:
        return {"roomId": room_id, "seq": seq}

    async with held_database(gw):
        primer = asyncio.ensure_future(owner.emit("room:read", read("general", 1)))
        await eventually(lambda: reads.batches == before[0] + 1, timeout=10,
                         what="the primer's batch waiting for the database")  # fmt: skip
        futures = {
            "bob to 2": await queued_in(reads, bob1, "room:read", read("general", 2)),
            "stray": await queued_in(reads, strays[0], "room:read", read("general", 1)),
            "bob back to 1": await queued_in(reads, bob2, "room:read", read("general", 1)),
            "private": await queued_in(reads, strays[1], "room:read", read("vault", 1)),
            "carol past the end": await queued_in(reads, carol, "room:read", read("general", 99)),
            "nowhere": await queued_in(reads, strays[2], "room:read", read("nowhere", 1)),
        }

    assert await primer == {"roomId": "general", "lastReadSeq": 1, "unread": 2}
    got = {name: await outcome(f) for name, f in futures.items()}
    assert got == {
        "bob to 2": {"roomId": "general", "lastReadSeq": 2, "unread": 1},
        "stray": "NOT_IN_ROOM",
        # The second read of one user in a batch sees the first: a marker never goes back.
        "bob back to 1": {"roomId": "general", "lastReadSeq": 2, "unread": 1},
        "private": "ROOM_ACCESS_DENIED",
        "carol past the end": {"roomId": "general", "lastReadSeq": 3, "unread": 0},
        "nowhere": "ROOM_NOT_FOUND",
    }
    assert (reads.batches, reads.carried) == (before[0] + 2, before[1] + 1 + len(futures))
    members = (await owner.emit("room:members", {"roomId": "general"}))["members"]
    assert {m["userId"]: m["lastReadSeq"] for m in members} == {"owner": 1, "bob": 2, "carol": 3}


# -- connection admission (op user.connect) -----------------------------------------


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def any_db(request: pytest.FixtureRequest, gateway_factory: Any) -> Any:
    """A node on SQLite, then one on PostgreSQL: the upsert's SQL differs between them."""
    if request.param == "postgres":
        pg = request.getfixturevalue("postgres")
        return await gateway_factory(database_url=pg.create_database(f"t{os.urandom(6).hex()}"))
    return await gateway_factory()


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
    async with held_database(gw, "user"):
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
    # Its cleanup still has database work after that news: let it end before the
    # hold below (a run where device 1 never reached the batcher logged a database
    # ping timing out: both of PostgreSQL's database threads were held).
    await eventually(lambda: len(gw.node.tasks) == 0, timeout=10, what="alice's cleanup done")
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


# -- the database failing --------------------------------------------------------------


async def test_the_database_dying_mid_batch_fails_every_send_of_it_and_acks_none(
    gateway_factory, own_postgres, caplog
):
    """PostgreSQL stops while a batch of four waits on a room's row in it.

    The batch's connection dies under it (psycopg2: "server closed the
    connection unexpectedly", then "connection already closed" from the
    rollback, both peewee errors): every send of the batch answers
    SERVICE_UNAVAILABLE, retryable, with a WARNING and no ERROR line. Once
    the server is back the node's pool drops its dead connections and sends
    succeed, with no seq lost to the failed batch.
    """
    url = own_postgres.create_database("down")
    gw = await gateway_factory(database_url=url)
    owner = await gw.connect("owner")
    for room_id in ("general", "calm", "side"):
        await room(owner, room_id)
    senders = [await gw.connect(f"s{n}") for n in range(4)]
    for client in senders:
        await join(client, "general")
        await join(client, "calm")
    side_lock = await asyncio.to_thread(lock_rows, url, "room", ["side"])
    general_lock = await asyncio.to_thread(lock_rows, url, "room", ["general"])
    try:
        primer = asyncio.ensure_future(owner.emit(
            "message:send", {"roomId": "side", "content": "primer"}))  # fmt: skip
        await eventually(lambda: waiting_for_locks(url, 1), timeout=10,
                         what="the primer's batch waiting for its room's row")  # fmt: skip
        # One send to a room nobody holds: it fails with its batch all the same.
        futures = [
            asyncio.ensure_future(c.emit("message:send", {
                "roomId": "calm" if n == 0 else "general", "content": f"lost {n}"}))
            for n, c in enumerate(senders)
        ]  # fmt: skip
        await queued(gw, len(futures))
        before = batch_sizes(gw)
        await asyncio.to_thread(side_lock.rollback)
        assert (await primer)["message"]["seq"] == 1
        await eventually(lambda: batch_sizes(gw) == (before[0] + 1, before[1] + 4), timeout=10,
                         what="the batch of four in the database")  # fmt: skip
        await eventually(lambda: waiting_for_locks(url, 1), timeout=10,
                         what="that batch waiting for general's row")  # fmt: skip
        # The primer's background work (notifications) is done: nothing else is in flight.
        await eventually(lambda: len(gw.node.tasks) == 0, timeout=10, what="no background task")
        caplog.clear()
        await asyncio.to_thread(own_postgres.kill)
        failures = [await refused(future) for future in futures]
    finally:
        side_lock.close()
        general_lock.close()
    assert [(e.code, e.message, e.details) for e in failures] == [
        ("SERVICE_UNAVAILABLE", "Database unavailable; retry", {"retryable": True})
    ] * 4
    records = [(r.levelname, r.getMessage()) for r in caplog.records
               if r.levelno >= logging.WARNING]  # fmt: skip
    assert all(level == "WARNING" for level, _ in records), records
    assert any("message.send: the database is unavailable" in text
               for _, text in records), records  # fmt: skip
    metrics = gw.node.registry
    assert metrics.get_sample_value("switchboard_errors_total", {"code": "INTERNAL_ERROR"}) in (
        None, 0.0)  # fmt: skip

    await asyncio.to_thread(own_postgres.start)
    # Back: the first sends succeed (the pool drops the dead connections), and the
    # failed batch left no seq behind.
    acks = await asyncio.gather(*(
        c.emit("message:send", {"roomId": "general", "content": f"back {n}"})
        for n, c in enumerate(senders)
    ))  # fmt: skip
    assert sorted(a["message"]["seq"] for a in acks) == [1, 2, 3, 4]
    assert (await send(senders[0], "calm", "calm again"))["seq"] == 1
    contents = sorted(row[3] for row in await asyncio.to_thread(stored_rows, url))
    assert contents == sorted(["primer", "back 0", "back 1", "back 2", "back 3", "calm again"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def member_ids(url: str, room_id: str, user_ids: list[str]) -> list[int]:
    """The ``room_member`` row ids of those users in that room (blocking: call in a thread)."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM room_member WHERE room_id = %s AND user_id = ANY(%s)",
                        (room_id, user_ids))  # fmt: skip
            return [int(row[0]) for row in cur.fetchall()]
    finally:
        conn.close()


@pytest.mark.parametrize("event", ["message:react", "room:read"])
async def test_the_database_dying_mid_batch_fails_every_reaction_or_read_of_it(
    gateway_factory, own_postgres, event
):
    """As for sends: PostgreSQL stops while a batch of reactions (or reads) waits in it.

    The batch waits on a row it writes (a reaction's message, which its
    foreign-key check needs; a reader's membership), one of its requests on
    a free row: all four answer SERVICE_UNAVAILABLE and none is stored; once
    the server is back, the same requests succeed without a restart.
    """
    url = own_postgres.create_database("down" + event.split(":")[1])
    gw = await gateway_factory(database_url=url)
    owner = await gw.connect("owner")
    for room_id in ("general", "calm", "side"):
        await room(owner, room_id)
    users = [f"r{n}" for n in range(4)]
    clients = [await gw.connect(user) for user in users]
    for client in clients:
        await join(client, "general")
        await join(client, "calm")
    side, held, calm = [(await send(owner, room_id, "m"))["id"] for room_id in
                        ("side", "general", "calm")]  # fmt: skip
    batcher = gw.node.reacts if event == "message:react" else gw.node.reads

    def request(on: str) -> dict[str, Any]:
        if event == "message:react":
            return {"messageId": {"side": side, "general": held, "calm": calm}[on], "emoji": "👍"}
        return {"roomId": on, "seq": 1}

    if event == "message:react":
        side_rows, held_rows = ("message", [int(side)]), ("message", [int(held)])
    else:
        side_rows = ("room_member", await asyncio.to_thread(member_ids, url, "side", ["owner"]))
        held_rows = ("room_member", await asyncio.to_thread(member_ids, url, "general", users))
    side_lock = await asyncio.to_thread(lock_rows, url, *side_rows)
    held_lock = await asyncio.to_thread(lock_rows, url, *held_rows)
    try:
        before = (batcher.batches, batcher.carried)
        primer = asyncio.ensure_future(owner.emit(event, request("side")))
        await eventually(lambda: waiting_for_locks(url, 1), timeout=10,
                         what="the primer's batch waiting for its row")  # fmt: skip
        futures = [asyncio.ensure_future(c.emit(event, request("calm" if n == 0 else "general")))
                   for n, c in enumerate(clients)]  # fmt: skip
        await eventually(lambda: batcher.waiting == len(futures), timeout=10,
                         what="four requests waiting for the database")  # fmt: skip
        await asyncio.to_thread(side_lock.rollback)
        await primer
        await eventually(lambda: (batcher.batches, batcher.carried) == (before[0] + 2,
                                                                        before[1] + 5),
                         timeout=10, what="the batch of four in the database")  # fmt: skip
        await eventually(lambda: waiting_for_locks(url, 1), timeout=10,
                         what="that batch waiting for a held row")  # fmt: skip
        await asyncio.to_thread(own_postgres.kill)
        failures = [await refused(future) for future in futures]
    finally:
        side_lock.close()
        held_lock.close()
    assert [(e.code, e.details) for e in failures] == [
        ("SERVICE_UNAVAILABLE", {"retryable": True})
    ] * 4

    await asyncio.to_thread(own_postgres.start)
    if event == "message:react":
        page = await owner.emit("room:get_messages", {"roomId": "general", "limit": 1})
        assert page["messages"][0]["reactions"] == {}  # the failed batch stored nothing
        for client in clients:  # one by one: the acks' order is the stored order
            await client.emit(event, request("general"))
        page = await owner.emit("room:get_messages", {"roomId": "general", "limit": 1})
        assert page["messages"][0]["reactions"] == {"👍": users}
    else:
        for room_id in ("general", "calm"):
            members = (await owner.emit("room:members", {"roomId": room_id}))["members"]
            assert {m["lastReadSeq"] for m in members} == {0}  # the failed batch moved none
        acks = [await client.emit(event, request("general")) for client in clients]
        assert acks == [{"roomId": "general", "lastReadSeq": 1, "unread": 0}] * 4


# -- PostgreSQL: a retry racing its original on another node -----------------------------


def row_locker(url: str) -> Any:
    """A session of the test's own playing another node's batch (blocking calls)."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=10)
    with conn.cursor() as cur:
        # Whoever of a deadlock's two sides checks first is undone: the node, here.
        cur.execute("SET deadlock_timeout = '20s'")
    conn.commit()
    return conn


def touch_room(conn: Any, room_id: str) -> None:
    """What another node's batch does to a room first: take its row (blocking)."""
    with conn.cursor() as cur:
        cur.execute("UPDATE room SET last_activity_at = last_activity_at WHERE id = %s", (room_id,))


async def test_a_batch_undone_by_a_racing_retry_stores_its_other_sends_without_deadlock(
    gateway_factory, postgres
):
    """Node b's batch meets node a's original on the unique index; its sends go one by one.

    They must take the rooms' rows in the order every batch takes them: here
    another node's batch (the test's own session) was waiting for room r1
    behind b's batch and took it when b's batch was undone; b's sends, one
    by one in arrival order, would take r2 and then wait for r1, while that
    batch waits for r2 - a deadlock that PostgreSQL breaks by failing one of
    the two batches whole.
    """
    url = postgres.create_database(f"t{os.urandom(6).hex()}")
    gw_a = await gateway_factory(database_url=url)
    gw_b = await gateway_factory(database_url=url, db_workers=1)
    owner = await gw_b.connect("owner")
    for room_id in ("r1", "r2", "side"):
        await room(owner, room_id)
    alice_a, alice_b = await gw_a.connect("alice"), await gw_b.connect("alice")
    bob, carol = await gw_b.connect("bob"), await gw_b.connect("carol")
    for client, room_id in ((alice_a, "r2"), (alice_b, "r2"), (bob, "r2"), (carol, "r1")):
        await join(client, room_id)
    send = {"roomId": "r2", "content": "once", "clientMsgId": "c-1"}
    other = await asyncio.to_thread(row_locker, url)
    r2_lock = await asyncio.to_thread(lock_rows, url, "room", ["r2"])
    try:
        # Node a's original, past its checks, waiting for r2's row.
        original = asyncio.ensure_future(alice_a.emit("message:send", send))
        await eventually(lambda: waiting_for_locks(url, 1), timeout=10,
                         what="the original waiting for r2")  # fmt: skip
        # Node b's batch: bob's send to r2, alice's retry, carol's send to r1, in that order.
        async with held_database(gw_b):
            primer = await primed_send(gw_b, owner, "side")
            futures = []
            for client, data in (
                (bob, {"roomId": "r2", "content": "from bob"}),
                (alice_b, send),
                (carol, {"roomId": "r1", "content": "from carol"}),
            ):
                futures.append(asyncio.ensure_future(client.emit("message:send", data)))
                await queued(gw_b, len(futures))
        await primer
        # b's batch took r1 and waits for r2; the other batch waits for r1 behind it.
        await eventually(lambda: waiting_for_locks(url, 2), timeout=10,
                         what="b's batch waiting for r2")  # fmt: skip
        taking_r1 = asyncio.ensure_future(asyncio.to_thread(touch_room, other, "r1"))
        await eventually(lambda: waiting_for_locks(url, 3), timeout=10,
                         what="the other batch waiting for r1")  # fmt: skip
        # The original commits; b's insert meets it and b's batch is undone, which
        # hands r1 to the other batch; b's sends go one by one and one waits for it.
        await asyncio.to_thread(r2_lock.rollback)
        assert (await original)["duplicate"] is False
        await taking_r1
        await eventually(lambda: waiting_for_locks(url, 1), timeout=10,
                         what="b waiting for the other batch")  # fmt: skip
        # The other batch now wants r2: free unless b's sends took it out of order.
        await asyncio.to_thread(touch_room, other, "r2")
        await asyncio.to_thread(other.commit)
    finally:
        await asyncio.to_thread(r2_lock.close)
        await asyncio.to_thread(other.close)
    got = [await outcome(f) for f in futures]
    first = (await original)["message"]
    assert got[1] == {"message": first, "duplicate": True}
    assert [(m["roomId"], m["seq"]) for m in (got[0]["message"], got[2]["message"])] == [
        ("r2", first["seq"] + 1), ("r1", 1)]  # fmt: skip


# -- kill -9 right after the acks ---------------------------------------------------------


def stored_rows(database_url: str) -> list[tuple[str, str, int, str]]:
    """(id, room, seq, content) of every stored message, straight from the database."""
    query = "SELECT id, room_id, seq, content FROM message"
    if database_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
            rows = db.execute(query).fetchall()
    else:
        import psycopg2

        with contextlib.closing(psycopg2.connect(database_url, connect_timeout=10)) as conn:
            with conn.cursor() as cur:
                cur.execute(query)
                rows = cur.fetchall()
    return sorted((str(i), room_id, seq, content) for i, room_id, seq, content in rows)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_every_acked_send_is_stored_after_kill_9_right_after_the_last_ack(
    tmp_path, request, database
):
    """A node process, eight clients with 25 sends in flight each; SIGKILL at the last ack.

    An ack goes out only once its batch committed: restarted on the same
    database, the node has every acked message, with the id, seq and
    content the ack carried, and nothing else.
    """
    settings = {"rate_limits": ROOMY_RATE_LIMITS}
    if database == "postgres":
        pg = request.getfixturevalue("postgres")
        settings["database_url"] = pg.create_database(f"t{os.urandom(6).hex()}")
    url = settings.get("database_url", f"sqlite:///{tmp_path / 'x.db'}")
    server = await ServerProcess.start(tmp_path, **settings)
    clients: list[Client] = []
    try:
        rooms = ("r0", "r1")
        clients = [await server.client(f"u{n}") for n in range(8)]
        for room_id in rooms:
            await clients[0].emit("room:create", {"roomId": room_id, "name": room_id})
        for n, client in enumerate(clients):
            await join(client, rooms[n % 2])

        async def burst(n: int, client: Client) -> list[dict[str, Any]]:
            acks = await asyncio.gather(*(
                client.emit("message:send", {"roomId": rooms[n % 2], "content": f"u{n}-{i}"})
                for i in range(25)
            ))  # fmt: skip
            return [ack["message"] for ack in acks]

        results = await asyncio.gather(*(burst(n, c) for n, c in enumerate(clients)))
        server.proc.kill()  # SIGKILL the moment the last ack is in
    finally:
        await server.kill()
        for client in clients:
            await client.aclose(timeout=1.0)
    acked = [m for messages in results for m in messages]
    # Sends shared commits (one batch, one createdAt): the kill hit batched
    # writes. How many shared one depends on the box's load; that some did not.
    assert max(collections.Counter(m["createdAt"] for m in acked).values()) > 1

    again = await ServerProcess.start(tmp_path, **settings)
    try:
        reader = await again.client("u0")
        page = await reader.emit("room:get_messages", {"roomId": "r0", "limit": 100})
        assert len(page["messages"]) == 100
        await reader.aclose()
    finally:
        await again.kill()
    assert await asyncio.to_thread(stored_rows, url) == sorted(
        (m["id"], m["roomId"], m["seq"], m["content"]) for m in acked
    )
    for room_id in rooms:
        assert sorted(m["seq"] for m in acked if m["roomId"] == room_id) == list(range(1, 101))


# -- the notification backlog (server/services/notify.py) -------------------------------------


async def backlog_metric(gw: Any) -> float:
    """``switchboard_notification_backlog`` as an operator's scrape reads it."""
    text = (await AsyncHTTPClient().fetch(f"{gw.http}/metrics")).body.decode()
    [line] = [x for x in text.splitlines() if x.startswith("switchboard_notification_backlog ")]
    return float(line.split()[1])


async def test_a_message_with_nothing_to_notify_costs_the_round_one_statement(gateway):
    """Every member online, no mention: the round reads the room's audience with one
    SELECT, no transaction around it, and writes nothing."""
    gw = gateway
    alice, _bob = await room_with(gw, "general", "alice", "bob")
    await gw.node.tasks.drain(5.0)
    async with writer_statements(gw) as statements:
        await send(alice, "general", "nobody to tell")
        await gw.node.tasks.drain(5.0)  # the round's task
    inserted = next(i for i, s in enumerate(statements) if s.startswith('INSERT INTO "message"'))
    committed = statements.index("COMMIT", inserted)
    assert len(statements[committed + 1 :]) == 1, statements
    assert statements[-1].startswith("SELECT"), statements


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
