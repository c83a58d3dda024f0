"""The Python client against a real gateway: reconnect and gap-free recovery.

The node is stopped (clients get ``system:disconnect`` and 1001), messages
are stored while the reconnecting client is away, and a new node starts on
the same port and database; the client must come back by itself, re-join
its rooms with ``sinceSeq`` and see every message exactly once.
"""

from __future__ import annotations

import pytest

from server.app import Node
from server.auth import mint_token
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
