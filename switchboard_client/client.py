"""One WebSocket connection to a Switchboard namespace: :class:`Client`.

The connection's life (handshake, token placement, reader, acks, event
buffer and callbacks, close) and, with ``reconnect=True``, the reconnect
loop; what it remembers in order to catch up after a reconnection is in
:mod:`switchboard_client.recovery`. The package docstring describes the
protocol and the local ``client:*`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
from collections.abc import AsyncIterator, Coroutine, Mapping
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import HTTPTimeoutError
from tornado.websocket import (
    WebSocketClientConnection,
    WebSocketClosedError,
    WebSocketError,
    websocket_connect,
)

from switchboard_client.errors import ClientError, ConnectionClosed, HandshakeError
from switchboard_client.recovery import (
    DEFAULT_HOLE_WAIT_SECS,
    MAX_HELD,
    RoomLedger,
    page_history,
)
from switchboard_client.wire import EventCallback, Frame, Predicate, as_int, dumps, loads, preview

log = logging.getLogger("switchboard.client")

TokenLocation = Literal["header", "query", "cookie", "frame"]

DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
FATAL_CLOSE_CODES: Final = frozenset({4401, 4403, 4429})
"""Close codes after which a reconnecting client gives up (auth, ban, limits)."""

#: Rooms one ``room:resume`` may name (the server's bound); more go in several.
MAX_RESUME_ROOMS: Final = 500
#: First reconnection delay ceiling; doubles per attempt up to ``max_backoff``.
_BACKOFF_START_SECS: Final = 0.1
#: How long to read for the close frame that follows a handshake ``system:error``.
_CLOSE_WAIT_SECS: Final = 5.0


class Client:
    """One WebSocket connection to a Switchboard namespace.

    ``token_in`` chooses how the token travels: ``"header"`` (``Authorization:
    Bearer``), ``"query"`` (``?token=``), ``"cookie"`` (``access_token``) or
    ``"frame"`` (an ``auth:connect {token}`` frame sent right after the
    upgrade, the way a browser authenticates without a URL token).
    ``keep_history=False`` stops filling :attr:`events`; ``buffer_events=False``
    stops buffering for :meth:`next_event` (callbacks only) — both are for
    long-running consumers such as benchmarks and ``switchboard tail``.

    A live ``message:new`` that follows a gap in its room's ``seq`` is held
    for ``hole_wait`` seconds (the gap may close by itself), then the missing
    range is fetched with ``room:get_messages`` and delivered first, flagged
    ``"recovered": True``; the application sees each room in ``seq`` order,
    each message once. ``hole_wait=None`` turns the repair off: messages are
    delivered as they arrive (still once each), as a tool observing what a
    server sends wants them.

    Example::

        client = Client("ws://127.0.0.1:8080/ws/chat", token, reconnect=True)
        welcome = await client.connect()
        pong = await client.emit("system:ping", {"t": 1})
        client.close()
        await client.wait_closed()
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_in: TokenLocation = "header",
        headers: Mapping[str, str] | None = None,
        origin: str | None = None,
        reconnect: bool = False,
        max_backoff: float = 10.0,
        ack_timeout: float = 10.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 10.0,
        ping_interval: float | None = None,
        keep_history: bool = True,
        buffer_events: bool = True,
        hole_wait: float | None = DEFAULT_HOLE_WAIT_SECS,
    ) -> None:
        if token_in not in ("header", "query", "cookie", "frame"):
            raise ValueError(
                f"token_in must be 'header', 'query', 'cookie' or 'frame', not {token_in!r}"
            )
        if url.startswith("http://") or url.startswith("https://"):
            url = "ws" + url[4:]
        self.url: str = url
        self.token: str | None = token
        self.token_in: TokenLocation = token_in
        self.headers: dict[str, str] = dict(headers or {})
        self.origin: str | None = origin
        self.reconnect: bool = reconnect
        self.max_backoff: float = max_backoff
        self.ack_timeout: float = ack_timeout
        self.max_message_size: int = max_message_size
        self.connect_timeout: float = connect_timeout
        self.ping_interval: float | None = ping_interval
        self.keep_history: bool = keep_history
        self.buffer_events: bool = buffer_events
        self.hole_wait: float = hole_wait if hole_wait is not None else 0.0

        self.welcome: dict[str, Any] | None = None
        """``data`` of the latest ``system:welcome`` (updated on reconnect)."""
        self.events: list[Frame] = []
        """Every event frame received (and local ``client:*`` ones), in order."""
        self.reconnects: int = 0
        """Number of successful reconnections so far."""

        self._buffer: list[Frame] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._handlers: dict[str, list[EventCallback]] = {}
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        self._conn: WebSocketClientConnection | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._last_ack_id = 0
        self._started = False
        self._closing = False
        self._finished = False
        self._sent_close: tuple[int, str | None] | None = None
        self._close_code: int | None = None
        self._close_reason: str | None = None
        self._ledger = RoomLedger(repair=hole_wait is not None)
        self._repair_timers: dict[str, asyncio.TimerHandle] = {}
        self._repairing: set[str] = set()
        self._repair_tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random()

    def __repr__(self) -> str:
        state = "connected" if self.connected else ("closed" if self.closed else "idle")
        return f"<Client {self.url} {state}>"

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        """True while a socket is open and :meth:`close` has not been called."""
        return self._conn is not None and not self._closing

    @property
    def closed(self) -> bool:
        """True once the client is closed for good (no reconnection pending)."""
        return self._finished

    @property
    def close_code(self) -> int | None:
        """Close code of the most recent connection loss (e.g. 4401), else ``None``."""
        return self._close_code

    @property
    def close_reason(self) -> str | None:
        """Close reason of the most recent connection loss, if the server sent one."""
        return self._close_reason

    @property
    def rooms(self) -> list[Any]:
        """Room ids joined through :meth:`emit` (re-joined after a reconnect)."""
        return self._ledger.room_ids

    def last_seq(self, room_id: Any) -> int | None:
        """Highest message ``seq`` seen in ``room_id`` (events and acks), or ``None``.

        Example::

            await client.emit("room:join", {"roomId": rid, "sinceSeq": client.last_seq(rid) or 0})
        """
        return self._ledger.last_seq(str(room_id))

    @property
    def duplicates_dropped(self) -> int:
        """Live ``message:new`` frames dropped as already delivered (live or recovered).

        The application never sees a message twice; this shows how often the
        wire carried one again (a test that the server sent nothing twice reads it).
        """
        return self._ledger.duplicates

    def contiguous_seq(self, room_id: Any) -> int | None:
        """Highest ``seq`` of ``room_id`` up to which no message is missing, or ``None``.

        A reconnection re-joins from here, so a message lost on the way is
        recovered even when later ones arrived.

        Example::

            assert client.contiguous_seq(rid) == client.last_seq(rid)   # no hole left
        """
        return self._ledger.contiguous_seq(str(room_id))

    # -------------------------------------------------------------- lifecycle

    async def connect(self) -> dict[str, Any]:
        """Open the socket and return the ``system:welcome`` data.

        Raises :class:`ClientError` (with ``close_code``) when the server
        answers with ``system:error`` and closes (bad token: ``UNAUTHORIZED``,
        4401), :class:`HandshakeError` when the upgrade is refused,
        :class:`ConnectionClosed` when the socket closes without a frame,
        :class:`TimeoutError` when no welcome arrives within ``connect_timeout``
        and :class:`OSError` when nothing listens.

        Example::

            welcome = await Client(url, token).connect()
            print(welcome["connectionId"], welcome["userId"])
        """
        if self._started:
            raise RuntimeError("Client.connect() can only be called once per Client")
        self._started = True
        try:
            conn, welcome, early = await self._open()
        except ClientError as exc:
            self._finish(exc.close_code, exc.close_reason)
            raise
        except ConnectionClosed as exc:
            self._finish(exc.code, exc.reason)
            raise
        except BaseException:
            self._finish(None, None)
            raise
        self._attach(conn, welcome, early)
        return welcome

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Start closing the connection (and stop reconnecting); idempotent.

        Pair with :meth:`wait_closed`, or use :meth:`aclose`.

        Example::

            client.close()
            code, reason = await client.wait_closed()
        """
        if self._finished or self._closing:
            return
        self._closing = True
        self._sent_close = (code, reason)
        if self._reconnect_task is not None and not self._reconnect_task.done():
            self._reconnect_task.cancel()
        conn = self._conn
        if conn is None:
            self._finish(code if self._started else None, reason)
            return
        try:
            conn.close(code, reason)
        except Exception:
            log.exception("switchboard client %s: error while closing", self.url)
            self._connection_lost(conn)

    async def wait_closed(
        self,
        timeout: float | None = 5.0,
    ) -> tuple[int | None, str | None]:
        """Wait until the client is closed for good; return ``(close_code, close_reason)``.

        Raises :class:`TimeoutError` if that does not happen within ``timeout``.

        Example::

            code, _ = await client.wait_closed()   # e.g. after the server kicked us
            assert code == 4403
        """
        async with asyncio.timeout(timeout):
            while not self._finished and self._started:
                await self._wait_for_change()
            tasks = {
                task
                for task in (self._reader_task, self._reconnect_task)
                if task is not None and not task.done() and task is not asyncio.current_task()
            }
            if tasks:
                await asyncio.wait(tasks)
        return self._close_code, self._close_reason

    async def aclose(
        self,
        code: int = 1000,
        reason: str | None = None,
        timeout: float | None = 5.0,
    ) -> tuple[int | None, str | None]:
        """:meth:`close`, :meth:`wait_closed`, then cancel leftover async callbacks.

        Example::

            await client.aclose()
        """
        self.close(code, reason)
        try:
            return await self.wait_closed(timeout)
        finally:
            for task in list(self._handler_tasks):
                task.cancel()
            if self._handler_tasks:
                await asyncio.wait(list(self._handler_tasks), timeout=1.0)

    async def __aenter__(self) -> Client:
        if not self._started:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- sending

    async def emit(
        self,
        event: str,
        data: Any = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send ``event`` with a fresh ack id and return the ack's ``data``.

        Raises :class:`ClientError` for ``ok: false`` acks,
        :class:`ConnectionClosed` if the socket closes first and
        :class:`TimeoutError` after ``timeout`` (default ``ack_timeout``).
        Successful ``room:join``/``room:leave`` calls are remembered for
        reconnection, and message ``seq`` numbers in acks are tracked.

        Example::

            ack = await client.emit("message:send", {"roomId": rid, "content": "hi"})
            print(ack["message"]["seq"])
        """
        payload = {} if data is None else data
        result = await self._request(self._require_conn(), event, payload, timeout)
        for frame in self._ledger.track_ack(event, payload, result):
            self._deliver(frame)
        if event == "room:leave" and isinstance(payload, dict):
            self._cancel_repair(str(payload.get("roomId")))
        return result

    async def send(self, event: str, data: Any = None) -> None:
        """Send ``event`` without an ack id (errors come back as ``system:error``).

        Example::

            await client.send("typing:start", {"roomId": rid})
        """
        conn = self._require_conn()
        await self._write(conn, {"event": event, "data": {} if data is None else data})

    async def send_raw(self, payload: str | bytes, *, binary: bool = False) -> None:
        """Send ``payload`` verbatim as one text (or, with ``binary``, binary) frame.

        Example::

            await client.send_raw("{not json")
            error = await client.next_event("system:error")
        """
        conn = self._require_conn()
        try:
            await conn.write_message(payload, binary=binary)
        except (WebSocketClosedError, StreamClosedError) as exc:
            raise ConnectionClosed(conn.close_code, conn.close_reason) from exc

    async def refresh_token(
        self,
        token: str,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send ``auth:refresh`` and, on success, use ``token`` for reconnections too.

        Example::

            await client.next_event("auth:expiring")
            await client.refresh_token(new_token)
        """
        result = await self.emit("auth:refresh", {"token": token}, timeout=timeout)
        self.token = token
        return result

    # ----------------------------------------------------------------- events

    def on(self, event: str, callback: EventCallback) -> EventCallback:
        """Call ``callback(frame)`` for each ``event`` frame (``"*"``: every event).

        ``callback`` may be sync or async; exceptions are logged, not raised.
        Returns ``callback`` so it can be passed to :meth:`off` later.

        Example::

            client.on("message:new", lambda frame: print(frame["data"]["message"]))
        """
        self._handlers.setdefault(event, []).append(callback)
        return callback

    def off(self, event: str, callback: EventCallback | None = None) -> None:
        """Remove ``callback`` (or, without one, every callback) for ``event``.

        Example::

            client.off("message:new", printer)
        """
        if callback is None:
            self._handlers.pop(event, None)
            return
        callbacks = self._handlers.get(event, [])
        with contextlib.suppress(ValueError):
            callbacks.remove(callback)
        if not callbacks:
            self._handlers.pop(event, None)

    async def next_event(
        self,
        name: str | None = None,
        timeout: float | None = 5.0,
        predicate: Predicate | None = None,
    ) -> Frame:
        """Remove and return the oldest buffered event frame matching ``name``/``predicate``.

        Non-matching frames stay buffered for later calls. Waits up to
        ``timeout`` seconds (:class:`TimeoutError`); raises
        :class:`ConnectionClosed` once the client is closed for good and no
        buffered frame matches.

        Example::

            frame = await client.next_event(
                "message:new", predicate=lambda f: f["data"]["message"]["roomId"] == rid
            )
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = self._take(name, predicate)
                    if frame is not None:
                        return frame
                    if self._finished:
                        raise ConnectionClosed(self._close_code, self._close_reason)
                    await self._wait_for_change()
        except TimeoutError:
            buffered = [frame.get("event") for frame in self._buffer]
            raise TimeoutError(
                f"no {name or 'event'!r} frame{' matching predicate' if predicate else ''} "
                f"within {timeout}s on {self.url}; buffered: {buffered}"
            ) from None

    def buffered(self, name: str | None = None, predicate: Predicate | None = None) -> list[Frame]:
        """The buffered event frames matching ``name``/``predicate``, oldest first.

        Nothing is consumed: :meth:`next_event` still returns them.

        Example::

            await client.emit("system:ping")   # everything sent before the pong is here
            assert not client.buffered("message:new")
        """
        return [frame for frame in self._buffer if self._matches(frame, name, predicate)]

    def drain_events(self, name: str | None = None) -> list[Frame]:
        """Remove and return every buffered frame (or every ``name`` frame).

        Example::

            client.drain_events()   # forget the join noise before the real test
        """
        taken = [f for f in self._buffer if name is None or f.get("event") == name]
        self._buffer = [f for f in self._buffer if not (name is None or f.get("event") == name)]
        return taken

    async def iter_events(self, name: str | None = None) -> AsyncIterator[Frame]:
        """Yield buffered event frames as they arrive until the client closes for good.

        Example::

            async for frame in client.iter_events():
                print(frame["event"], frame["data"])
        """
        while True:
            try:
                frame = await self.next_event(name, timeout=None)
            except ConnectionClosed:
                return
            yield frame

    # ---------------------------------------------------------------- internals

    def _require_conn(self) -> WebSocketClientConnection:
        conn = self._conn
        if conn is None or self._closing:
            raise ConnectionClosed(self._close_code, self._close_reason)
        return conn

    def _build_request(self) -> HTTPRequest:
        url = self.url
        headers = HTTPHeaders()
        for key, value in self.headers.items():
            headers[key] = value
        if self.origin is not None:
            headers["Origin"] = self.origin
        token = self.token
        if token:
            if self.token_in == "header":
                headers["Authorization"] = f"Bearer {token}"
            elif self.token_in == "frame":
                pass  # sent by _open once the socket is up
            elif self.token_in == "query":
                parts = urlsplit(url)
                query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
                query = [(k, v) for k, v in query if k != "token"] + [("token", token)]
                url = urlunsplit(parts._replace(query=urlencode(query)))
            else:
                cookie = f"access_token={token}"
                existing = headers.get("Cookie")
                headers["Cookie"] = f"{existing}; {cookie}" if existing else cookie
        return HTTPRequest(
            url,
            headers=headers,
            connect_timeout=self.connect_timeout,
            request_timeout=self.connect_timeout,
        )

    async def _open(self) -> tuple[WebSocketClientConnection, dict[str, Any], list[Frame]]:
        """Connect and read up to the welcome frame (nothing is attached yet)."""
        request = self._build_request()
        try:
            conn = await websocket_connect(
                request,
                max_message_size=self.max_message_size,
                ping_interval=self.ping_interval,
            )
        except StreamClosedError as exc:
            raise ConnectionClosed(None, "connection lost during handshake") from exc
        except HTTPTimeoutError as exc:
            raise TimeoutError(f"WebSocket handshake with {self.url} timed out") from exc
        except HTTPClientError as exc:
            raise HandshakeError(exc.code, str(exc)) from exc
        except WebSocketError as exc:
            raise HandshakeError(None, str(exc)) from exc
        try:
            if self.token and self.token_in == "frame":
                await self._write(conn, {"event": "auth:connect", "data": {"token": self.token}})
            welcome, early = await self._await_welcome(conn)
        except BaseException:
            conn.close()
            raise
        return conn, welcome, early

    async def _await_welcome(
        self, conn: WebSocketClientConnection
    ) -> tuple[dict[str, Any], list[Frame]]:
        early: list[Frame] = []
        try:
            async with asyncio.timeout(self.connect_timeout):
                while True:
                    raw = await conn.read_message()
                    if raw is None:
                        raise ConnectionClosed(conn.close_code, conn.close_reason)
                    frame = self._parse(raw)
                    if frame is None:
                        continue
                    name = frame.get("event")
                    if name == "system:welcome":
                        data = frame.get("data")
                        return (data if isinstance(data, dict) else {}), early
                    if name == "system:error":
                        error = ClientError.from_payload(frame.get("data"))
                        break
                    if isinstance(name, str):
                        early.append(frame)
                    else:
                        log.warning(
                            "switchboard client %s: unexpected frame before welcome: %s",
                            self.url,
                            preview(raw),
                        )
        except TimeoutError:
            raise TimeoutError(
                f"no system:welcome from {self.url} within {self.connect_timeout}s"
            ) from None
        # A system:error during the handshake precedes a close; report its code.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self.connect_timeout, _CLOSE_WAIT_SECS)):
                while await conn.read_message() is not None:
                    pass
        error.close_code, error.close_reason = conn.close_code, conn.close_reason
        raise error

    def _attach(
        self, conn: WebSocketClientConnection, welcome: dict[str, Any], early: list[Frame]
    ) -> None:
        if conn.protocol is not None:
            conn.protocol.set_nodelay(True)  # small interactive frames: no Nagle delay
        self._conn = conn
        self.welcome = welcome
        for frame in early:
            self._on_event(frame)
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(conn), name=f"switchboard-client-reader {self.url}"
        )

    async def _read_loop(self, conn: WebSocketClientConnection) -> None:
        try:
            while True:
                raw = await conn.read_message()
                if raw is None:
                    break
                try:
                    self._handle_raw(raw)
                except Exception:
                    log.exception(
                        "switchboard client %s: failed to handle frame %s", self.url, preview(raw)
                    )
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:
            log.exception("switchboard client %s: reader crashed; dropping connection", self.url)
        try:
            self._connection_lost(conn)
        except Exception:
            log.exception("switchboard client %s: error handling connection loss", self.url)

    def _parse(self, raw: str | bytes) -> Frame | None:
        try:
            frame = loads(raw)
        except ValueError:
            log.warning("switchboard client %s: non-JSON frame: %s", self.url, preview(raw))
            return None
        if not isinstance(frame, dict):
            log.warning("switchboard client %s: non-object frame: %s", self.url, preview(raw))
            return None
        return frame

    def _handle_raw(self, raw: str | bytes) -> None:
        frame = self._parse(raw)
        if frame is None:
            return
        if isinstance(frame.get("event"), str):
            self._on_event(frame)
        elif "ack" in frame:
            self._on_ack(frame)
        else:
            log.warning("switchboard client %s: unrecognised frame: %s", self.url, preview(raw))

    def _on_ack(self, frame: Frame) -> None:
        ack_id = as_int(frame.get("ack"))
        entry = self._pending.get(ack_id) if ack_id is not None else None
        if entry is None:
            log.debug("switchboard client %s: ack %r matches no pending request", self.url, ack_id)
            return
        event, future = entry
        if future.done():
            return
        if frame.get("ok") is True:
            data = frame.get("data")
            future.set_result({} if data is None else data)
        else:
            future.set_exception(ClientError.from_payload(frame.get("error"), event=event))

    def _on_event(self, frame: Frame) -> None:
        name = frame["event"]
        data = frame.get("data")
        if name == "message:new" and isinstance(data, dict):
            message = data.get("message")
            if isinstance(message, dict):
                self._receive(frame, message)
                return
        elif name == "room:deleted" and isinstance(data, dict) and "roomId" in data:
            self._ledger.forget(str(data["roomId"]))
            self._cancel_repair(str(data["roomId"]))
        elif name == "room:resync" and isinstance(data, dict) and "roomId" in data:
            self._start_resync(data["roomId"])
        self._deliver(frame)

    def _receive(self, frame: Frame, message: dict[str, Any]) -> None:
        """A live ``message:new``: deliver in ``seq`` order, holding it back behind a gap."""
        for ready in self._ledger.receive(frame, message):
            self._deliver(ready)
        room = str(message.get("roomId"))
        held = self._ledger.held_count(room)
        if held:
            self._schedule_repair(room, 0.0 if held >= MAX_HELD else self.hole_wait)
        else:
            self._cancel_repair(room)

    def _deliver(self, frame: Frame) -> None:
        if self.keep_history:
            self.events.append(frame)
        if self.buffer_events:
            self._buffer.append(frame)
            self._notify()
        name = frame["event"]
        for callback in [*self._handlers.get(name, ()), *self._handlers.get("*", ())]:
            try:
                result = callback(frame)
            except Exception:
                log.exception(
                    "switchboard client %s: %r callback %r failed", self.url, name, callback
                )
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._handler_tasks.add(task)
                task.add_done_callback(
                    functools.partial(self._handler_done, event=name, callback=callback)
                )

    def _handler_done(
        self, task: asyncio.Future[Any], *, event: str, callback: EventCallback
    ) -> None:
        self._handler_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "switchboard client %s: async %r callback %r failed",
                self.url,
                event,
                callback,
                exc_info=exc,
            )

    def _emit_local(self, name: str, data: dict[str, Any]) -> None:
        self._deliver({"event": name, "data": data})

    def _take(self, name: str | None, predicate: Predicate | None) -> Frame | None:
        for index, frame in enumerate(self._buffer):
            if self._matches(frame, name, predicate):
                del self._buffer[index]
                return frame
        return None

    @staticmethod
    def _matches(frame: Frame, name: str | None, predicate: Predicate | None) -> bool:
        if name is not None and frame.get("event") != name:
            return False
        return predicate is None or bool(predicate(frame))

    async def _wait_for_change(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(future)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _write(self, conn: WebSocketClientConnection, frame: Frame) -> None:
        try:
            await conn.write_message(dumps(frame))
        except (WebSocketClosedError, StreamClosedError) as exc:
            raise ConnectionClosed(conn.close_code, conn.close_reason) from exc

    async def _request(
        self,
        conn: WebSocketClientConnection,
        event: str,
        data: Any,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        self._last_ack_id += 1
        ack_id = self._last_ack_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ack_id] = (event, future)
        limit = self.ack_timeout if timeout is None else timeout
        try:
            await self._write(conn, {"event": event, "data": data, "ack": ack_id})
            async with asyncio.timeout(limit):
                result: dict[str, Any] = await future
            return result
        except TimeoutError:
            raise TimeoutError(
                f"no ack for {event!r} (ack {ack_id}) from {self.url} within {limit}s"
            ) from None
        finally:
            self._pending.pop(ack_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # mark retrieved
            else:
                future.cancel()

    # ------------------------------------------------------------- hole repair

    def _schedule_repair(self, room: str, delay: float) -> None:
        timer = self._repair_timers.get(room)
        if timer is not None:
            if delay > 0:
                return  # the first message after the gap set the clock
            timer.cancel()
        self._repair_timers[room] = asyncio.get_running_loop().call_later(
            delay, self._start_repair, room
        )

    def _cancel_repair(self, room: str) -> None:
        timer = self._repair_timers.pop(room, None)
        if timer is not None:
            timer.cancel()

    def _start_repair(self, room: str) -> None:
        self._repair_timers.pop(room, None)
        if room in self._repairing:
            return  # the running repair looks at the room again when it ends
        self._spawn_repair(self._repair(room), f"switchboard-client-repair {room}")

    async def _repair(self, room: str) -> None:
        """Fetch every message missing below the highest held one; deliver all in order."""
        conn = self._conn
        hole = self._ledger.gap(room)
        if conn is None or hole is None:
            return
        top, since, held = hole
        found: list[dict[str, Any]] = []
        self._repairing.add(room)
        try:
            await page_history(functools.partial(self._request, conn), room, since, top, found)
        except ConnectionClosed:
            return  # the re-join recovers from the contiguous seq
        except (ClientError, TimeoutError) as exc:
            # Refused (left the room, rate limited) or slow: deliver what is
            # held rather than stall the room.
            log.warning("switchboard client %s: repairing room %s: %s", self.url, room, exc)
        finally:
            self._repairing.discard(room)
        if conn is not self._conn:
            return
        for frame in self._ledger.repaired(room, held, top, found) or ():
            self._deliver(frame)
        if self._ledger.held_count(room):
            self._schedule_repair(room, self.hole_wait)

    def _start_resync(self, room_id: Any) -> None:
        room = str(room_id)
        if not self._ledger.repair or self._conn is None or self._ledger.payload(room) is None:
            return
        self._spawn_repair(
            self._resync(self._conn, room, room_id), f"switchboard-client-resync {room}"
        )

    def _spawn_repair(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` (a repair or resync) as a task the client holds until it ends."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._repair_tasks.add(task)
        task.add_done_callback(self._repair_tasks.discard)

    async def _resync(self, conn: WebSocketClientConnection, room: str, room_id: Any) -> None:
        """``room:resync``: the server's catch-up stopped at its bound; fetch the rest now.

        Without this the rest would come with the room's next message (hole
        repair), which in a quiet room may be much later.
        """
        try:
            await self._recover(
                conn, room, {"roomId": room_id}, self._ledger.since(room), {"recovered": False}
            )
        except (ConnectionClosed, TimeoutError) as exc:
            # Lost: the re-join recovers from the contiguous seq. Slow: the
            # next message's hole repair will try again.
            log.info("switchboard client %s: resync of room %s: %r", self.url, room, exc)

    # ------------------------------------------------------------- reconnection

    def _connection_lost(self, conn: WebSocketClientConnection) -> None:
        conn.close()  # releases tornado's protocol object (no-op on the wire by now)
        if conn is not self._conn:
            return
        self._conn = None
        code, reason = conn.close_code, conn.close_reason
        if self._closing and self._sent_close is not None:
            # Servers echo our close code but usually not the reason.
            sent_code, sent_reason = self._sent_close
            code = sent_code if code is None else code
            reason = sent_reason if reason is None else reason
        self._close_code, self._close_reason = code, reason
        # Held messages come back with the re-join's recovery from the contiguous seq.
        self._ledger.drop_held()
        for room in list(self._repair_timers):
            self._cancel_repair(room)
        error = ConnectionClosed(code, reason)
        for _event, future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)
        will_reconnect = self.reconnect and not self._closing and code not in FATAL_CLOSE_CODES
        if self.reconnect and not self._closing:
            log.info(
                "switchboard client %s: connection lost (code=%s, reason=%r)%s",
                self.url,
                code,
                reason,
                "; reconnecting" if will_reconnect else "",
            )
            self._emit_local(
                "client:disconnected",
                {"code": code, "reason": reason, "willReconnect": will_reconnect},
            )
        if self._finished:
            return  # a client:disconnected callback closed the client
        if not will_reconnect or self._closing:
            self._finish(code, reason)
        elif self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(), name=f"switchboard-client-reconnect {self.url}"
            )
        else:
            self._notify()  # the running reconnect loop will retry

    def _finish(self, code: int | None, reason: str | None) -> None:
        self._finished = True
        self._conn = None
        for room in list(self._repair_timers):
            self._cancel_repair(room)
        for repair in list(self._repair_tasks):
            if repair is not asyncio.current_task():
                repair.cancel()
        if code is not None or reason is not None:
            self._close_code, self._close_reason = code, reason
        task = self._reconnect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._notify()

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.max_backoff, _BACKOFF_START_SECS * (2 ** min(attempt, 30)))
        return self._rng.uniform(ceiling / 2, ceiling)

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while not self._closing and not self._finished:
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            if self._closing or self._finished:
                return
            try:
                conn, welcome, early = await self._open()
            except ClientError as exc:
                if exc.close_code in FATAL_CLOSE_CODES:
                    log.warning(
                        "switchboard client %s: reconnection refused (%s, close %s); giving up",
                        self.url,
                        exc.code,
                        exc.close_code,
                    )
                    self._emit_local(
                        "client:reconnect_failed",
                        {
                            "code": exc.code,
                            "message": exc.message,
                            "closeCode": exc.close_code,
                            "attempts": attempt,
                        },
                    )
                    self._finish(exc.close_code, exc.close_reason)
                    return
                log.info("switchboard client %s: reconnect attempt %d: %s", self.url, attempt, exc)
                continue
            except (OSError, ConnectionClosed, TimeoutError) as exc:
                log.info("switchboard client %s: reconnect attempt %d: %r", self.url, attempt, exc)
                continue
            except Exception:
                log.exception(
                    "switchboard client %s: reconnect attempt %d failed", self.url, attempt
                )
                continue
            if self._closing or self._finished:
                conn.close()
                return
            self._attach(conn, welcome, early)
            try:
                report = await self._rejoin(conn)
            except ConnectionClosed:
                continue
            except TimeoutError as exc:
                log.warning("switchboard client %s: re-joining rooms: %s", self.url, exc)
                report = {}
            if self._conn is not conn:
                continue  # lost again while re-joining; the reader already reported it
            self.reconnects += 1
            log.info("switchboard client %s: reconnected after %d attempt(s)", self.url, attempt)
            self._emit_local(
                "client:reconnected",
                {"attempts": attempt, "welcome": welcome, "rooms": report},
            )
            return

    async def _rejoin(self, conn: WebSocketClientConnection) -> dict[str, Any]:
        """Bring every joined room back: one ``room:resume`` per 500 rooms with an epoch,
        ``room:join`` per room for the others and on gateways without ``room:resume``."""
        report: dict[str, Any] = {}
        joins = self._ledger.joins()
        for room_key, _ in joins:
            self._ledger.hold(room_key)
        try:
            single = [(key, payload) for key, payload in joins if self._ledger.epoch(key) is None]
            resumable = [join for join in joins if self._ledger.epoch(join[0]) is not None]
            for start in range(0, len(resumable), MAX_RESUME_ROOMS):
                chunk = resumable[start : start + MAX_RESUME_ROOMS]
                single += await self._resume(conn, chunk, report)
            for room_key, payload in single:
                fresh = report.get(room_key, {}).get("reset", False)
                report[room_key] = {
                    **report.get(room_key, {}),
                    **await self._rejoin_room(conn, room_key, payload, fresh=fresh),
                }
        finally:
            # Live frames that arrived meanwhile: now, after the recovered ones
            # (those among them are dropped as already delivered).
            for room_key, _ in joins:
                for frame in self._ledger.release(room_key):
                    self._receive(frame, frame["data"]["message"])
        return report

    async def _resume(
        self,
        conn: WebSocketClientConnection,
        joins: list[tuple[str, dict[str, Any]]],
        report: dict[str, Any],
    ) -> list[tuple[str, dict[str, Any]]]:
        """One ``room:resume`` for ``joins``; returns the rooms to re-join one by one."""
        # From the highest contiguous seq, not the highest seen: a message lost
        # before the connection dropped is recovered with the rest.
        since = {key: self._ledger.since(key) for key, _ in joins}
        entries = [
            {"roomId": payload["roomId"], "sinceSeq": since[key], "epoch": self._ledger.epoch(key)}
            for key, payload in joins
        ]
        try:
            result = await self._request(conn, "room:resume", {"rooms": entries})
        except ClientError as exc:
            # An older gateway (UNKNOWN_EVENT), or refused as a whole: room by room.
            log.info("switchboard client %s: room:resume: %s; re-joining", self.url, exc)
            return joins
        payloads = dict(joins)
        again = []
        for answer in result.get("rooms") or []:
            room_key = str(answer.get("roomId")) if isinstance(answer, dict) else ""
            payload = payloads.get(room_key)
            if payload is None:
                continue
            status = answer.get("status")
            if status == "resumed":
                report[room_key] = await self._recover(conn, room_key, payload, since[room_key],
                                                       answer)  # fmt: skip
            elif status == "reset":
                # Another history under this id: nothing held of it is valid.
                self._ledger.reset(room_key)
                self._emit_local("client:room_reset", {"roomId": payload["roomId"]})
                report[room_key] = {"reset": True}
                again.append((room_key, payload))
            else:
                code = "ROOM_NOT_FOUND" if status == "gone" else "ROOM_ACCESS_DENIED"
                error = ClientError(code, f"room:resume answered {status}",
                                    {"roomId": payload["roomId"]})  # fmt: skip
                report[room_key] = self._rejoin_failed(room_key, payload, error)
        return again

    async def _rejoin_room(
        self,
        conn: WebSocketClientConnection,
        room_key: str,
        payload: dict[str, Any],
        *,
        fresh: bool = False,
    ) -> dict[str, Any]:
        """``room:join`` again: from the contiguous seq, or ``fresh`` (the room was reset)."""
        since = self._ledger.since(room_key)
        request = payload if fresh else {**payload, "sinceSeq": since}
        try:
            result = await self._request(conn, "room:join", request)
        except ClientError as exc:
            return self._rejoin_failed(room_key, payload, exc)
        if fresh:
            self._ledger.track_ack("room:join", payload, result)
            return {"rejoined": True, "recovered": False, "missed": 0}
        self._ledger.keep_epoch(room_key, result.get("room"))
        return await self._recover(conn, room_key, payload, since, result)

    def _rejoin_failed(
        self, room_key: str, payload: dict[str, Any], exc: ClientError
    ) -> dict[str, Any]:
        log.warning("switchboard client %s: could not re-join room %s: %s", self.url, room_key, exc)
        self._ledger.forget(room_key)
        self._emit_local(
            "client:rejoin_failed",
            {
                "roomId": payload["roomId"],
                "error": {"code": exc.code, "message": exc.message, "details": exc.details},
            },
        )
        return {"rejoined": False, "error": exc.code}

    async def _recover(
        self,
        conn: WebSocketClientConnection,
        room_key: str,
        payload: dict[str, Any],
        since: int,
        result: dict[str, Any],
    ) -> dict[str, Any]:
        """Deliver a re-join's or resume's ``missed`` (paging history beyond it), oldest first."""
        missed = [m for m in result.get("missed") or [] if isinstance(m, dict)]
        complete = result.get("recovered") is not False
        if not complete:
            try:
                request = functools.partial(self._request, conn)
                missed += await page_history(request, payload["roomId"], since)
                complete = True
            except ClientError as exc:
                log.warning(
                    "switchboard client %s: paging history of room %s: %s",
                    self.url,
                    room_key,
                    exc,
                )
        fresh = self._ledger.recovered(missed)
        for frame in [*fresh, *self._ledger.advance(room_key)]:
            self._deliver(frame)
        return {"rejoined": True, "recovered": complete, "missed": len(fresh)}


async def connect(url: str, token: str | None = None, **kwargs: Any) -> Client:
    """Create a :class:`Client` with ``kwargs`` and connect it.

    Example::

        client = await connect("ws://127.0.0.1:8080/ws/chat", token, reconnect=True)
    """
    client = Client(url, token, **kwargs)
    await client.connect()
    return client
