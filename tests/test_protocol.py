"""The wire protocol as a client sees it: welcome, envelopes and their errors,
frame size, protocol abuse, origin checks, ``system:ping`` and heartbeats.

Real server on port 0, real clients (and one hand-rolled RFC 6455 client
that never answers pings); no mocks.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import os
import re
import struct
import time
from typing import Any

import orjson
import pytest

from switchboard_client import ClientError, ConnectionClosed, HandshakeError
from tests.support.client_checks import assert_no_event
from tests.support.waiting import eventually

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def parse_iso(value: str) -> dt.datetime:
    assert ISO_MS_Z.match(value), value
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


async def next_error(client: Any, timeout: float = 2.0) -> dict[str, Any]:
    frame = await client.next_event("system:error", timeout=timeout)
    data: dict[str, Any] = frame["data"]
    assert set(data) >= {"code", "message", "details", "event"}, data
    return data


class RawWebSocket:
    """A minimal RFC 6455 client over asyncio streams that never answers pings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str, token: str) -> RawWebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n"
            "\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        assert head.startswith("HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        assert accept in head, head
        return cls(reader, writer)

    async def read_frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        assert not b1 & 0x80, "server frames must not be masked"
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(length)

    async def read_json(self, timeout: float = 2.0) -> dict[str, Any]:
        """The next text frame, skipping (and not answering) pings."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.read_frame()
                if opcode == 0x1:
                    result: dict[str, Any] = orjson.loads(payload)
                    return result
                assert opcode == 0x9, f"unexpected opcode {opcode}"

    def send_json(self, obj: Any) -> None:
        payload = orjson.dumps(obj)
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n <= 0xFFFF:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    def abort(self) -> None:
        self.writer.transport.abort()


# -- welcome --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_welcome_fields(gateway):
    before = dt.datetime.now(dt.UTC)
    alice = await gateway.connect("alice")
    after = dt.datetime.now(dt.UTC)
    w = alice.welcome
    assert set(w) >= {
        "connectionId", "userId", "namespace", "node", "serverTime", "heartbeatInterval",
    }  # fmt: skip
    assert w["userId"] == "alice"
    assert w["namespace"] == "chat"
    assert w["node"] == "test-node"
    assert w["heartbeatInterval"] == 25_000  # milliseconds
    assert isinstance(w["connectionId"], str) and w["connectionId"]
    server_time = parse_iso(w["serverTime"])
    slack = dt.timedelta(milliseconds=5)
    assert before - slack <= server_time <= after + slack
    # Connection ids are per connection, even for the same user.
    again = await gateway.connect("alice")
    assert again.welcome["connectionId"] != w["connectionId"]
    assert set(gateway.node.hub.connections) == {w["connectionId"], again.welcome["connectionId"]}


@pytest.mark.asyncio
async def test_welcome_heartbeat_interval_follows_config(gateway_factory):
    gw = await gateway_factory(heartbeat_interval=7.5)
    client = await gw.connect("alice")
    assert client.welcome["heartbeatInterval"] == 7500


# -- envelope errors --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_non_json_frame(gateway):
    alice = await gateway.connect("alice")
    await alice.send_raw("{not json")
    error = await next_error(alice)
    assert error["code"] == "BAD_REQUEST"
    assert error["event"] is None
    assert isinstance(error["message"], str) and error["message"]
    # The connection survives one bad frame.
    assert "serverTime" in await alice.emit("system:ping", {})


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw",
    [
        "[1, 2, 3]",
        '"just a string"',
        "42",
        "null",
        '{"data": {}}',
        '{"event": "", "data": {}}',
        '{"event": 5, "data": {}}',
        '{"event": "system:ping", "data": []}',
        '{"event": "system:ping", "data": "x"}',
        '{"event": "system:ping", "ack": "7"}',
        '{"event": "system:ping", "ack": 1.5}',
        '{"event": "system:ping", "ack": true}',
    ],
)
async def test_bad_envelopes_without_usable_ack(gateway, raw):
    alice = await gateway.connect("alice")
    await alice.send_raw(raw)
    error = await next_error(alice)
    assert error["code"] == "BAD_REQUEST", raw
    await assert_no_event(alice, "system:error")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "frame",
    [
        {"ack": 41, "data": {}},
        {"ack": 41, "event": None},
        {"ack": 41, "event": ""},
        {"ack": 41, "event": "x" * 65},
        {"ack": 41, "event": "system:ping", "data": [1]},
    ],
)
async def test_bad_envelope_with_usable_ack_is_answered_as_ack(gateway, frame):
    alice = await gateway.connect("alice")
    await alice.send_raw(orjson.dumps(frame).decode())
    raw = await asyncio.wait_for(_read_ack(alice, 41), 2.0)
    assert raw["ok"] is False
    assert raw["error"]["code"] == "BAD_REQUEST"
    assert set(raw["error"]) == {"code", "message", "details"}
    # Exactly once: answered as the ack, not also as a system:error.
    await assert_no_event(alice, "system:error")


async def _read_ack(client: Any, ack_id: int) -> dict[str, Any]:
    """Wait for an ack frame with a hand-picked id (not one Client.emit issued)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[dict[str, Any]] = loop.create_future()
    client._pending[ack_id] = ("raw", future)
    try:
        await future
    except ClientError as exc:
        return {"ack": ack_id, "ok": False, "error": {
            "code": exc.code, "message": exc.message, "details": exc.details,
        }}  # fmt: skip
    finally:
        client._pending.pop(ack_id, None)
    return {"ack": ack_id, "ok": True, "data": future.result()}


