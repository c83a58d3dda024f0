"""A lean WebSocket client for the load tools (not a general client).

The benchmarks need thousands of connections whose per-frame cost is far
below the server's, so this is a bare :class:`asyncio.Protocol`: the HTTP
upgrade is written by hand, server frames are split by reading their 2-10
byte headers only, and a ``message:new`` payload is not JSON-decoded at all:
the receiver finds ``"bt":`` (the publisher's send time put in the message
metadata: ``time.time()``, or ``time.monotonic()`` with ``Tally(clock=...)``)
with ``bytes.find`` and parses that one number. Acks and
``system:welcome`` are decoded (orjson) because setup needs them.

Client frames are masked as RFC 6455 requires (tornado's C mask helper).
Pings are answered with pongs and a close frame is echoed, so connections
held for a while (``bench/idle.py``) survive the server's heartbeat sweep.

Example::

    tally = Tally()
    ws = await LeanWS.connect("127.0.0.1", port, "/ws/chat", token, tally)
    await ws.welcome
    ack = await ws.request("room:join", {"roomId": room})
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import resource
import selectors
import struct
import time
from array import array
from collections.abc import Callable
from typing import Any

import orjson
import psutil
from tornado.util import _websocket_mask

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Found near the start of the payload: the baseline hub's json.dumps puts a
# space after the colon, orjson does not.
_MESSAGE_NEW = b'"message:new"'
_WELCOME = b'{"event":"system:welcome"'
_ACK = b'{"ack":'
_BT = b'"bt":'


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_secs() -> float:
    """CPU seconds (user + system) this process has used so far."""
    t = os.times()
    return t.user + t.system


def process_cpu_secs(proc: psutil.Process) -> float:
    """CPU seconds (user + system) another process has used so far; 0 once it is gone."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


class LazySelector(selectors.EpollSelector):
    """An epoll selector that waits ``interval`` seconds before each blocking poll.

    Frames pile up in the kernel meanwhile, so one wake-up serves many
    sockets and one ``recv`` returns several frames: the receivers' CPU per
    frame drops, at the price of up to ``interval`` of extra latency (which is
    why latency comes from the eager probe process). ``interval = 0`` is a
    plain epoll selector (used during set-up).
    """

    interval = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        if self.interval and (timeout is None or timeout > 0):
            nap = self.interval if timeout is None else min(self.interval, timeout)
            time.sleep(nap)
            if timeout is not None:
                timeout = max(0.0, timeout - nap)
        return super().select(timeout)


def run_lazy(main: Any) -> tuple[Any, LazySelector]:
    """``asyncio.run(main(selector))`` on a loop built on a :class:`LazySelector`."""
    selector = LazySelector()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        return runner.run(main(selector)), selector


