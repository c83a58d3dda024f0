"""``room:resume``: a chat client back after a disconnect, every room in one request.

Real gateway nodes and real WebSocket clients. The rooms' histories are
made to diverge from what a client saw the way it happens to operators: a
room purged and created again under its id (an epoch of its own), a
database older than the client's view (its last seq lower than the
client's).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from models import Message, Room, RoomMember
from models import chat as chat_db
from switchboard_client import Client
from tests.support.client_checks import assert_no_event, barrier, settle
from tests.test_chat import error, invalid, join, room, send, seqs, users
from tests.web.gateway import REPO_ROOT

pytestmark = pytest.mark.asyncio


def entry(joined: dict[str, Any], since: int | None = None) -> dict[str, Any]:
    """The resume entry of a room from its join ack (``since`` defaults to its last seq)."""
    r = joined["room"]
    return {"roomId": r["id"], "sinceSeq": r["lastSeq"] if since is None else since,
            "epoch": r["epoch"]}  # fmt: skip


async def resume(client: Client, *rooms: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``room:resume`` of ``rooms``; the answers by room id, in the order given."""
    ack = await client.emit("room:resume", {"rooms": list(rooms)})
    answers = ack["rooms"]
    assert [a["roomId"] for a in answers] == [r["roomId"] for r in rooms]
    return {a["roomId"]: a for a in answers}