@pytest.mark.asyncio
async def test_binary_frame_is_bad_request(gateway):
    alice = await gateway.connect("alice")
    await alice.send_raw(orjson.dumps({"event": "system:ping", "data": {}}), binary=True)
    error = await next_error(alice)
    assert error["code"] == "BAD_REQUEST"
    assert "serverTime" in await alice.emit("system:ping", {})


@pytest.mark.asyncio
async def test_unknown_event(gateway):
    alice = await gateway.connect("alice")
    with pytest.raises(ClientError) as info:
        await alice.emit("room:explode", {"roomId": "x"})
    assert info.value.code == "UNKNOWN_EVENT"
    # Without an ack: a system:error that names the event.
    await alice.send("room:explode", {})
    error = await next_error(alice)
    assert error["code"] == "UNKNOWN_EVENT"
    assert error["event"] == "room:explode"


@pytest.mark.asyncio
async def test_validation_error_details_use_camel_case_field_names(gateway):
    alice = await gateway.connect("alice")
    with pytest.raises(ClientError) as info:
        await alice.emit(
            "message:send",
            {"roomId": "not a valid id!", "content": "", "clientMsgId": "", "parentMessageId": "x"},
        )
    exc = info.value
    assert exc.code == "VALIDATION_ERROR"
    assert set(exc.details) == {"roomId", "content", "clientMsgId", "parentMessageId"}
    for messages in exc.details.values():
        assert isinstance(messages, list) and messages
        assert all(isinstance(m, str) and m for m in messages)
    # No snake_case leaks from the schema.
    assert not any("_" in key for key in exc.details)
    assert exc.details["roomId"] == ["Must match ^[A-Za-z0-9_-]{1,64}$."]


@pytest.mark.asyncio
async def test_validation_error_missing_required_fields(gateway):
    alice = await gateway.connect("alice")
    with pytest.raises(ClientError) as info:
        await alice.emit("room:read", {})
    assert info.value.code == "VALIDATION_ERROR"
    assert set(info.value.details) == {"roomId", "seq"}
    # Without an ack the error arrives as system:error naming the event.
    await alice.send("room:join", {"roomId": 12})
    error = await next_error(alice)
    assert error["code"] == "VALIDATION_ERROR"
    assert error["event"] == "room:join"
    assert list(error["details"]) == ["roomId"]


@pytest.mark.asyncio
async def test_validation_error_nested_fields(gateway):
    alice = await gateway.connect("alice")
    await alice.emit("room:create", {"roomId": "r1", "name": "R1"})
    await alice.emit("room:join", {"roomId": "r1"})
    with pytest.raises(ClientError) as info:
        await alice.emit(
            "message:send",
            {"roomId": "r1", "content": "hi", "attachments": ["https://ok.example/a", "nope"]},
        )
    assert info.value.code == "VALIDATION_ERROR"
    assert list(info.value.details) == ["attachments.1"]


# -- system:ping ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_system_ping(gateway):
    alice = await gateway.connect("alice")
    sent_ms = int(time.time() * 1000) - 250
    pong = await alice.emit("system:ping", {"t": sent_ms})
    parse_iso(pong["serverTime"])
    assert isinstance(pong["latencyMs"], int)
    assert 250 <= pong["latencyMs"] < 2000
    # Without t the latency is unknown, not an error.
    pong = await alice.emit("system:ping")
    assert pong["latencyMs"] is None
    parse_iso(pong["serverTime"])
    with pytest.raises(ClientError) as info:
        await alice.emit("system:ping", {"t": "soon"})
    assert info.value.code == "VALIDATION_ERROR"
    assert list(info.value.details) == ["t"]


