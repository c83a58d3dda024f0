"""Outbound writes of one connection: the frame writer, the budget, the slow-consumer rule.

Every frame a connection gets -- a broadcast from the hub, an ack, a log
entry from the logs pump -- is written by its :class:`Outbound`, on public
Tornado API only:

* **The frame writer.** Frames are built once by the caller (the same bytes
  for every recipient of a broadcast). On a plain TCP stream with nothing
  queued (``IOStream.writing()`` is False) a frame goes straight to
  ``socket.send()``: ``stream.write()`` would make the same system call but
  also create, queue and resolve a Future per recipient, ~45% of the
  broadcast loop's CPU (bench/README.md). What the socket does not take is
  queued in the stream, behind which everything else then waits, so frames
  keep their order.
* **The outbound budget.** Bytes queued in the stream and not yet taken by
  the kernel ("pending") are bounded by ``config.max_outbound_bytes``. They
  are counted here, from the Futures ``stream.write()`` returns (each one
  resolves when its bytes reached the kernel), rather than read from the
  stream's private buffer.
* **The slow-consumer rule.** A connection is a slow consumer when a frame
  would take its pending bytes over the budget. It is closed with 4408
  "slow consumer": the close frame is queued behind what is pending (it
  bypasses the budget), the peer gets :data:`SLOW_CONSUMER_CLOSE_GRACE_SECS`
  to read up to it and answer, then the socket is dropped. A peer that
  reads again within the grace sees the 4408 close frame, not a bare EOF.

* **A write from the database thread.** A lone ``message:send``'s ack can
  leave from the database thread right after its commit, one loop wake-up
  sooner (:meth:`Outbound.write_from_thread`; the batcher's ``on_commit``
  says when that keeps the connection's frames in order). The loop first
  lends the connection (:meth:`Outbound.lend`, before the send is queued,
  on a quiet node only). While it is lent, every write to it -- the loop's
  here, tornado's control frames through :meth:`Outbound.in_turn` -- holds
  one lock that the database thread holds around its own write, so the two
  never interleave bytes. The database thread takes that lock before the
  commit's outcome crosses to the loop and writes right after, so the loop,
  which ends the loan under the lock when it learns of the commit
  (:meth:`release`), always finds the thread's attempt over. The thread
  writes only when nothing is queued in the stream, and only once: its
  attempt ends the loan. What its ``send()`` leaves unwritten (the kernel's
  buffer was nearly full) is handed back: the loop queues it before
  anything else it writes to that connection. Connections that are not
  lent -- all but a quiet node's senders whose send is in the database --
  pay one attribute test per write for this.

The heartbeat is a separate rule (``Hub.sweep``) about the peer's silence,
and reading is a sign of life too: a ping queued behind a backlog -- ours,
or the kernel's send queue -- cannot be answered before the backlog is
read, so a peer that keeps reading it is left to the budget.
:meth:`Outbound.observe` samples that progress once per sweep, from the
kernel's TCP counters where the platform has them (Linux).

Example::

    def slow() -> None:  # log, count, close with 4408 and abort after the grace
        ...
        out.abort_after(SLOW_CONSUMER_CLOSE_GRACE_SECS)

    out = Outbound(config.max_outbound_bytes, on_slow=slow)
    out.attach(ws_connection.stream)
    out.write(frame)  # False: gone, closing, or over budget (slow() ran)
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

#: How long a slow consumer has, once its 4408 close frame is queued, to read
#: up to it and answer before its socket is dropped. Long enough for a peer
#: that resumes reading to drain a full outbound budget on any real link;
#: short, because the connection holds its rooms, presence and limit slot
#: until then (tornado itself would wait 5 s for the closing handshake).
SLOW_CONSUMER_CLOSE_GRACE_SECS = 1.5
#: A peer that read this much of a backlog since the previous sweep is alive,
#: even if its pong still waits behind that backlog. Well above a few pings and
#: close frames (2-130 bytes each), so a peer whose kernel acknowledges only
#: our pings is not taken for a reader.
READ_PROGRESS_MIN_BYTES = 1024

# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_acked at this offset (Linux >= 4.1).
_TCPI_BYTES_ACKED_OFFSET = 120
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TIOCOUTQ = getattr(termios, "TIOCOUTQ", None)  # SIOCOUTQ: bytes sent but not yet acked

T = TypeVar("T")

#: Held around every write to a lent connection, by the loop and by the
#: database thread (see the module docstring). Reentrant: a write that trips
#: the slow-consumer rule closes the connection, whose close frame is a write.
_LENT_WRITES = threading.RLock()


def tcp_progress(sock: socket.socket) -> tuple[int, int] | None:
    """``(bytes the peer acknowledged so far, bytes queued for it in the kernel)``.

    None where the platform does not say (not Linux) or the socket is closed.
    """
    if _TCP_INFO is None or _TIOCOUTQ is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
        queued = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return None
    if len(info) < _TCPI_BYTES_ACKED_OFFSET + 8:
        return None
    (acked,) = struct.unpack_from("Q", info, _TCPI_BYTES_ACKED_OFFSET)
    (unacked,) = struct.unpack("i", queued)
    return acked, unacked


class Outbound:
    """One connection's writes (see the module docstring).

    ``on_slow`` runs once, when the connection turns out to be a slow
    consumer; it is expected to close the connection (the handler logs,
    counts, and calls :meth:`abort_after` with the grace period).
    """

    def __init__(self, max_bytes: int, on_slow: Callable[[], None]) -> None:
        self.max_bytes = max_bytes
        self._on_slow = on_slow
        self._stream: IOStream | None = None
        # The stream's socket when it is plain TCP (fast path); never under TLS.
        self._sock: socket.socket | None = None
        # The TCP socket under any stream (for the kernel's counters).
        self._tcp: socket.socket | None = None
        self._last_sample: tuple[int, int] | None = None
        #: Bytes of budgeted writes queued in the stream, not yet taken by the kernel.
        self.pending = 0
        #: Monotonic time the peer was last seen reading a backlog (a sign of life).
        self.progress_at = 0.0
        #: Set once the connection is closing: nothing more is written.
        self.closing = False
        #: Frames and bytes accepted for the peer (for admins' connection listing).
        self.frames_out = 0
        self.bytes_out = 0
        #: None; the loan (its holder's token) while the database thread may
        #: write; or the bytes its write left over, which go before anything else.
        self._handoff: object | None = None

    def attach(self, stream: IOStream) -> None:
        """Write to ``stream`` (the WebSocket's, once it is open)."""
        self._stream = stream
        if isinstance(stream.socket, socket.socket):
            self._tcp = stream.socket
            if not isinstance(stream, SSLIOStream):
                self._sock = stream.socket

    @property
    def direct(self) -> bool:
        """Whether frames can go straight to the socket (plain TCP, attached)."""
        return self._sock is not None

    def write(self, frame: bytes, frames: int = 1) -> bool:
        """Write a frame within the budget; False if gone, closing or a slow consumer.

        ``frame`` may be ``frames`` frames joined in one write (counted as such).
        """
        if self._handoff is not None:
            return self.in_turn(partial(self._write, frame, frames))
        return self._write(frame, frames)

    def _write(self, frame: bytes, frames: int) -> bool:
        stream = self._stream
        if stream is None or self.closing:
            return False
        sock = self._sock
        # writing() is False for a closed stream too; send() on its closed
        # socket then fails, and the general path below finds it closed.
        if sock is not None and not stream.writing() and len(frame) <= self.max_bytes:
            try:
                sent = sock.send(frame)
            except OSError:
                sent = 0
            if sent == len(frame):
                self.frames_out += frames
                self.bytes_out += sent
                return True
            if sent:
                # Half a frame is on the wire: the rest must follow, whatever the
                # budget says (it fits: nothing else was pending).
                return self._queue(stream, frame[sent:], frames, len(frame))
        if stream.closed():
            return False
        if self.pending + len(frame) > self.max_bytes:
            self.slow_consumer()
            return False
        return self._queue(stream, frame, frames, len(frame))

    def write_unbudgeted(self, frame: bytes) -> asyncio.Future[None] | None:
        """Queue a frame outside the budget; the Future resolves once the kernel has it.

        For a writer that bounds itself by waiting for each frame (the logs
        pump). None if the stream is gone or the connection closing.
        """
        if self._handoff is not None:
            return self.in_turn(partial(self._write_unbudgeted, frame))
        return self._write_unbudgeted(frame)

    def _write_unbudgeted(self, frame: bytes) -> asyncio.Future[None] | None:
        stream = self._stream
        if stream is None or self.closing or stream.closed():
            return None
        self.frames_out += 1
        self.bytes_out += len(frame)
        return stream.write(frame)

    def in_turn(self, write: Callable[[], T]) -> T:
        """Run a write of the loop's in turn with the database thread's (on the loop).

        For writes that bypass :meth:`write`: tornado's control frames (ping,
        pong, close). What the database thread's write left over goes first.
        """
        if self._handoff is None:
            return write()
        with _LENT_WRITES:
            self._put_back()
            return write()

    def lend(self, token: object) -> bool:
        """On the loop: let :meth:`write_from_thread` with ``token`` write one frame.

        Until that write or :meth:`release`. ``token`` names the loan (any
        object but bytes, unique to it): a late attempt of an earlier loan
        finds another token and writes nothing. False (nothing lent) when
        frames cannot go straight to the socket (TLS, not attached), the
        connection is closing, or a loan or its leftover is pending.
        """
        if self._sock is None or self.closing or self._handoff is not None:
            return False
        self._handoff = token
        return True

    def release(self, token: object) -> None:
        """On the loop: end ``token``'s loan, if :meth:`write_from_thread` has not yet.

        Once this returns, the thread's attempt is over -- done, under the
        lock, with whatever its ``written`` callback recorded -- or will find
        nothing lent to it.
        """
        with _LENT_WRITES:
            if self._handoff is token:
                self._handoff = None

    def write_from_thread(
        self, frame: bytes, token: object, written: Callable[[int], object] | None = None
    ) -> Callable[[], bool] | None:
        """From the database thread, on a connection lent to ``token``: hold it to write ``frame``.

        None when it is not (or no longer) lent to ``token``. Else the lock
        is taken and held: the returned callable writes ``frame``, once, and
        lets go of it -- to be called right after the commit's outcome was
        handed to the loop, always (:meth:`server.store.db.Database.post`'s
        ``on_commit``). It returns True when the frame is written: wholly,
        or partly with the rest handed back to the loop, queued before
        anything else; ``written`` is then called with its size, still
        under the lock (see :meth:`release`). False -- closing, frames
        queued in the stream, over the budget, or the kernel took none of
        it -- and the loop writes it as usual. Either way the loan is over.
        """
        _LENT_WRITES.acquire()
        if self._handoff is not token:
            _LENT_WRITES.release()
            return None
        return partial(self._write_held, frame, written)

    def _write_held(self, frame: bytes, written: Callable[[int], object] | None) -> bool:
        """:meth:`write_from_thread`'s write, under the lock it took; then the lock let go."""
        try:
            self._handoff = None
            stream, sock = self._stream, self._sock
            if (
                stream is None or sock is None or self.closing or stream.closed()
                or stream.writing() or len(frame) > self.max_bytes
            ):  # fmt: skip
                return False
            try:
                sent = sock.send(frame)
            except OSError:  # nothing taken (EAGAIN), or the peer is gone
                return False
            if not sent:
                return False
            self.frames_out += 1
            self.bytes_out += len(frame)
            if sent < len(frame):
                self._handoff = frame[sent:]
                stream.io_loop.add_callback(self._put_back_alone)
            if written is not None:
                written(len(frame))
            return True
        finally:
            _LENT_WRITES.release()

    def _put_back_alone(self) -> None:
        """On the loop: queue the thread's leftover now, whether or not a write follows."""
        with _LENT_WRITES:
            self._put_back()

    def _put_back(self) -> None:
        """Under the lock, on the loop: queue what the database thread's write left over."""
        rest = self._handoff
        if isinstance(rest, bytes):
            self._handoff = None
            stream = self._stream
            if stream is not None:  # counted when the thread wrote it: 0 frames, 0 bytes
                self._queue(stream, rest, 0, 0)

    def _queue(self, stream: IOStream, data: bytes, frames: int, size: int) -> bool:
        """Queue ``data``, the rest of ``frames`` frames of ``size`` bytes in all."""
        try:
            written = stream.write(data)
        except StreamClosedError:
            return False
        self.pending += len(data)
        self.frames_out += frames
        self.bytes_out += size
        written.add_done_callback(partial(self._drained, len(data)))
        return True

    def _drained(self, size: int, written: asyncio.Future[None]) -> None:
        # Also when the stream closed (the Future then holds StreamClosedError,
        # which tornado marks retrieved): nothing is pending on a closed stream.
        self.pending -= size
        if not written.exception():
            self.progress_at = time.monotonic()  # the kernel took it: the peer read

    def observe(self, now: float) -> None:
        """Sample the peer's reading (once per heartbeat sweep).

        Reading counts as a sign of life (:attr:`progress_at`) when there was
        a backlog at the previous sample -- in the stream or the kernel -- and
        the peer has acknowledged more than :data:`READ_PROGRESS_MIN_BYTES`
        since. Without a backlog a live peer answers the ping instead.
        """
        if self._tcp is None:
            return
        sample = tcp_progress(self._tcp)
        previous, self._last_sample = self._last_sample, sample
        if sample is None or previous is None:
            return
        had_backlog = previous[1] > READ_PROGRESS_MIN_BYTES or self.pending > 0
        if had_backlog and sample[0] - previous[0] > READ_PROGRESS_MIN_BYTES:
            self.progress_at = now

    def slow_consumer(self) -> None:
        """Apply the slow-consumer rule once: stop writing and let ``on_slow`` close."""
        if self.closing:
            return
        self.closing = True
        self._on_slow()

    def abort_after(self, secs: float) -> None:
        """Drop the socket in ``secs`` (0: now) unless it closed by then."""
        stream = self._stream
        if stream is None or stream.closed():
            return
        if secs <= 0:
            stream.close()
            return
        asyncio.get_running_loop().call_later(secs, self._abort, stream)

    @staticmethod
    def _abort(stream: IOStream) -> None:
        if not stream.closed():
            stream.close()
