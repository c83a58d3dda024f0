"""Outbound writes end to end (:mod:`server.realtime.outbound`): budget, slow consumers, heartbeat.

Real nodes, real clients; the stalled and slow peers are raw TCP WebSockets
(:class:`tests.test_presence.RawWebSocket`) that read only when told to.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import time
from typing import Any

import pytest
from tornado.iostream import IOStream

from server.realtime.outbound import Outbound, tcp_progress
from switchboard_client import Client
from tests.support.client_checks import settle
from tests.test_presence import RawWebSocket, flood_until, join, make_room, sample


async def read_all(reader: Client, count: int) -> list[int]:
    seqs: list[int] = []
    while len(seqs) < count:
        frame = await reader.next_event("message:new")
        seqs.append(frame["data"]["message"]["seq"])
    return seqs


def shrink_send_buffer(gw: Any, conn_id: str) -> None:
    """Keep the server's kernel from queueing megabytes for a peer (loopback autotuning).

    Otherwise a stalled peer takes hundreds of messages to reach the budget,
    which only counts what the kernel would not take.
    """
    handler = gw.node.hub.connections[conn_id]
    handler.ws_connection.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)


async def flood_room(gw: Any) -> tuple[Client, Client, RawWebSocket]:
    """alice (publisher) and bob (reader) in room ``flood``, and sam's raw socket joined too."""
    publisher, reader = await gw.connect("alice"), await gw.connect("bob")
    await make_room(publisher, "flood")
    await join(reader, "flood")
    raw = await RawWebSocket.open(gw, "sam", rcvbuf=4096)
    await raw.request("room:join", {"roomId": "flood"})
    shrink_send_buffer(gw, raw.welcome["connectionId"])
    return publisher, reader, raw


def closed_as(gw: Any, reason: str) -> float:
    return sample(gw, "switchboard_connections_closed_total", namespace="chat", reason=reason)


@pytest.mark.asyncio
async def test_a_slow_consumer_that_reads_again_sees_its_4408_close_frame(gateway_factory):
    gw = await gateway_factory(max_outbound_bytes=64 * 1024)
    publisher, reader, slow = await flood_room(gw)
    await settle(publisher, reader)
    before = sample(gw, "switchboard_slow_consumers_total")
    # sam reads nothing until the budget trips...
    sent = await flood_until(
        publisher, "flood", lambda: sample(gw, "switchboard_slow_consumers_total") > before
    )
    # ... then reads everything: the close frame is there, after what was queued.
    code = await slow.read_until_closed(timeout=10)
    assert code == 4408
    assert closed_as(gw, "slow_consumer") == 1
    # The others did not notice.
    await publisher.emit("message:send", {"roomId": "flood", "content": "after"})
    assert await read_all(reader, sent + 1) == list(range(1, sent + 2))
    assert publisher.connected and reader.connected
    await slow.close()


class SlowReader:
    """A raw peer that reads one frame per ``pause_secs`` and answers every ping it reads."""

    def __init__(self, ws: RawWebSocket, pause_secs: float) -> None:
        self.ws = ws
        self.pause_secs = pause_secs
        self.close: tuple[int, str] | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                opcode, payload = await self.ws.recv_frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if opcode == 0x9:
                self.ws.send_frame(0xA, payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0]
                self.close = (code, payload[2:].decode())
            elif opcode == 0x1:
                await asyncio.sleep(self.pause_secs)


@pytest.mark.asyncio
async def test_with_a_short_heartbeat_a_slow_reader_is_judged_by_the_budget(gateway_factory):
    """Issue 15 item 6: heartbeat silence and the outbound budget do not interfere.

    The heartbeat window here is 0.6 s (interval 0.3 s + timeout 0.3 s). The
    slow reader answers every ping it reads, but its pings wait behind a
    backlog that takes it seconds to read: the heartbeat must leave it to the
    budget, which closes it as a slow consumer. A peer that reads but never
    answers is still closed by the heartbeat (test_presence's
    test_silent_peer_is_closed_4408_and_cleaned_up), and so is one that
    stopped reading with nothing of ours pending (below).
    """
    gw = await gateway_factory(heartbeat_interval=0.3)  # budget: the default 1 MiB
    publisher, reader, raw = await flood_room(gw)
    idle = await RawWebSocket.open(gw, "ida")  # in no room: nothing is ever pending for it
    await settle(publisher, reader)
    slow = SlowReader(raw, pause_secs=0.04)  # ~100 KB/s
    before = sample(gw, "switchboard_slow_consumers_total")
    # Until the budget trips (loopback's kernel buffers take a few MB first: the
    # bound is test_presence's for the same 1 MiB budget); the close follows
    # after its grace.
    sent = await flood_until(
        publisher, "flood", lambda: sample(gw, "switchboard_slow_consumers_total") > before,
        limit=2000,
    )  # fmt: skip
    await asyncio.wait_for(slow.task, timeout=10)  # dropped after the close grace
    assert closed_as(gw, "slow_consumer") == 1, "not closed by the budget"
    # ida answered no ping: the heartbeat closed her, and only her.
    assert await idle.read_until_closed(timeout=5) == 4408
    assert closed_as(gw, "heartbeat_timeout") == 1
    assert await read_all(reader, sent) == list(range(1, sent + 1))
    assert publisher.connected and reader.connected
    await raw.close()
    await idle.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO/SIOCOUTQ are Linux's")
def test_tcp_progress_reads_the_kernels_counters():
    """Guards the struct tcp_info offset and SIOCOUTQ that Outbound.observe relies on."""
    with socket.socket() as server:
        # Set before the handshake: shrinking a window later stalls the transfer.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.bind(("127.0.0.1", 0))
        server.listen()
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
        with sender, receiver:
            before = tcp_progress(sender)
            assert before is not None
            sender.setblocking(False)
            queued = 0
            with contextlib.suppress(BlockingIOError):
                while queued < 64 * 1024 * 1024:
                    queued += sender.send(b"x" * 65536)
            stuck = tcp_progress(sender)
            assert stuck is not None and stuck[1] > 0  # the receiver reads nothing yet
            received = 0
            while received < queued:
                received += len(receiver.recv(1 << 20))
            deadline = time.monotonic() + 5
            while (after := tcp_progress(sender)) is not None and after[1]:
                assert time.monotonic() < deadline, after
                time.sleep(0.01)
            assert after is not None and after[0] - before[0] == queued


@pytest.mark.asyncio
async def test_frames_and_bytes_out_are_counted_on_every_path():
    """What admins' connection listings show as framesOut/bytesOut: each frame once,
    whether it went straight to the socket, half of it, or was queued behind others."""
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = IOStream(sender)
    out = Outbound(64 * 1024 * 1024, on_slow=lambda: None)
    out.attach(stream)
    try:
        assert out.write(b"a" * 10)  # straight to the socket
        assert (out.frames_out, out.bytes_out, out.pending) == (1, 10, 0)
        big = b"b" * (8 * 1024 * 1024)  # more than the kernel takes at once: the rest queued
        assert out.write(big) and out.pending > 0
        assert out.write(b"c" * 30, frames=3)  # behind the queue: three joined frames
        assert (out.frames_out, out.bytes_out) == (5, 10 + len(big) + 30)
        assert out.write_unbudgeted(b"d" * 5) is not None
        assert (out.frames_out, out.bytes_out) == (6, 10 + len(big) + 35)
    finally:
        stream.close()
        receiver.close()
