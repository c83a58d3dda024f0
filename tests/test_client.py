"""The Python client against a real gateway: reconnect and gap-free recovery.

The node is stopped (clients get ``system:disconnect`` and 1001), messages
are stored while the reconnecting client is away, and a new node starts on
the same port and database; the client must come back by itself, resume
its rooms (one ``room:resume``) and see every message exactly once.

Holes: a :class:`LossyClient` sits behind a link that loses (or delays) one
incoming frame, the way a broadcast can go missing between two nodes; the
server is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from models import Message, Room, RoomMember
from server.app import Node
from server.core.auth import mint_token
from switchboard_client import Client, ClientError, Frame
from switchboard_client.wire import loads
from tests.conftest import Gateway, make_config
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


class LossyClient(Client):
    """A :class:`Client` behind a lossy link: it loses or delays chosen incoming frames.

    The link sits at the transport boundary (the raw frame, before the client
    parses it), overriding the client's internal ``_handle_raw`` and
    ``_write``: the test-only way to lose a frame between a real server and a
    real client. Outgoing events are recorded in :attr:`sent`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []
        self._lose: list[Callable[[Frame], bool]] = []
        self._delay: Callable[[Frame], bool] | None = None
        self._delayed: list[str | bytes] = []
        self._repeat: Callable[[Frame], bool] | None = None

    def lose_next(self, *which: Callable[[Frame], bool]) -> None:
        """Lose the next incoming frame for which each of ``which`` is true."""
        self._lose.extend(which)

    def delay_next(self, which: Callable[[Frame], bool]) -> None:
        """Hand the next frame ``which`` picks to the client after the frame that follows it."""
        self._delay = which

    def repeat_next(self, which: Callable[[Frame], bool]) -> None:
        """Hand the next frame ``which`` picks to the client twice, as a re-sent broadcast."""
        self._repeat = which

    def _handle_raw(self, raw: str | bytes) -> None:
        frame = loads(raw)
        if self._repeat is not None and self._repeat(frame):
            self._repeat = None
            super()._handle_raw(raw)
        for lose in self._lose:
            if lose(frame):
                self._lose.remove(lose)
                return
        if self._delay is not None and self._delay(frame):
            self._delay = None
            self._delayed.append(raw)
            return
        super()._handle_raw(raw)
        while self._delayed:
            super()._handle_raw(self._delayed.pop(0))

    async def _write(self, conn: Any, frame: Frame) -> None:
        self.sent.append(str(frame.get("event")))
        await super()._write(conn, frame)


def seq_is(seq: int) -> Callable[[Frame], bool]:
    def matches(frame: Frame) -> bool:
        data = frame.get("data")
        message = data.get("message") if isinstance(data, dict) else None
        return (
            frame.get("event") == "message:new"
            and isinstance(message, dict)
            and message.get("seq") == seq
        )

    return matches


async def _room_with_lossy_member(gateway: Gateway, **kw: Any) -> tuple[Client, LossyClient]:
    alice = await gateway.connect("alice")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    await alice.emit("room:join", {"roomId": "general"})
    bob = LossyClient(gateway.url(), gateway.token("bob"), **kw)
    gateway.clients.append(bob)
    await bob.connect()
    await bob.emit("room:join", {"roomId": "general"})
    return alice, bob


async def _received(client: Client, count: int) -> list[tuple[int, bool]]:
    """``(seq, recovered)`` of the next ``count`` message:new frames."""
    out = []
    for _ in range(count):
        frame = await client.next_event("message:new", timeout=5)
        out.append((frame["data"]["message"]["seq"], bool(frame.get("recovered"))))
    return out


async def test_a_lost_message_is_fetched_and_delivered_in_order_once(gateway):
    alice, bob = await _room_with_lossy_member(gateway, hole_wait=0.1)
    bob.lose_next(seq_is(2))
    for text in ("one", "two", "three"):
        await alice.emit("message:send", {"roomId": "general", "content": text})
    # 3 waits behind the hole until 2 is fetched from history.
    assert await _received(bob, 3) == [(1, False), (2, True), (3, False)]
    assert bob.sent.count("room:get_messages") == 1
    await alice.emit("message:send", {"roomId": "general", "content": "four"})
    assert await _received(bob, 1) == [(4, False)]
    await assert_no_event(bob, "message:new")
    assert bob.contiguous_seq("general") == bob.last_seq("general") == 4


async def test_several_holes_are_fetched_together(gateway):
    # As while one node's broadcasts are lost: every other message is missing.
    alice, bob = await _room_with_lossy_member(gateway, hole_wait=0.1)
    bob.lose_next(seq_is(2), seq_is(4))
    for i in range(5):
        await alice.emit("message:send", {"roomId": "general", "content": f"m{i}"})
    assert await _received(bob, 5) == [(1, False), (2, True), (3, False), (4, True), (5, False)]
    assert bob.sent.count("room:get_messages") == 1
    await assert_no_event(bob, "message:new")


async def test_a_message_on_the_wire_twice_is_delivered_once(gateway):
    alice, bob = await _room_with_lossy_member(gateway)
    bob.repeat_next(seq_is(1))
    for text in ("one", "two"):
        await alice.emit("message:send", {"roomId": "general", "content": text})
    assert await _received(bob, 2) == [(1, False), (2, False)]
    await assert_no_event(bob, "message:new")
    assert bob.duplicates_dropped == 1


async def test_a_gap_that_closes_by_itself_costs_no_fetch(gateway):
    # A fetch would only start after a minute: whatever bob gets, the link gave it.
    alice, bob = await _room_with_lossy_member(gateway, hole_wait=60.0)
    bob.delay_next(seq_is(2))  # 2 arrives after 3, as when two nodes' broadcasts cross
    for text in ("one", "two", "three"):
        await alice.emit("message:send", {"roomId": "general", "content": text})
    assert await _received(bob, 3) == [(1, False), (2, False), (3, False)]
    await assert_no_event(bob, "message:new")
    assert "room:get_messages" not in bob.sent
    assert bob.contiguous_seq("general") == 3


async def test_a_reconnect_recovers_from_the_contiguous_seq(gateway):
    alice, bob = await _room_with_lossy_member(
        gateway, hole_wait=60.0, reconnect=True, max_backoff=0.2
    )
    bob.lose_next(seq_is(2))
    for text in ("one", "two", "three"):
        await alice.emit("message:send", {"roomId": "general", "content": text})
    assert await _received(bob, 1) == [(1, False)]
    await assert_no_event(bob, "message:new")  # 3 is held behind the hole
    assert bob.contiguous_seq("general") == 1

    # The connection drops with 3 held: the re-join asks from 1, not 3.
    gateway.node.hub.connections[bob.welcome["connectionId"]].close_with(1012, "restart")
    await bob.next_event("client:reconnected", timeout=10)
    assert await _received(bob, 2) == [(2, True), (3, True)]
    await alice.emit("message:send", {"roomId": "general", "content": "four"})
    assert await _received(bob, 1) == [(4, False)]
    await assert_no_event(bob, "message:new")
    assert "room:get_messages" not in bob.sent