async def test_resume_recovers_every_room_in_one_ack(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    entries = []
    for room_id in ("r1", "r2", "r3"):
        await room(bob, room_id)
        entries.append(entry(await join(alice, room_id)))
    await send(bob, "r2", "seen")
    entries[1]["sinceSeq"] = 1
    await alice.aclose()
    sent = {room_id: [await send(bob, room_id, f"missed {room_id} {i}") for i in range(n)]
            for room_id, n in (("r1", 3), ("r2", 2))}  # fmt: skip
    await settle(bob)

    alice = await gateway.connect("alice")
    answers = await resume(alice, *entries)
    assert answers == {
        "r1": {"roomId": "r1", "status": "resumed", "recovered": True, "missed": sent["r1"]},
        "r2": {"roomId": "r2", "status": "resumed", "recovered": True, "missed": sent["r2"]},
        "r3": {"roomId": "r3", "status": "resumed", "recovered": True, "missed": []},
    }
    assert seqs(answers["r2"]["missed"]) == [2, 3]
    # Subscribed again: the rooms' traffic flows, and the others saw alice come back.
    joined = [(await bob.next_event("room:user_joined"))["data"]["roomId"] for _ in range(3)]
    assert sorted(joined) == ["r1", "r2", "r3"]
    for room_id in ("r1", "r3"):
        live = await send(bob, room_id, "live")
        frame = await alice.next_event("message:new")
        assert frame["data"]["message"] == live
    await assert_no_event(alice, "message:new")


async def test_resume_while_messages_flow_misses_nothing_and_repeats_nothing(gateway):
    """Subscribed before reading, held frames released after the ack: per room,
    ``missed`` and the live stream join without a gap or a duplicate."""
    alice = await gateway.connect("alice")
    rooms = ("a", "b", "c")
    for room_id in rooms:
        await room(alice, room_id)
    senders = await users(gateway, "s1", "s2", "s3")
    resumers = await users(gateway, "u0", "u1", "u2", "u3")
    entries: dict[str, list[dict[str, Any]]] = {}
    for resumer in resumers:
        entries[resumer.url] = [entry(await join(resumer, r)) for r in rooms]
        await resumer.aclose()
    for s in senders:
        for room_id in rooms:
            await join(s, room_id)
    per_room = 12
    tasks = [
        asyncio.create_task(send(senders[i % 3], rooms[i % 3], f"live {i}"))
        for i in range(per_room * 3)
    ]
    answers = []
    for n, resumer in enumerate(resumers):
        # Resume at different points of the stream.
        while sum(t.done() for t in tasks) < 8 * n:
            await asyncio.wait([t for t in tasks if not t.done()],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        client = await gateway.connect(f"u{n}")
        answers.append((client, await resume(client, *entries[resumer.url])))
    await asyncio.gather(*tasks)
    for client, answer in answers:
        # Every message was acked, so published: after a ping round trip it is here.
        await barrier(client)
        live: dict[str, list[int]] = {room_id: [] for room_id in rooms}
        for frame in client.drain_events("message:new"):
            message = frame["data"]["message"]
            live[message["roomId"]].append(message["seq"])
        for room_id in rooms:
            missed = seqs(answer[room_id]["missed"])
            assert answer[room_id]["status"] == "resumed" and missed == sorted(missed)
            together = missed + live[room_id]
            assert sorted(together) == list(range(1, per_room + 1)), (room_id, missed, live)


async def test_a_stale_epoch_is_answered_reset(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    before = entry(await join(bob, "general"))
    await send(alice, "general", "old history")
    await bob.aclose()

    def purge() -> None:
        # An operator purges the room; its id is then free for a new one.
        Message.delete().where(Message.room == "general").execute()
        RoomMember.delete().where(RoomMember.room == "general").execute()
        Room.delete().where(Room.id == "general").execute()

    await gateway.node.db.run("test.purge", purge)
    created = (await alice.emit("room:create", {
        "roomId": "general", "name": "General again", "members": ["bob"],
    }))["room"]  # fmt: skip
    assert created["epoch"] != before["epoch"]
    await send(alice, "general", "new history")  # seq 1 again, another message

    bob = await gateway.connect("bob")
    answers = await resume(bob, {**before, "sinceSeq": 0})
    assert answers["general"] == {
        "roomId": "general", "status": "reset", "recovered": False, "missed": [],
    }
    # Not subscribed: the client reloads with room:join (no sinceSeq) instead.
    await send(alice, "general", "after the reset")
    await assert_no_event(bob, "message:new")
    joined = await join(bob, "general")
    assert joined["room"]["epoch"] == created["epoch"]


async def test_epochs_renewed_after_a_restore_answer_reset(gateway):
    """``switchboard renew-epochs``, run by an operator after restoring a backup."""
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    before = entry(await join(bob, "general"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "renew-epochs",
        "--database-url", gateway.config.database_url,
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert (proc.returncode, out) == (0, b"renewed the epoch of 1 room(s)\n")
    answers = await resume(bob, before)
    assert answers["general"]["status"] == "reset"
    assert (await join(bob, "general"))["room"]["epoch"] != before["epoch"]


async def test_a_since_seq_beyond_the_room_is_answered_reset(gateway):
    """The database went back (restored from a backup older than the client's view)."""
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    joined = await join(bob, "general")
    await send(alice, "general")
    answers = await resume(bob, entry(joined, since=2))
    assert answers["general"]["status"] == "reset"
    answers = await resume(bob, entry(joined, since=1))
    assert answers["general"]["status"] == "resumed"


async def test_a_former_member_is_answered_forbidden(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "secret", type="private", members=["bob"])
    await room(alice, "open")
    entries = [entry(await join(bob, r)) for r in ("secret", "open")]
    await bob.emit("room:leave", {"roomId": "secret"})
    await bob.emit("room:leave", {"roomId": "open"})
    await settle(alice, bob)
    answers = await resume(bob, *entries)
    assert {r: a["status"] for r, a in answers.items()} == {
        "secret": "forbidden", "open": "forbidden"
    }
    # Resuming joins nobody: still no member, and not subscribed.
    members = (await alice.emit("room:members", {"roomId": "open"}))["members"]
    assert [m["userId"] for m in members] == ["alice"]
    for room_id in ("secret", "open"):
        await send(alice, room_id, "members only")
    await assert_no_event(bob, "message:new")
    await assert_no_event(alice, "room:user_joined")


async def test_deleted_and_unknown_rooms_are_answered_gone(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "doomed")
    await room(alice, "kept")
    entries = [entry(await join(bob, r)) for r in ("doomed", "kept")]
    await alice.emit("room:delete", {"roomId": "doomed"})
    await bob.next_event("room:deleted")
    never = {"roomId": "never", "sinceSeq": 0, "epoch": "x"}
    answers = await resume(bob, never, *entries)
    assert {r: a["status"] for r, a in answers.items()} == {
        "never": "gone", "doomed": "gone", "kept": "resumed"
    }


async def test_missed_messages_are_capped_per_room_and_per_ack(gateway, monkeypatch):
    """Beyond the cap a room is resumed with ``recovered: false`` (the client pages)."""
    # The ack-wide budget, made small (2000 messages otherwise).
    monkeypatch.setattr(chat_db, "RESUME_MISSED_LIMIT", 5)
    alice, bob = await users(gateway, "alice", "bob")
    entries = []
    for room_id in ("r1", "r2", "r3"):
        await room(alice, room_id)
        entries.append(entry(await join(bob, room_id)))
    for room_id, n in (("r1", 3), ("r2", 3), ("r3", 2)):
        for i in range(n):
            await send(alice, room_id, f"{room_id} {i}")
    await settle(bob)
    bob2 = await gateway.connect("bob")
    answers = await resume(bob2, *entries)
    assert [(a["status"], a["recovered"], seqs(a["missed"])) for a in answers.values()] == [
        ("resumed", True, [1, 2, 3]),
        ("resumed", False, []),  # 3 more would exceed the 5
        ("resumed", True, [1, 2]),
    ]
    # The room resumed without its history is live all the same.
    await send(alice, "r2", "live")
    assert (await bob2.next_event("message:new"))["data"]["message"]["seq"] == 4


async def test_resume_validation(gateway):
    alice = await gateway.connect("alice")
    ok = {"roomId": "general", "sinceSeq": 0, "epoch": "abc"}
    await invalid(alice, "room:resume", {}, "rooms")
    await invalid(alice, "room:resume", {"rooms": [ok, ok]}, "rooms")
    await invalid(alice, "room:resume", {"rooms": [{**ok, "sinceSeq": -1}]}, "rooms")
    await invalid(alice, "room:resume", {"rooms": [{"roomId": "general", "sinceSeq": 1}]},
                  "rooms")  # fmt: skip
    await invalid(alice, "room:resume", {"rooms": [{**ok, "roomId": "no spaces"}]}, "rooms")
    many = [{**ok, "roomId": f"r{i}"} for i in range(501)]
    exc = await error(alice, "room:resume", {"rooms": many}, "VALIDATION_ERROR")
    assert list(exc.details) == ["rooms"]
    # 500 is allowed (none exists here) and nothing is left subscribed.
    answers = await resume(alice, *many[:500])
    assert {a["status"] for a in answers.values()} == {"gone"}
    assert gateway.node.hub.rooms_of(gateway.node.hub.user_connections("alice")[0]) == set()
    assert (await alice.emit("room:resume", {"rooms": []})) == {"rooms": []}
    await barrier(alice)
