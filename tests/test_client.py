"""The Python client against a real gateway: reconnect and gap-free recovery.

The node is stopped (clients get ``system:disconnect`` and 1001), messages
are stored while the reconnecting client is away, and a new node starts on
the same port and database; the client must come back by itself, resume
its rooms (one ``room:resume``) and see every message exactly once.
"""

from __future__ import annotations

import pytest

from models import Message, Room, RoomMember
from server.app import Node
from server.core.auth import mint_token
from switchboard_client import Client, ClientError
from tests.conftest import make_config
from tests.support.client_checks import assert_no_event

pytestmark = pytest.mark.asyncio


async def _start(tmp_path, port: int = 0) -> Node:
    node = Node(make_config(tmp_path, port=port, database_url=f"sqlite:///{tmp_path}/chat.db"))
    await node.start()
    return node


async def test_reconnects_and_recovers_after_a_server_restart(tmp_path):
    node = await _start(tmp_path)
    port = node.port
    url = f"ws://127.0.0.1:{port}/ws/chat"
    alice = Client(url, mint_token(node.config, "alice"), reconnect=True, max_backoff=0.5)
    await alice.connect()
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    await alice.emit("room:join", {"roomId": "general"})
    await alice.emit("message:send", {"roomId": "general", "content": "before"})
    assert alice.last_seq("general") == 1

    await node.stop(grace_secs=2.0)
    ev = await alice.next_event("system:disconnect", timeout=5)
    assert ev["data"] == {"reason": "server_shutdown", "reconnect": True}
    await alice.next_event("client:disconnected", timeout=5)

    # While alice is away: a new node on the same port and database, and bob talks.
    node = await _start(tmp_path, port)
    try:
        bob = Client(url, mint_token(node.config, "bob"))
        await bob.connect()
        await bob.emit("room:join", {"roomId": "general"})
        for i in range(5):
            await bob.emit("message:send", {"roomId": "general", "content": f"while away {i}"})

        back = await alice.next_event("client:reconnected", timeout=10)
        assert "general" in back["data"]["rooms"]
        # Recovered messages arrive as message:new, then live traffic continues.
        await bob.emit("message:send", {"roomId": "general", "content": "after"})
        seen: list[int] = []
        while len(seen) < 6:
            ev = await alice.next_event("message:new", timeout=5)
            seen.append(ev["data"]["message"]["seq"])
        assert seen == [2, 3, 4, 5, 6, 7]
        await assert_no_event(alice, "message:new")
        assert alice.last_seq("general") == 7
        await bob.aclose()
        await alice.aclose()
    finally:
        await node.stop(grace_secs=1.0)


def _events(node: Node, event: str) -> float:
    labels = {"namespace": "chat", "event": event}
    return node.registry.get_sample_value("switchboard_events_received_total", labels) or 0.0