class Tally:
    """What every connection of one process received (shared by its connections).

    ``count`` is the number of frames carrying a benchmark timestamp;
    ``latencies`` holds ``receive time - send time`` for each of them (seconds),
    receive time read from ``clock`` (the senders must stamp with the same one;
    processes of one machine share ``time.monotonic``).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.other = 0
        self.first_rx = 0.0
        self.last_rx = 0.0
        self.latencies = array("d")
        self.target = 0
        self.reached: asyncio.Future[None] | None = None

    def expect(self, target: int) -> asyncio.Future[None]:
        """Future that resolves once ``count`` reaches ``target``."""
        self.target = target
        self.reached = asyncio.get_running_loop().create_future()
        if self.count >= target:
            self.reached.set_result(None)
        return self.reached


def encode_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return header + key + _websocket_mask(key, payload)


def count_stamped(tally: Tally, data: bytes, p: int, end: int, now: float) -> float:
    """Record the delivery whose ``"bt":`` is at ``data[p]``; returns the receive time."""
    if not now:
        now = tally.clock()
    q = data.find(b"}", p, end)
    tally.latencies.append(now - float(data[p + 5 : q]))
    tally.count += 1
    if not tally.first_rx:
        tally.first_rx = now
    tally.last_rx = now
    if tally.count == tally.target and tally.reached is not None and not tally.reached.done():
        tally.reached.set_result(None)
    return now


class LeanWS(asyncio.Protocol):
    """One client connection; see the module docstring."""

    def __init__(self, host: str, port: int, path: str, token: str, tally: Tally) -> None:
        loop = asyncio.get_running_loop()
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n"
        )
        self._key = base64.b64encode(os.urandom(16))
        self._upgraded = False
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.welcome: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[int | None] = loop.create_future()
        self._acks: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_ack = 0
        #: ``time.monotonic()`` just before the last frame went to the transport
        #: (after its encoding and masking: the client's own cost stays out).
        self.wrote_at = 0.0
        #: With ``stamp_acks`` set, each ack future resolved maps here to the
        #: ``time.monotonic()`` of the read that brought its ack, taken before the
        #: future's callbacks run a loop iteration later (the reader pops it).
        self.stamp_acks = False
        self.ack_read_at: dict[asyncio.Future[dict[str, Any]], float] = {}

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str,
        token: str,
        tally: Tally,
        *,
        source: str | None = None,
        timeout: float = 30.0,
    ) -> LeanWS:
        loop = asyncio.get_running_loop()
        local = (source, 0) if source else None
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: cls(host, port, path, token, tally), host, port, local_addr=local
            ),
            timeout,
        )
        await asyncio.wait_for(proto.handshake, timeout)
        return proto

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = self._key.decode()
        transport.write(f"{self._request}Sec-WebSocket-Key: {key}\r\n\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.handshake, self.welcome):
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        self._acks.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self._upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            self._check_upgrade(data[:end])
            data = data[end + 4 :]
            if not self._upgraded:
                return
        i, n = 0, len(data)
        now = 0.0
        while n - i >= 2:
            b1 = data[i + 1] & 0x7F  # server frames are never masked
            if b1 < 126:
                start = i + 2
                end = start + b1
            elif b1 == 126:
                if n - i < 4:
                    break
                start = i + 4
                end = start + ((data[i + 2] << 8) | data[i + 3])
            else:
                if n - i < 10:
                    break
                start = i + 10
                end = start + int.from_bytes(data[i + 2 : i + 10], "big")
            if end > n:
                break
            opcode = data[i] & 0x0F
            if opcode == 0x1:
                now = self._on_text(data, start, end, now)
            elif opcode == 0x9:  # ping -> pong
                self._send(data[start:end], 0xA)
            elif opcode == 0x8:  # close: echo the code and hang up
                code = int.from_bytes(data[start : start + 2], "big") if end - start >= 2 else None
                if not self.closed.done():
                    self.closed.set_result(code)
                self._send(data[start : start + 2], 0x8)
                if self.transport is not None:
                    self.transport.close()
                return
            i = end
        if i < n:
            self._buf = data[i:]

    def _on_text(self, data: bytes, start: int, end: int, now: float) -> float:
        """One text frame ``data[start:end]``; returns ``now`` (read once per read).

        Subclasses speaking another protocol (``bench/peers``' Socket.IO client)
        override this; the framing above stays shared.
        """
        tally = self.tally
        if data.find(_MESSAGE_NEW, start + 9, start + 24) >= 0:
            p = data.find(_BT, start, end)
            if p >= 0:
                return count_stamped(tally, data, p, end, now)
            tally.other += 1
        elif data.startswith(_ACK, start):
            self._ack(data[start:end])
        elif data.startswith(_WELCOME, start):
            if not self.welcome.done():
                self.welcome.set_result(orjson.loads(data[start:end])["data"])
        else:
            tally.other += 1
        return now

    # -- protocol helpers --------------------------------------------------------

    def _check_upgrade(self, head: bytes) -> None:
        status = head.split(b"\r\n", 1)[0]
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        if b" 101 " not in status or expected not in head:
            if not self.handshake.done():
                self.handshake.set_exception(ConnectionError(f"upgrade refused: {status!r}"))
            if self.transport is not None:
                self.transport.close()
            return
        self._upgraded = True
        self.handshake.set_result(None)

    def _ack(self, raw: bytes) -> None:
        frame = orjson.loads(raw)
        self._answer(frame.get("ack"), frame)

    def _answer(self, ack_id: Any, result: dict[str, Any]) -> None:
        """The ack ``ack_id`` came: its future gets ``result`` (and its read time)."""
        fut = self._acks.pop(ack_id, None)
        if fut is not None and not fut.done():
            if self.stamp_acks:
                self.ack_read_at[fut] = time.monotonic()
            fut.set_result(result)

    def _send(self, payload: bytes, opcode: int = 0x1) -> None:
        if self.transport is not None and not self.transport.is_closing():
            frame = encode_frame(payload, opcode)
            self.wrote_at = time.monotonic()
            self.transport.write(frame)

    # -- API ------------------------------------------------------------------------

    def send(self, event: str, data: dict[str, Any], *, ack: bool = False) -> int | None:
        """Send one event; with ``ack=True`` returns the ack id (see :meth:`request`)."""
        ack_id = None
        if ack:
            self._next_ack += 1
            ack_id = self._next_ack
        self._send(self.encode(event, data, ack_id))
        return ack_id

    @staticmethod
    def encode(event: str, data: dict[str, Any], ack_id: int | None) -> bytes:
        """One event's payload in Switchboard's envelope (another protocol overrides it)."""
        frame: dict[str, Any] = {"event": event, "data": data}
        if ack_id is not None:
            frame["ack"] = ack_id
        return orjson.dumps(frame)

    def request_future(self, event: str, data: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send with an ack id; the future resolves to the ack frame (ok or not)."""
        ack_id = self.send(event, data, ack=True)
        assert ack_id is not None
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self.transport is None or self.transport.is_closing():
            fut.set_exception(ConnectionError("connection closed"))
        else:
            self._acks[ack_id] = fut
        return fut

    async def request(
        self, event: str, data: dict[str, Any], timeout: float = 60.0
    ) -> dict[str, Any]:
        """Send with an ack id and return the ack frame; raises if ``ok`` is false."""
        frame = await asyncio.wait_for(self.request_future(event, data), timeout)
        if not frame.get("ok"):
            raise RuntimeError(f"{event} failed: {frame.get('error')}")
        return frame

    def join(self, room: str) -> Any:
        """Join ``room``; awaitable (raises if refused)."""
        return self.request("room:join", {"roomId": room})

    def post(self, room: str, content: str, bt: float) -> asyncio.Future[dict[str, Any]]:
        """Send a chat message stamped ``metadata.bt``; the future is the ack frame."""
        data = {"roomId": room, "content": content, "metadata": {"bt": bt}}
        return self.request_future("message:send", data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_many(
    host: str,
    port: int,
    path: str,
    tokens: list[str],
    tally: Tally,
    *,
    sources: list[str],
    concurrency: int = 64,
    join_room: str | None = None,
    timings: array[float] | None = None,
    cls: type[LeanWS] = LeanWS,
) -> tuple[list[LeanWS], list[str]]:
    """Open one connection per token (each waits for ``system:welcome``).

    With ``join_room`` each connection also joins that room (ack awaited).
    With ``timings`` each connection that got its welcome appends the seconds
    from the start of its TCP connect to the welcome (``time.monotonic``).
    Returns the open connections and the errors of those that failed (a
    connection the server closed with a code is reported as ``close <code>``).
    ``cls`` is the client class (``bench/peers`` passes its Socket.IO client).
    """
    sem = asyncio.Semaphore(concurrency)
    conns: list[LeanWS] = []
    errors: list[str] = []

    async def one(i: int, token: str) -> None:
        async with sem:
            ws: LeanWS | None = None
            try:
                started = time.monotonic()
                ws = await cls.connect(
                    host, port, path, token, tally, source=sources[i % len(sources)]
                )
                await asyncio.wait_for(ws.welcome, 60)
                if timings is not None:
                    timings.append(time.monotonic() - started)
                if join_room is not None:
                    await ws.join(join_room)
                conns.append(ws)
            except Exception as exc:
                code = ws.closed.result() if ws is not None and ws.closed.done() else None
                errors.append(f"close {code}" if code else f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
    return conns, errors


class Pipe:
    """The child's end of a ``multiprocessing`` pipe, readable from asyncio.

    Messages land in :attr:`queue`; when the parent goes away (pipe closed,
    or this process re-parented) ``("exit",)`` is queued instead, so a child
    never outlives a parent that died without cleaning up.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._parent = os.getppid()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)
        self._watch = self._loop.create_task(self._watch_parent())

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.queue.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            self.queue.put_nowait(("exit",))

    async def _watch_parent(self) -> None:
        while os.getppid() == self._parent:  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(1.0)
        self.queue.put_nowait(("exit",))

    async def get(self) -> tuple[Any, ...]:
        return await self.queue.get()

    def send(self, obj: Any) -> None:
        self.conn.send(obj)
