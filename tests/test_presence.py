"""Typing indicators, presence and connection lifecycle on ``/ws/chat``, end to end.

Real gateway nodes, real clients. Two tests drive a hand-made WebSocket
client over raw TCP (:class:`RawWebSocket`): one that stops reading (a slow
consumer) and one that stops answering pings (a dead peer), which the
library client cannot be made to do.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from models import chat as chat_db
from server.realtime.presence import Presence
from switchboard_client import Client, ClientError
from tests.support.client_checks import assert_no_event, background_done, barrier, settle
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- helpers ------------------------------------------------------------------


async def make_room(owner: Client, room_id: str, **fields: Any) -> None:
    await owner.emit("room:create", {"roomId": room_id, "name": room_id, **fields})
    await owner.emit("room:join", {"roomId": room_id})


async def join(client: Client, room_id: str) -> dict[str, Any]:
    return await client.emit("room:join", {"roomId": room_id})


async def fails(client: Client, event: str, data: dict[str, Any], code: str) -> ClientError:
    with pytest.raises(ClientError) as info:
        await client.emit(event, data)
    assert info.value.code == code, info.value
    return info.value


def status_of(user_id: str, status: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def match(frame: dict[str, Any]) -> bool:
        data = frame["data"]
        return data.get("userId") == user_id and (status is None or data.get("status") == status)

    return match


def statuses(members: list[dict[str, Any]]) -> dict[str, str]:
    return {m["userId"]: m["status"] for m in members}


#: ~4 KB messages: an outbound budget fills in a few dozen of them.
FLOOD_CONTENT = "x" * 3990


async def flood_until(
    publisher: Client, room: str, done: Callable[[], bool], *, limit: int = 900
) -> int:
    """Send messages to ``room`` in acked batches of 10 until ``done()``; how many were sent."""
    sent = 0
    while not done():
        assert sent < limit, "the flood never ended"
        batch = [
            publisher.emit(
                "message:send", {"roomId": room, "content": f"{sent + i} {FLOOD_CONTENT}"}
            )
            for i in range(10)
        ]
        await asyncio.gather(*batch)
        sent += 10
    return sent


def assert_hub_empty(gw: Any) -> None:
    hub = gw.node.hub
    assert hub.connections == {}
    for name in ("_by_room", "_by_user", "_by_namespace", "_rooms_of", "_pending", "_floors",
                 "_floor_top", "_members"):
        assert getattr(hub, name) == {}, (name, getattr(hub, name))


async def assert_nothing_left(gw: Any) -> None:
    """After every client is gone: no connection, timer, task, presence or slot remains."""
    node = gw.node
    await eventually(lambda: not node.hub.connections and len(node.tasks) == 0,
                     what="connections closed and clean-up tasks finished")  # fmt: skip
    assert_hub_empty(gw)
    assert len(node.typing) == 0
    assert len(node.tasks) == 0
    assert await node.presence.online_users() == []
    # Every route is given the node's one Deps, so its admission's limiter is the one.
    limiter = node.deps.admission.limiter
    assert limiter is node.connection_limiter
    assert limiter._users == {} and limiter._ips == {}  # every slot given back


def sample(gw: Any, name: str, **labels: str) -> float:
    value = gw.node.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


class RawWebSocket:
    """A bare RFC 6455 client over asyncio streams, handshake done by hand.

    It reads only when asked to and never answers pings, so it can play a
    stalled or dead peer. ``rcvbuf`` shrinks the kernel receive buffer and
    the stream reader pauses at 8 KiB, so little slack hides a stall.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.welcome: dict[str, Any] = {}
        self._ack = 0

    @classmethod
    async def open(cls, gw: Any, user: str, *, rcvbuf: int | None = None) -> RawWebSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET /ws/chat?token={gw.token(user)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{gw.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        writer.write(request.encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines[0]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept
        ws = cls(reader, writer)
        welcome = await ws.recv_json()
        assert welcome["event"] == "system:welcome", welcome
        ws.welcome = welcome["data"]
        return ws

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n <= 0xFFFF:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    def send_json(self, event: str, data: dict[str, Any], *, ack: bool = True) -> int | None:
        frame: dict[str, Any] = {"event": event, "data": data}
        if ack:
            self._ack += 1
            frame["ack"] = self._ack
        self.send_frame(0x1, orjson.dumps(frame))
        return frame.get("ack")

    async def recv_frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        assert not b1 & 0x80, "server frames are unmasked"
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def recv_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text frame (pings are read and ignored: never answered)."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.recv_frame()
                if opcode == 0x1:
                    frame: dict[str, Any] = orjson.loads(payload)
                    return frame
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if payload else None
                    raise ConnectionError(f"closed by server: {code}")

    async def request(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        ack = self.send_json(event, data)
        while True:
            frame = await self.recv_json()
            if frame.get("ack") == ack:
                assert frame["ok"], frame
                result: dict[str, Any] = frame["data"]
                return result

    async def read_until_closed(self, timeout: float = 5.0) -> int | None:
        """Read (and discard) everything up to EOF; the close code, if a close frame came."""
        code = None
        async with asyncio.timeout(timeout):
            while True:
                try:
                    opcode, payload = await self.recv_frame()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return code
                if opcode == 0x8 and len(payload) >= 2:
                    code = struct.unpack("!H", payload[:2])[0]

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake (RST)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


# -- typing --------------------------------------------------------------------


async def test_typing_start_and_stop_reach_the_others_only(gateway):
    alice, bob, carol, dave = [await gateway.connect(u) for u in ("alice", "bob", "carol", "dave")]
    await make_room(alice, "general")
    await join(bob, "general")
    await join(carol, "general")
    await settle(alice, bob, carol, dave)  # dave is not in the room

    assert await bob.emit("typing:start", {"roomId": "general"}) == {"roomId": "general"}
    for other in (alice, carol):
        ev = await other.next_event("user:typing")
        assert ev["data"] == {"roomId": "general", "userId": "bob", "username": "bob",
                              "displayName": "bob"}  # fmt: skip
    # Repeating typing:start while typing does not repeat the event.
    await bob.emit("typing:start", {"roomId": "general"})
    await assert_no_event(alice, "user:typing")

    await bob.emit("typing:stop", {"roomId": "general"})
    for other in (alice, carol):
        ev = await other.next_event("user:stopped_typing")
        assert ev["data"]["roomId"] == "general" and ev["data"]["userId"] == "bob"
    # A second stop is a no-op: nothing more goes out.
    await bob.emit("typing:stop", {"roomId": "general"})
    await assert_no_event(alice, "user:stopped_typing")
    await assert_no_event(bob, "user:typing")
    await assert_no_event(bob, "user:stopped_typing")
    await assert_no_event(dave, "user:typing")
    await assert_no_event(dave, "user:stopped_typing")
    assert len(gateway.node.typing) == 0


async def test_typing_stops_by_itself_after_three_seconds(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await make_room(alice, "general")
    await join(bob, "general")
    await settle(alice, bob)
    loop = asyncio.get_running_loop()
    await bob.emit("typing:start", {"roomId": "general"})
    started = loop.time()
    await alice.next_event("user:typing")
    assert len(gateway.node.typing) == 1
    ev = await alice.next_event("user:stopped_typing", timeout=6)
    elapsed = loop.time() - started
    assert ev["data"]["userId"] == "bob" and ev["data"]["roomId"] == "general"
    assert 2.5 <= elapsed <= 4.5, elapsed
    assert len(gateway.node.typing) == 0
    # "Others get user:stopped_typing": the typist does not, auto-stop included.
    await assert_no_event(bob, "user:stopped_typing")


async def test_sending_a_message_stops_typing(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await make_room(alice, "general")
    await join(bob, "general")
    await settle(alice, bob)
    await bob.emit("typing:start", {"roomId": "general"})
    await alice.next_event("user:typing")
    await bob.emit("message:send", {"roomId": "general", "content": "done"})
    # Stopped before the message shows up, so the indicator never outlives it.
    first = await alice.next_event(predicate=lambda f: f["event"] in
                                   ("user:stopped_typing", "message:new"))  # fmt: skip
    assert first["event"] == "user:stopped_typing" and first["data"]["userId"] == "bob"
    await alice.next_event("message:new")
    assert len(gateway.node.typing) == 0
    await assert_no_event(bob, "user:stopped_typing")
    # A message without typing first sends no stop.
    await bob.emit("message:send", {"roomId": "general", "content": "again"})
    await alice.next_event("message:new")
    await assert_no_event(alice, "user:stopped_typing")


async def test_typing_requires_having_joined(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await make_room(alice, "general")
    await settle(alice)
    for event in ("typing:start", "typing:stop"):
        exc = await fails(bob, event, {"roomId": "general"}, "NOT_IN_ROOM")
        assert exc.details.get("roomId") == "general"
        await fails(bob, event, {"roomId": "nowhere"}, "NOT_IN_ROOM")
    # Without an ack the error comes as system:error naming the event.
    await bob.send("typing:start", {"roomId": "general"})
    err = await bob.next_event("system:error")
    assert err["data"]["code"] == "NOT_IN_ROOM" and err["data"]["event"] == "typing:start"
    await assert_no_event(alice, "user:typing")
    assert len(gateway.node.typing) == 0
    # Bad room ids are validation errors, not NOT_IN_ROOM.
    exc = await fails(bob, "typing:start", {}, "VALIDATION_ERROR")
    assert "roomId" in exc.details


async def test_leaving_or_disconnecting_stops_typing(gateway):
    alice, bob, carol = [await gateway.connect(u) for u in ("alice", "bob", "carol")]
    await make_room(alice, "general")
    await join(bob, "general")
    await join(carol, "general")
    await settle(alice, bob, carol)
    loop = asyncio.get_running_loop()

    await bob.emit("typing:start", {"roomId": "general"})
    await alice.next_event("user:typing")
    started = loop.time()
    await bob.emit("room:leave", {"roomId": "general"})
    ev = await alice.next_event("user:stopped_typing")
    assert ev["data"]["userId"] == "bob" and loop.time() - started < 1.0
    assert len(gateway.node.typing) == 0

    await carol.emit("typing:start", {"roomId": "general"})
    await alice.next_event("user:typing")
    started = loop.time()
    await carol.aclose()
    ev = await alice.next_event("user:stopped_typing")
    assert ev["data"]["userId"] == "carol" and loop.time() - started < 1.0
    left = await alice.next_event(
        "room:user_left", predicate=lambda f: f["data"].get("reason") == "disconnect"
    )
    assert left["data"]["user"]["userId"] == "carol"
    await eventually(lambda: len(gateway.node.typing) == 0)


# -- presence ------------------------------------------------------------------------


async def test_online_on_first_connection_offline_after_the_last(gateway):
    alice = await gateway.connect("alice")
    await make_room(alice, "general", members=["bob"])
    carol = await gateway.connect("carol")  # shares no room with bob
    await settle(alice, carol)

    bob1 = await gateway.connect("bob")
    ev = await alice.next_event("user:status_changed")
    assert ev["data"] == {"userId": "bob", "status": "online"}
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert statuses(members)["bob"] == "online"

    # A second device is not news.
    bob2 = await gateway.connect("bob")
    await assert_no_event(alice, "user:status_changed")
    # Closing one of two devices is not news either.
    await bob1.aclose()
    await background_done(gateway.node, bob1)
    await assert_no_event(alice, "user:status_changed")
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert statuses(members)["bob"] == "online"
    # The last one is.
    await bob2.aclose()
    ev = await alice.next_event("user:status_changed")
    assert ev["data"] == {"userId": "bob", "status": "offline"}
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert statuses(members) == {"alice": "online", "bob": "offline"}
    await assert_no_event(carol, "user:status_changed")
    await assert_no_event(alice, "user:status_changed")


async def test_presence_reaches_rooms_joined_on_another_device(gateway):
    """Presence is the user's, not a connection's: rooms joined on any device count."""
    alice = await gateway.connect("alice")
    await make_room(alice, "general")
    # Bob and carol are members of nothing when their first devices connect.
    bob_phone, carol_phone = await gateway.connect("bob"), await gateway.connect("carol")
    bob_laptop, carol_laptop = await gateway.connect("bob"), await gateway.connect("carol")
    await join(bob_laptop, "general")
    await join(carol_laptop, "general")
    await settle(alice)
    for laptop in (bob_laptop, carol_laptop):
        await laptop.aclose()
        left = await alice.next_event("room:user_left")
        assert left["data"]["reason"] == "disconnect"
    await background_done(gateway.node, bob_laptop, carol_laptop)
    await assert_no_event(alice, "user:status_changed")  # the phones are still on

    # The last device going away is news in every room the user is in.
    await bob_phone.aclose()
    ev = await alice.next_event("user:status_changed")
    assert ev["data"] == {"userId": "bob", "status": "offline"}
    # So is a status change from a device that never joined the room itself.
    await carol_phone.emit("user:status_update", {"status": "away"})
    ev = await alice.next_event("user:status_changed")
    assert ev["data"] == {"userId": "carol", "status": "away"}
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert statuses(members) == {"alice": "online", "bob": "offline", "carol": "away"}


async def test_status_update_reaches_users_sharing_a_room(gateway):
    alice, bob, carol = [await gateway.connect(u) for u in ("alice", "bob", "carol")]
    await make_room(alice, "general")
    await join(bob, "general")
    await settle(alice, bob, carol)

    for status in ("away", "busy", "online"):
        assert await bob.emit("user:status_update", {"status": status}) == {"status": status}
        ev = await alice.next_event("user:status_changed")
        assert ev["data"] == {"userId": "bob", "status": status}
    await assert_no_event(carol, "user:status_changed")

    for bad in ("offline", "invisible", "", None, 3):
        exc = await fails(bob, "user:status_update", {"status": bad}, "VALIDATION_ERROR")
        assert "status" in exc.details, exc.details
    exc = await fails(bob, "user:status_update", {}, "VALIDATION_ERROR")
    assert "status" in exc.details
    await assert_no_event(alice, "user:status_changed")


async def test_room_members_show_each_status(gateway):
    alice, bob, carol = [await gateway.connect(u) for u in ("alice", "bob", "carol")]
    await make_room(alice, "general", members=["erin"])
    await join(bob, "general")
    await join(carol, "general")
    await bob.emit("user:status_update", {"status": "away"})
    await carol.emit("user:status_update", {"status": "busy"})
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert statuses(members) == {"alice": "online", "bob": "away", "carol": "busy",
                                 "erin": "offline"}  # fmt: skip
    # Status belongs to the user: a second device keeps it and announces nothing.
    await settle(alice)
    bob2 = await gateway.connect("bob")
    await assert_no_event(alice, "user:status_changed")
    joined = await join(bob2, "general")
    assert statuses(joined["members"])["bob"] == "away"
    # Once fully offline the status is forgotten: back online next time.
    await bob.aclose()
    await bob2.aclose()
    await alice.next_event("user:status_changed", predicate=status_of("bob", "offline"))
    bob = await gateway.connect("bob")
    ev = await alice.next_event("user:status_changed", predicate=status_of("bob"))
    assert ev["data"]["status"] == "online"
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert statuses(members)["bob"] == "online"


async def test_disconnect_sends_user_left_to_each_room(gateway):
    alice, bob, carol = [await gateway.connect(u) for u in ("alice", "bob", "carol")]
    await make_room(alice, "general")
    await make_room(carol, "random")
    for room_id in ("general", "random"):
        await join(bob, room_id)
    await settle(alice, carol)
    await bob.aclose()
    await background_done(gateway.node, bob)
    for client, room_id in ((alice, "general"), (carol, "random")):
        ev = await client.next_event("room:user_left")
        assert ev["data"] == {
            "roomId": room_id,
            "user": {"userId": "bob", "username": "bob", "displayName": "bob"},
            "reason": "disconnect",
        }
        await assert_no_event(client, "room:user_left")
    assert gateway.node.hub.active_rooms() == {"general": 1, "random": 1}


# -- slow consumers, dead peers, leaks ------------------------------------------------


async def test_slow_consumer_is_dropped_while_others_keep_going(gateway_factory):
    gw = await gateway_factory(max_outbound_bytes=64 * 1024)
    publisher, reader = await gw.connect("alice"), await gw.connect("bob")
    await make_room(publisher, "flood")
    await join(reader, "flood")
    slow = await RawWebSocket.open(gw, "sam", rcvbuf=4096)
    await slow.request("room:join", {"roomId": "flood"})
    slow_id = slow.welcome["connectionId"]
    assert slow_id in gw.node.hub.connections
    await settle(publisher, reader)
    before = sample(gw, "switchboard_slow_consumers_total")
    # ... and from now on sam reads nothing.

    # Until the budget trips; the socket is dropped after the close grace.
    sent = await flood_until(
        publisher, "flood", lambda: sample(gw, "switchboard_slow_consumers_total") > before,
        limit=2000,
    )  # fmt: skip
    await eventually(lambda: slow_id not in gw.node.hub.connections, timeout=5,
                     what="the slow consumer dropped")  # fmt: skip
    assert sample(gw, "switchboard_slow_consumers_total") == before + 1
    closed = sample(gw, "switchboard_connections_closed_total",
                    namespace="chat", reason="slow_consumer")  # fmt: skip
    assert closed == 1

    # The publisher and the reader did not notice.
    for i in range(5):
        await publisher.emit("message:send", {"roomId": "flood", "content": f"after {i}"})
        sent += 1
    got: list[int] = []
    while len(got) < sent:
        frame = await reader.next_event("message:new")
        got.append(frame["data"]["message"]["seq"])
    assert got == list(range(1, sent + 1))
    assert publisher.connected and reader.connected
    left = await reader.next_event("room:user_left")
    assert left["data"]["user"]["userId"] == "sam" and left["data"]["reason"] == "disconnect"

    # The stalled socket was cut: what it finally reads ends in EOF.
    code = await slow.read_until_closed(timeout=10)
    assert code in (None, 4408)
    await slow.close()
    await publisher.aclose()
    await reader.aclose()
    await assert_nothing_left(gw)


async def test_silent_peer_is_closed_4408_and_cleaned_up(gateway_factory):
    gw = await gateway_factory(heartbeat_interval=0.3)
    alice = await gw.connect("alice")  # the library client answers pings
    await make_room(alice, "general")
    dead = await RawWebSocket.open(gw, "zed")
    await dead.request("room:join", {"roomId": "general"})
    dead.send_json("typing:start", {"roomId": "general"}, ack=False)
    await alice.next_event("user:typing", predicate=status_of("zed"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    # zed now never answers a ping (it reads them, but sends no pong).
    code = await dead.read_until_closed(timeout=5)
    assert code == 4408
    elapsed = loop.time() - started
    assert elapsed < 2.0, elapsed  # well before typing would auto-stop (3 s)
    ev = await alice.next_event("user:stopped_typing")
    assert ev["data"]["userId"] == "zed"
    ev = await alice.next_event("room:user_left")
    assert ev["data"]["user"]["userId"] == "zed" and ev["data"]["reason"] == "disconnect"
    await alice.next_event("user:status_changed", predicate=status_of("zed", "offline"))
    assert alice.connected
    closed = sample(gw, "switchboard_connections_closed_total",
                    namespace="chat", reason="heartbeat_timeout")  # fmt: skip
    assert closed == 1
    await dead.close()
    await alice.aclose()
    await assert_nothing_left(gw)


async def test_nothing_leaks_after_disconnects(gateway):
    clients = [await gateway.connect(u) for u in ("alice", "bob", "bob", "carol", "dave")]
    alice, bob1, bob2, carol, dave = clients
    await make_room(alice, "general")
    await make_room(carol, "random")
    for client in (bob1, bob2, dave):
        await join(client, "general")
    await join(bob2, "random")
    await join(dave, "random")
    for client, room_id in ((bob1, "general"), (bob2, "random"), (dave, "general")):
        await client.emit("typing:start", {"roomId": room_id})
    assert len(gateway.node.typing) == 3
    await dave.emit("room:leave", {"roomId": "random"})
    await alice.emit("message:send", {"roomId": "general", "content": "bye"})
    await asyncio.gather(*(c.aclose() for c in clients))
    await assert_nothing_left(gateway)


async def test_join_racing_a_dropped_connection_leaks_nothing(gateway, monkeypatch):
    """The peer vanishes while its room:join is waiting for the database."""
    alice = await gateway.connect("alice")
    await make_room(alice, "general")
    await settle(alice)
    entered, release = threading.Event(), threading.Event()
    real_access = chat_db.room_access

    def held_access(*args: Any) -> Any:
        entered.set()
        release.wait(5)  # a worker thread, not the loop: a slow database
        return real_access(*args)

    monkeypatch.setattr(chat_db, "room_access", held_access)
    raw = await RawWebSocket.open(gateway, "racer")
    raw.send_json("room:join", {"roomId": "general"})
    assert await asyncio.to_thread(entered.wait, 5)
    raw.abort()
    # Kept real-time pause: nothing on the node observes the reset before the
    # join returns (tornado reads the socket again only after on_message), so
    # no event can mark "the reset is there"; this keeps the race's order.
    await asyncio.sleep(0.1)
    release.set()
    monkeypatch.undo()
    node = gateway.node
    await eventually(lambda: len(node.hub.connections) == 1 and len(node.tasks) == 0,
                     what="racer removed and cleaned up")  # fmt: skip
    assert gateway.node.hub.active_rooms() == {"general": 1}
    # Whatever the racer got to, the room heard a consistent story.
    await barrier(alice)
    racer = [f["event"] for f in alice.drain_events() if f["event"].startswith("room:user_")
             and f["data"]["user"]["userId"] == "racer"]  # fmt: skip
    assert racer in ([], ["room:user_joined", "room:user_left"]), racer
    await alice.aclose()
    await assert_nothing_left(gateway)


# -- the Presence interface on a single node --------------------------------------------


async def test_single_node_presence_answers_the_cluster_questions_with_its_own_node():
    """admin:online_users and admin:stats ask every presence per node; one node answers
    with itself (the Redis version is covered in tests/test_cluster_state.py)."""
    presence = Presence("node-a")
    for user_id in ("alice", "alice", "bob"):
        await presence.connect(user_id)
    assert await presence.connections_by_node(["alice", "bob", "carol"]) == {
        "alice": {"node-a": 2}, "bob": {"node-a": 1}, "carol": {},
    }  # fmt: skip
    assert await presence.user_connections("alice") == 2
    assert await presence.user_connections("carol") == 0
    assert await presence.nodes() == [{"id": "node-a", "self": True}]
    await presence.disconnect("bob")
    assert await presence.connections_by_node(["bob"]) == {"bob": {}}
    assert await presence.online_users() == ["alice"]