@pytest.mark.asyncio
@pytest.mark.parametrize("t", [-1, -1e308, 1e20, 253402300800000])
async def test_system_ping_t_must_be_an_epoch_time_within_year_9999(gateway, t):
    # Regression (issue 12): t = -1e308 made latencyMs a 300-digit integer that
    # the JSON encoder refused, and the ping answered INTERNAL_ERROR.
    alice = await gateway.connect("alice")
    with pytest.raises(ClientError) as info:
        await alice.emit("system:ping", {"t": t})
    assert info.value.code == "VALIDATION_ERROR"
    assert list(info.value.details) == ["t"]
    pong = await alice.emit("system:ping", {"t": 0})
    assert pong["latencyMs"] >= int(time.time() * 1000) - 60_000


@pytest.mark.asyncio
@pytest.mark.parametrize("ack", [-1, 2**63, 2**64 - 1])
async def test_ack_must_be_an_integer_from_0_to_int64_max(gateway, ack):
    alice = await gateway.connect("alice")
    await alice.send_raw(orjson.dumps({"event": "system:ping", "data": {}, "ack": ack}).decode())
    error = await next_error(alice)
    assert (error["code"], error["details"]) == ("BAD_REQUEST", {"field": "ack"})
    assert "9223372036854775807" in error["message"]
    # The largest one is an ordinary ack.
    top = 2**63 - 1
    await alice.send_raw(orjson.dumps({"event": "system:ping", "data": {}, "ack": top}).decode())
    assert (await asyncio.wait_for(_read_ack(alice, top), 2.0))["ok"] is True


@pytest.mark.asyncio
async def test_deeply_nested_frames(gateway):
    alice = await gateway.connect("alice")
    # Past the JSON parser's 1024 levels: a bad frame, not an internal error.
    await alice.send_raw('{"event": "system:ping", "data": {"x": ' + "[" * 1100 + "]" * 1100 + "}}")
    assert (await next_error(alice))["code"] == "BAD_REQUEST"
    # Within it, nesting in fields the event ignores costs nothing.
    deep = "[" * 1000 + "]" * 1000
    await alice.send_raw('{"event": "system:ping", "data": {"x": ' + deep + '}, "ack": 5}')
    assert (await asyncio.wait_for(_read_ack(alice, 5), 2.0))["ok"] is True


@pytest.mark.asyncio
async def test_bad_frames_past_the_limit_log_one_warning(gateway, caplog):
    mallory = await gateway.connect("mallory")
    # All 30 written before the server reads one: it handles a frame in the
    # iteration it reads it, and its close (after the 20th) would otherwise
    # stop this in-process client before the frames past the limit went out.
    await asyncio.gather(*(mallory.send_raw("garbage") for _ in range(30)))
    code, _ = await mallory.wait_closed(timeout=2)
    assert code == 4400
    closing = [r for r in caplog.records if "repeated bad frames" in r.getMessage()]
    assert len(closing) == 1, [r.getMessage() for r in closing]


# -- frame size and abuse ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_oversized_frame_closes_with_1009(gateway_factory):
    gw = await gateway_factory(max_message_bytes=1024)
    alice = await gw.connect("alice")
    bob = await gw.connect("bob")
    bob_id = bob.welcome["connectionId"]

    # Exactly at the limit is fine (unknown data fields are ignored).
    frame = {"event": "system:ping", "data": {"pad": ""}, "ack": 999}
    pad = 1024 - len(orjson.dumps(frame))
    frame["data"]["pad"] = "x" * pad
    raw = orjson.dumps(frame).decode()
    assert len(raw.encode()) == 1024
    await bob.send_raw(raw)
    assert (await asyncio.wait_for(_read_ack(bob, 999), 2.0))["ok"] is True

    # One byte over closes the connection with 1009.
    frame["data"]["pad"] += "x"
    await bob.send_raw(orjson.dumps(frame).decode())
    code, _ = await bob.wait_closed(timeout=2)
    assert code == 1009
    await eventually(lambda: bob_id not in gw.node.hub.connections, what="bob's connection gone")

    # Everyone else keeps working.
    assert "serverTime" in await alice.emit("system:ping", {})


@pytest.mark.asyncio
async def test_much_larger_frame_also_closes_with_1009(gateway_factory):
    gw = await gateway_factory(max_message_bytes=1024)
    alice = await gw.connect("alice")
    bob = await gw.connect("bob")
    big = orjson.dumps({"event": "system:ping", "data": {"pad": "x" * 300_000}}).decode()
    with pytest.raises(ConnectionClosed):
        await bob.send_raw(big)
        await bob.emit("system:ping", {}, timeout=2)
    code, _ = await bob.wait_closed(timeout=2)
    assert code == 1009
    assert "serverTime" in await alice.emit("system:ping", {})


