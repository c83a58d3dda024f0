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
  would take its pending bytes over the budget, or when its pending bytes
  have not moved for as long as the heartbeat waits for a silent peer
  (:meth:`Outbound.stalled`). It is closed with 4408 "slow consumer": the
  close frame is queued behind what is pending (it bypasses the budget), the
  peer gets :data:`SLOW_CONSUMER_CLOSE_GRACE_SECS` to read up to it and
  answer, then the socket is dropped. A peer that reads again within the
  grace sees the 4408 close frame, not a bare EOF.

The heartbeat is a separate rule (``Hub.sweep``): it judges a peer's
silence only while nothing is pending for it -- a ping queued behind our
own backlog cannot be answered, so the backlog is the budget's business --
and a backlog that drains counts as a sign of life.

Example::

    out = Outbound(config.max_outbound_bytes, on_slow=handler.slow_consumer)
    out.attach(ws_connection.stream)
    out.write(frame)  # False: gone, closing, or over budget (on_slow ran)
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from functools import partial

from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

#: How long a slow consumer has, once its 4408 close frame is queued, to read
#: up to it and answer before its socket is dropped. Long enough for a peer
#: that resumes reading to drain a full outbound budget on any real link;
#: short, because the connection holds its rooms, presence and limit slot
#: until then (tornado itself would wait 5 s for the closing handshake).
SLOW_CONSUMER_CLOSE_GRACE_SECS = 1.5


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
        #: Bytes of budgeted writes queued in the stream, not yet taken by the kernel.
        self.pending = 0
        #: Monotonic time the backlog last moved: it began, or a write reached the kernel.
        self.progress_at = 0.0
        #: Set once the connection is closing: nothing more is written.
        self.closing = False

    def attach(self, stream: IOStream) -> None:
        """Write to ``stream`` (the WebSocket's, once it is open)."""
        self._stream = stream
        plain = not isinstance(stream, SSLIOStream)
        if plain and isinstance(stream.socket, socket.socket):
            self._sock = stream.socket

    @property
    def direct(self) -> bool:
        """Whether frames can go straight to the socket (plain TCP, attached)."""
        return self._sock is not None

    @property
    def behind(self) -> bool:
        """Whether budgeted bytes are waiting for the peer to read."""
        return self.pending > 0

    def write(self, frame: bytes) -> bool:
        """Write a frame within the budget; False if gone, closing or a slow consumer."""
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
                return True
            if sent:
                # Half a frame is on the wire: the rest must follow, whatever the
                # budget says (it fits: nothing else was pending).
                return self._queue(stream, frame[sent:])
        if stream.closed():
            return False
        if self.pending + len(frame) > self.max_bytes:
            self.slow_consumer()
            return False
        return self._queue(stream, frame)

    def write_unbudgeted(self, frame: bytes) -> asyncio.Future[None] | None:
        """Queue a frame outside the budget; the Future resolves once the kernel has it.

        For a writer that bounds itself by waiting for each frame (the logs
        pump). None if the stream is gone or the connection closing.
        """
        stream = self._stream
        if stream is None or self.closing or stream.closed():
            return None
        return stream.write(frame)

    def _queue(self, stream: IOStream, data: bytes) -> bool:
        try:
            written = stream.write(data)
        except StreamClosedError:
            return False
        if not self.pending:
            self.progress_at = time.monotonic()
        self.pending += len(data)
        written.add_done_callback(partial(self._drained, len(data)))
        return True

    def _drained(self, size: int, _written: asyncio.Future[None]) -> None:
        # Also when the stream closed (the Future then holds StreamClosedError,
        # which tornado marks retrieved): nothing is pending on a closed stream.
        self.pending -= size
        self.progress_at = time.monotonic()

    def stalled(self, now: float, window_secs: float) -> bool:
        """The time side of the budget: pending bytes that have not moved for ``window_secs``.

        Called by the heartbeat sweep; a stalled connection is closed as a
        slow consumer (``on_slow``) and True is returned.
        """
        if self.closing or not self.pending or now - self.progress_at <= window_secs:
            return False
        self.slow_consumer()
        return True

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