async def test_reconnect_resumes_every_room_with_one_request(tmp_path):
    """room:resume after a restart: the rooms come back with one request; a room
    purged and recreated meanwhile is reported reset and joined afresh."""
    node = await _start(tmp_path)
    port = node.port
    url = f"ws://127.0.0.1:{port}/ws/chat"
    alice = Client(url, mint_token(node.config, "alice"), reconnect=True, max_backoff=0.5)
    await alice.connect()
    rooms = ["r1", "r2", "r3"]
    for room_id in rooms:
        await alice.emit("room:create", {"roomId": room_id, "name": room_id})
        await alice.emit("room:join", {"roomId": room_id})
        await alice.emit("message:send", {"roomId": room_id, "content": "before"})
    await node.stop(grace_secs=2.0)
    await alice.next_event("client:disconnected", timeout=5)

    # While alice is away, on another node of the same database: bob talks in
    # r1 and r2, and r3 is purged and created again under its id.
    side = await _start(tmp_path)
    try:
        bob = Client(f"ws://127.0.0.1:{side.port}/ws/chat", mint_token(side.config, "bob"))
        await bob.connect()
        for room_id in ("r1", "r2"):
            await bob.emit("room:join", {"roomId": room_id})
            for i in range(2):
                await bob.emit("message:send", {"roomId": room_id, "content": f"away {i}"})
        await bob.aclose()

        def purge_r3() -> None:
            for model in (Message, RoomMember, Room):
                field = model.id if model is Room else model.room
                model.delete().where(field == "r3").execute()

        await side.db.run("test.purge", purge_r3)
        owner = Client(f"ws://127.0.0.1:{side.port}/ws/chat", mint_token(side.config, "carol"))
        await owner.connect()
        await owner.emit("room:create", {"roomId": "r3", "name": "again", "members": ["alice"]})
        await owner.aclose()
    finally:
        await side.stop(grace_secs=1.0)

    node = await _start(tmp_path, port)
    try:
        back = await alice.next_event("client:reconnected", timeout=10)
        assert back["data"]["rooms"] == {
            "r1": {"rejoined": True, "recovered": True, "missed": 2},
            "r2": {"rejoined": True, "recovered": True, "missed": 2},
            "r3": {"reset": True, "rejoined": True, "recovered": False, "missed": 0},
        }
        assert (await alice.next_event("client:room_reset"))["data"] == {"roomId": "r3"}
        # One room:resume, and a room:join only for the room that was reset.
        assert (_events(node, "room:resume"), _events(node, "room:join")) == (1.0, 1.0)
        recovered = [await alice.next_event("message:new", timeout=5) for _ in range(4)]
        assert [(f["data"]["message"]["roomId"], f["data"]["message"]["seq"])
                for f in recovered] == [("r1", 2), ("r1", 3), ("r2", 2), ("r2", 3)]  # fmt: skip
        await assert_no_event(alice, "message:new")
        # r3 is live again from its new history (seq 1, which alice saw in the old one).
        carol = Client(url, mint_token(node.config, "carol"))
        await carol.connect()
        await carol.emit("room:join", {"roomId": "r3"})
        await carol.emit("message:send", {"roomId": "r3", "content": "new history"})
        live = await alice.next_event("message:new", timeout=5)
        assert (live["data"]["message"]["content"], live["data"]["message"]["seq"]) == (
            "new history", 1,
        )  # fmt: skip
        await carol.aclose()
        await alice.aclose()
    finally:
        await node.stop(grace_secs=1.0)


async def test_refused_reconnect_stops_retrying(tmp_path):
    node = await _start(tmp_path)
    try:
        url = f"ws://127.0.0.1:{node.port}/ws/chat"
        client = Client(url, mint_token(node.config, "carol", ttl_secs=1), reconnect=True)
        await client.connect()
        # The token runs out on the live connection: 4401, and no reconnection loop.
        code, _ = await client.wait_closed(timeout=5)
        assert code == 4401
        assert client.closed
        with pytest.raises(ClientError) as info:
            await Client(url, mint_token(node.config, "carol", ttl_secs=-5)).connect()
        assert info.value.code == "TOKEN_EXPIRED" and info.value.close_code == 4401
    finally:
        await node.stop(grace_secs=1.0)


async def test_emit_raises_the_server_error_code(gateway):
    client = await gateway.connect("dave")
    with pytest.raises(ClientError) as info:
        await client.emit("room:join", {"roomId": "nowhere"})
    assert info.value.code == "ROOM_NOT_FOUND"
    assert info.value.details == {"roomId": "nowhere"}
    # The connection is still usable after an error.
    assert (await client.emit("system:ping", {}))["latencyMs"] is None


async def test_buffered_shows_matching_frames_without_consuming_them(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    await alice.emit("room:join", {"roomId": "general"})
    await bob.emit("room:join", {"roomId": "general"})
    for text in ("one", "two"):
        await alice.emit("message:send", {"roomId": "general", "content": text})
    await bob.emit("system:ping")  # both messages are here by now
    two = bob.buffered("message:new", lambda f: f["data"]["message"]["content"] == "two")
    assert [f["data"]["message"]["content"] for f in two] == ["two"]
    assert [f["data"]["message"]["content"] for f in bob.buffered("message:new")] == [
        "one", "two",
    ]  # fmt: skip
    assert bob.buffered("no:such") == []
    # Still there for next_event, oldest first.
    assert (await bob.next_event("message:new"))["data"]["message"]["content"] == "one"
    assert (await bob.next_event("message:new"))["data"]["message"]["content"] == "two"
    assert bob.buffered("message:new") == []
