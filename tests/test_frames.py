"""The gateway's own frame reader (``handlers.base._DetachedReceive``), byte by byte.

A hand-rolled RFC 6455 client writes frames exactly as a test wants them:
several in one write, split anywhere (the test waits until the server has
read the first part before writing the rest), fragmented with a control
frame in between, or breaking a rule. The rules are tornado's, kept by the
reader: a broken one drops the connection (and only that one), a message
over the cap is closed with 1009, a close is echoed.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import orjson
import pytest
from tornado.util import _websocket_mask

from tests.support.waiting import eventually
from tests.test_protocol import RawWebSocket

FIN, TEXT, CONT, CLOSE, PING, PONG = 0x80, 0x1, 0x0, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame."""
    n = len(payload)
    first = (FIN if fin else 0) | rsv | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ping_event(ack: int, pad: int = 0) -> bytes:
    return orjson.dumps({"event": "system:ping", "data": {"pad": "x" * pad}, "ack": ack})


async def open_raw(gw: Any, user: str) -> tuple[RawWebSocket, Any]:
    """A raw connection past its welcome, and the server's protocol object for it."""
    ws = await RawWebSocket.open(gw.port, "/ws/chat", gw.token(user))
    welcome = await ws.read_json()
    assert welcome["event"] == "system:welcome", welcome
    handler = gw.node.hub.connections[welcome["data"]["connectionId"]]
    return ws, handler.ws_connection


async def read_ack(ws: RawWebSocket) -> dict[str, Any]:
    while True:
        message = await ws.read_json()
        if "ack" in message:
            return message


async def dropped(ws: RawWebSocket) -> None:
    """The server hung up: EOF, with no frame but pings before it."""
    async with asyncio.timeout(5):
        while True:
            try:
                opcode, _ = await ws.read_frame()
            except asyncio.IncompleteReadError:
                return
            assert opcode == PING, f"unexpected frame {opcode} before the drop"


def test_the_mask_helper_is_the_xor_of_rfc_6455() -> None:
    # The reader unmasks with tornado's C helper (tornado.util._websocket_mask):
    # a private name, so its contract is pinned here.
    mask, payload = b"\x01\x02\x03\x04", bytes(range(256)) * 3
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert _websocket_mask(mask, payload) == expected


@pytest.mark.asyncio
async def test_frames_written_together_are_each_answered_in_order(gateway) -> None:
    ws, _ = await open_raw(gateway, "alice")
    ws.writer.write(b"".join(frame(TEXT, ping_event(ack)) for ack in (1, 2, 3)))
    assert [(await read_ack(ws))["ack"] for _ in range(3)] == [1, 2, 3]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "cut",
    [1, 2, 3, 5, 9, 200],
    ids=["in-header", "before-length", "in-length", "in-mask", "before-payload", "in-payload"],
)
async def test_a_frame_cut_anywhere_is_read_whole(gateway, cut: int) -> None:
    ws, protocol = await open_raw(gateway, "alice")
    data = frame(TEXT, ping_event(7, pad=300))  # a 16-bit length: header, length, mask
    read_before = protocol._wire_bytes_in
    ws.writer.write(data[:cut])
    await eventually(lambda: protocol._wire_bytes_in >= read_before + cut, what="first part read")
    ws.writer.write(data[cut:])
    assert (await read_ack(ws))["ack"] == 7


@pytest.mark.asyncio
async def test_a_message_near_the_cap_arrives_over_several_reads(gateway_factory) -> None:
    gw = await gateway_factory(max_message_bytes=200_000)
    ws, protocol = await open_raw(gw, "alice")
    data = frame(TEXT, ping_event(8, pad=190_000))  # a 64-bit length, more than one read
    read_before = protocol._wire_bytes_in
    ws.writer.write(data[:1000])
    await eventually(lambda: protocol._wire_bytes_in >= read_before + 1000, what="first part")
    ws.writer.write(data[1000:])
    assert (await read_ack(ws))["ack"] == 8


@pytest.mark.asyncio
async def test_a_fragmented_message_with_a_ping_between_its_fragments(gateway) -> None:
    ws, _ = await open_raw(gateway, "alice")
    payload = ping_event(9, pad=50)
    ws.writer.write(
        frame(TEXT, payload[:20], fin=False)
        + frame(CONT, payload[20:40], fin=False)
        + frame(PING, b"between")
        + frame(CONT, payload[40:])
    )
    assert await ws.read_frame() == (PONG, b"between")
    assert (await read_ack(ws))["ack"] == 9


@pytest.mark.asyncio
async def test_a_thousand_pings_in_one_write_each_get_a_pong_and_others_are_served(
    gateway,
) -> None:
    ws, _ = await open_raw(gateway, "alice")
    bob = await gateway.connect("bob")
    ws.writer.write(frame(PING, b"p") * 1000)
    assert "serverTime" in await bob.emit("system:ping", {})
    for _ in range(1000):
        assert await ws.read_frame() == (PONG, b"p")
    ws.writer.write(frame(TEXT, ping_event(10)))
    assert (await read_ack(ws))["ack"] == 10


BROKEN = {
    "reserved-bit": frame(TEXT, ping_event(1), rsv=0x40),
    "long-control-frame": frame(PING, b"x" * 126),
    "fragmented-control-frame": frame(PING, b"x", fin=False),
    "continuation-of-nothing": frame(CONT, ping_event(1)),
    "new-message-inside-a-fragmented-one": frame(TEXT, b'{"ev', fin=False) + frame(TEXT, b"{}"),
    "invalid-utf-8": frame(TEXT, b'{"event":"\xff\xfe"}'),
    "unknown-opcode": frame(0x3, b"{}"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
async def test_a_broken_rule_drops_that_connection_only(gateway, data: bytes) -> None:
    ws, _ = await open_raw(gateway, "mallory")
    bob = await gateway.connect("bob")
    ws.writer.write(data)
    await dropped(ws)
    assert "serverTime" in await bob.emit("system:ping", {})


@pytest.mark.asyncio
async def test_fragments_adding_up_past_the_cap_close_with_1009(gateway_factory) -> None:
    gw = await gateway_factory(max_message_bytes=1024)
    ws, _ = await open_raw(gw, "alice")
    ws.writer.write(frame(TEXT, b"x" * 600, fin=False) + frame(CONT, b"x" * 600))
    async with asyncio.timeout(5):
        while (got := await ws.read_frame())[0] == PING:
            pass
    assert got[0] == CLOSE
    assert struct.unpack("!H", got[1][:2])[0] == 1009


@pytest.mark.asyncio
async def test_a_close_frame_is_echoed_with_its_code(gateway) -> None:
    ws, _ = await open_raw(gateway, "alice")
    ws.writer.write(frame(CLOSE, struct.pack("!H", 1000) + b"bye"))
    async with asyncio.timeout(5):
        while (got := await ws.read_frame())[0] == PING:
            pass
    assert got[0] == CLOSE
    assert struct.unpack("!H", got[1][:2])[0] == 1000
