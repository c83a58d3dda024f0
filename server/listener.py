"""The node's TCP accept loop: a bound per peer address, and no collapse at the fd limit.

Tornado's own accept loop (``tornado.netutil.add_accept_handler``, which
``TCPServer.add_sockets`` installs) serves every connection it can accept,
and lets any ``accept()`` error other than "would block" escape its
callback. A gateway facing the internet needs two things it does not do:

- **A bound per peer address, before any HTTP parsing.** The per-IP
  WebSocket limit is checked after the token, so a client that opens TCP
  connections and never finishes a request (half-open) is counted by
  nothing. Here every accepted connection takes a slot of its peer address
  until its socket closes; over the bound the socket is closed at once,
  without an HTTP response. Peers in ``SWITCHBOARD_TRUSTED_PROXIES`` are
  exempt: every client behind a proxy shares its address.
- **Surviving fd exhaustion.** At the ``RLIMIT_NOFILE`` limit ``accept()``
  fails with ``EMFILE`` while the listening socket stays readable, so
  Tornado's callback raised on every loop iteration (a traceback each time:
  31.8 MB of them in 5 s in a probe) and the node stopped answering. Here
  the failure stops polling the listening sockets for a short, doubling
  back-off, logs one WARNING line at most every
  :data:`ACCEPT_WARNING_INTERVAL_SECS`, and accepting resumes by itself:
  the connections waiting in the backlog are served as soon as descriptors
  are free again.

Accepted sockets are handed to the server through its public
``handle_stream`` hook, wrapped in an ``IOStream`` whose ``close_fd`` (the
hook IOStream subclasses implement) gives the slot back, whichever side
closes and whatever the connection became (HTTP keep-alive or WebSocket).

The node has no TLS listener of its own (TLS ends at the proxy or load
balancer in front of it), so the streams are plain ``IOStream``\\s.

Example::

    server = HTTPServer(app, idle_connection_timeout=10.0)
    listener = Listener(server, metrics, max_per_ip=52, exempt=config.trusted_proxies)
    listener.start(bind_sockets(8080, "0.0.0.0"))
    ...
    listener.stop()
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from server.ops.metrics import ACCEPT_ERRNOS, Metrics

log = logging.getLogger("switchboard.listener")

#: ``accept()`` errors that mean "out of descriptors or kernel memory" (by errno), named
#: in the metric; any other error of the listener itself is handled the same way.
EXHAUSTION_ERRNOS = {getattr(errno, name): name for name in ACCEPT_ERRNOS if name != "other"}
# Errors of one queued connection, not of the listener (Linux passes pending
# network errors on through accept(); accept(2) asks to retry as for EAGAIN).
_CONNECTION_ERRNOS = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
})  # fmt: skip

#: Connections accepted per wake-up before other callbacks get a turn (Tornado's figure).
ACCEPTS_PER_WAKEUP = 128
#: First pause after an exhausted ``accept()``; doubles while it keeps failing.
ACCEPT_BACKOFF_MIN_SECS = 0.1
#: Longest pause: how late, at most, the node notices that descriptors are free again.
ACCEPT_BACKOFF_MAX_SECS = 1.0
#: At most one "cannot accept" WARNING line per this many seconds (with a count).
ACCEPT_WARNING_INTERVAL_SECS = 10.0
#: At most one "refused, over the per-address bound" line per address per this many seconds.
REFUSAL_LOG_INTERVAL_SECS = 60.0
#: Addresses whose last refusal line is remembered; the least recent are forgotten first.
MAX_TRACKED_REFUSALS = 10_000
#: Used as the target when the hard limit is "unlimited" (Linux's default ``nr_open``).
FD_LIMIT_IF_UNLIMITED = 1_048_576

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit in force.

    Every connection is a descriptor, and distributions still start
    processes with a soft limit of 1024. Called once by ``switchboard
    serve`` (not at import: a library user keeps their process's limits).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT_IF_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("open-file limit: %d (the hard limit)", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open-file limit stays %d: cannot raise it to %d: %s", soft, target, exc)
        return soft
    log.info("open-file limit raised from %d to %d (the hard limit)", soft, target)
    return target


class _CountedStream(IOStream):
    """An ``IOStream`` that tells its listener once, when its socket is closed.

    The listener and the bounded address (``""``: not bounded) are two
    attributes rather than a closure: a closure and its cells cost an open
    connection ~270 bytes more.
    """

    def __init__(self, sock: socket.socket, listener: Listener, ip: str, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._listener: Listener | None = listener
        self._bounded_ip = ip

    def close_fd(self) -> None:
        try:
            super().close_fd()
        finally:
            listener, self._listener = self._listener, None
            if listener is not None:
                listener._closed(self._bounded_ip)


class Listener:
    """Accepts connections on listening sockets and hands them to ``server``.

    ``max_per_ip`` bounds the open TCP connections of one peer address
    (HTTP, keep-alive and WebSocket alike) on this node; peers inside one of
    the ``exempt`` networks are not bounded.
    """

    def __init__(
        self,
        server: HTTPServer,
        metrics: Metrics,
        *,
        max_per_ip: int,
        exempt: Iterable[Network] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.max_per_ip = max_per_ip
        self.exempt = tuple(exempt)
        self._clock = clock
        self._sockets: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._per_ip: dict[str, int] = {}
        self._backoff_secs = 0.0
        self._resume: asyncio.TimerHandle | None = None
        self._failures = 0  # accept() failures since the last WARNING line
        self._warned_at: float | None = None
        self._refusals: OrderedDict[str, tuple[float, int]] = OrderedDict()  # logged at, since

    def start(self, sockets: Iterable[socket.socket]) -> None:
        """Start accepting on ``sockets`` (bound and listening, e.g. from ``bind_sockets``)."""
        self._loop = asyncio.get_running_loop()
        self._sockets.extend(sockets)
        self._poll(True)

    def stop(self) -> None:
        """Stop accepting and close the listening sockets; open connections stay."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._loop is not None:
            self._poll(False)
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    # -- accepting --------------------------------------------------------------

    def _poll(self, on: bool) -> None:
        assert self._loop is not None
        for sock in self._sockets:
            if on:
                self._loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the backlog is empty
            except OSError as exc:
                if exc.errno in _CONNECTION_ERRNOS:
                    continue  # that one connection failed while queued
                # Out of descriptors or memory (or a listener error nobody
                # expected): raising would repeat on every loop iteration.
                self._pause(exc)
                return
            self._backoff_secs = 0.0
            self._admit(conn, address)

    def _pause(self, exc: OSError) -> None:
        """``accept()`` failed (e.g. ``EMFILE``): stop polling, warn (rate-limited), retry."""
        assert self._loop is not None
        name = EXHAUSTION_ERRNOS.get(exc.errno or 0, "other")
        self.metrics.accept_errors.labels(name).inc()
        self._failures += 1
        self._backoff_secs = min(
            ACCEPT_BACKOFF_MAX_SECS, max(ACCEPT_BACKOFF_MIN_SECS, self._backoff_secs * 2)
        )
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= ACCEPT_WARNING_INTERVAL_SECS:
            log.warning(
                "cannot accept connections: %s (%s; %d failure(s) since the last report); "
                "retrying within %.1f s, queued connections wait in the backlog",
                exc.strerror, name, self._failures, ACCEPT_BACKOFF_MAX_SECS,
            )  # fmt: skip
            self._warned_at = now
            self._failures = 0
        # The listening socket stays readable while connections are queued:
        # polling it now would spin on the same failure, hence the pause.
        self._poll(False)
        self._resume = self._loop.call_later(self._backoff_secs, self._resume_polling)

    def _resume_polling(self) -> None:
        self._resume = None
        self._poll(True)

    # -- per-address bound ------------------------------------------------------------

    def _admit(self, conn: socket.socket, address: Any) -> None:
        ip = address[0] if isinstance(address, tuple) and address else ""
        bounded = bool(ip) and not self._is_exempt(ip)
        if bounded:
            held = self._per_ip.get(ip, 0)
            if held >= self.max_per_ip:
                conn.close()
                self._refused(ip, held)
                return
            self._per_ip[ip] = held + 1
        self.metrics.tcp_connections.inc()
        stream = _CountedStream(
            conn, self, ip if bounded else "",
            max_buffer_size=self.server.max_buffer_size,
            read_chunk_size=self.server.read_chunk_size,
        )  # fmt: skip
        try:
            self.server.handle_stream(stream, address)
        except Exception:
            log.exception("serving a connection from %s failed", ip)
            stream.close()

    def _closed(self, bounded_ip: str) -> None:
        """A connection's socket closed; ``bounded_ip`` is its address if it counted."""
        self.metrics.tcp_connections.dec()
        if bounded_ip:
            left = self._per_ip[bounded_ip] - 1
            if left:
                self._per_ip[bounded_ip] = left
            else:
                del self._per_ip[bounded_ip]

    def _is_exempt(self, ip: str) -> bool:
        if not self.exempt:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.exempt)

    def _refused(self, ip: str, held: int) -> None:
        self.metrics.tcp_refused.labels("ip_limit").inc()
        now = self._clock()
        last = self._refusals.get(ip)
        if last is not None and now - last[0] < REFUSAL_LOG_INTERVAL_SECS:
            self._refusals[ip] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._refusals[ip] = (now, 0)
        self._refusals.move_to_end(ip)
        while len(self._refusals) > MAX_TRACKED_REFUSALS:
            self._refusals.popitem(last=False)
        more = f"; {suppressed} more since the last report" if suppressed else ""
        log.warning(
            "refused a TCP connection from %s: it holds %d, the most one address may "
            "(SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP)%s; next report for it in %d s or later",
            ip, held, more, REFUSAL_LOG_INTERVAL_SECS,
        )  # fmt: skip