@pytest.mark.asyncio
async def test_repeated_bad_frames_close_with_4400(gateway):
    mallory = await gateway.connect("mallory")
    bob = await gateway.connect("bob")
    for _ in range(19):
        await mallory.send_raw("garbage")
    for _ in range(19):
        assert (await next_error(mallory))["code"] == "BAD_REQUEST"
    assert "serverTime" in await mallory.emit("system:ping", {})  # still open after 19

    await mallory.send("no:such_event", {})  # unknown events count as bad frames too
    error = await next_error(mallory)
    assert error["code"] == "UNKNOWN_EVENT"
    code, _ = await mallory.wait_closed(timeout=2)
    assert code == 4400

    # Another user's connection is unaffected.
    assert bob.connected and bob.close_code is None
    assert "serverTime" in await bob.emit("system:ping", {})
    await assert_no_event(bob, "system:error")


@pytest.mark.asyncio
async def test_validation_errors_are_not_protocol_abuse(gateway):
    alice = await gateway.connect("alice")
    for _ in range(25):
        with pytest.raises(ClientError) as info:
            await alice.emit("room:read", {"roomId": "r", "seq": -1})
        assert info.value.code == "VALIDATION_ERROR"
    assert "serverTime" in await alice.emit("system:ping", {})


# -- origin ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_origin_allow_list(gateway_factory):
    gw = await gateway_factory(allowed_origins="https://good.example")
    evil = gw.client("alice", origin="https://evil.example")
    with pytest.raises(HandshakeError) as info:
        await evil.connect()
    assert info.value.status == 403
    assert gw.node.hub.connections == {}

    good = gw.client("alice", origin="https://good.example")
    assert (await good.connect())["userId"] == "alice"
    # Non-browser clients send no Origin at all and are not refused for it.
    service = gw.client("svc")
    assert (await service.connect())["userId"] == "svc"


@pytest.mark.asyncio
async def test_wildcard_origin_accepts_any(gateway):
    client = gateway.client("alice", origin="https://anything.example")
    assert (await client.connect())["userId"] == "alice"


# -- heartbeat ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_silent_connection_closed_and_cleaned_up(gateway_factory):
    gw = await gateway_factory(heartbeat_interval=0.2)
    alice = await gw.connect("alice")
    await alice.emit("room:create", {"roomId": "lobby", "name": "Lobby"})
    await alice.emit("room:join", {"roomId": "lobby"})

    ghost = await RawWebSocket.open(gw.port, "/ws/chat", gw.token("ghost"))
    try:
        welcome = await ghost.read_json()
        assert welcome["event"] == "system:welcome"
        ghost_conn = welcome["data"]["connectionId"]
        ghost.send_json({"event": "room:join", "data": {"roomId": "lobby"}, "ack": 1})
        while (reply := await ghost.read_json()).get("ack") != 1:
            pass
        assert reply["ok"] is True
        await alice.next_event("room:user_joined", predicate=_about("ghost"))
        assert ghost_conn in gw.node.hub.connections
        silent_since = time.monotonic()

        # The ghost never answers pings: the server closes it with 4408...
        close_code = None
        pings = 0
        async with asyncio.timeout(3):
            while True:
                opcode, payload = await ghost.read_frame()
                if opcode == 0x9:
                    pings += 1
                elif opcode == 0x8:
                    close_code = struct.unpack("!H", payload[:2])[0]
                    break
        closed_after = time.monotonic() - silent_since
        assert close_code == 4408
        assert pings >= 1
        assert closed_after < 1.5

        # ...and releases what it held, without waiting for a close reply
        # a dead peer will never send.
        left = await alice.next_event("room:user_left", timeout=1.0, predicate=_about("ghost"))
        assert left["data"]["roomId"] == "lobby"
        status = await alice.next_event(
            "user:status_changed", timeout=1.0,
            predicate=lambda f: f["data"]["userId"] == "ghost",
        )  # fmt: skip
        assert status["data"]["status"] == "offline"
        assert ghost_conn not in gw.node.hub.connections
        assert "ghost" not in await gw.node.presence.online_users()
        members = await alice.emit("room:members", {"roomId": "lobby"})
        statuses = {m["userId"]: m["status"] for m in members["members"]}
        assert statuses["ghost"] == "offline"
    finally:
        ghost.abort()


def _about(user_id: str) -> Any:
    return lambda f: f["data"]["user"]["userId"] == user_id


@pytest.mark.asyncio
async def test_ponging_client_stays_connected(gateway_factory):
    gw = await gateway_factory(heartbeat_interval=0.2)
    alice = await gw.connect("alice")
    assert alice.welcome["heartbeatInterval"] == 200
    # Idle (no frames of its own) across several heartbeat intervals: a
    # real-clock wait, since the heartbeat is a timer and no event marks
    # "a heartbeat passed without a close".
    await asyncio.sleep(1.2)
    await assert_no_event(alice)
    assert alice.connected and alice.close_code is None
    assert alice.welcome["connectionId"] in gw.node.hub.connections
    assert "serverTime" in await alice.emit("system:ping", {})
