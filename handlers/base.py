"""The base WebSocket handler every namespace shares.

It owns the mechanics once: authentication at connect (a handshake token,
or an ``auth:connect`` first frame when the handshake has none; the rules
themselves are :class:`server.services.admission.Admission`'s), role checks, the
envelope, dispatch of ``"room:join"`` to ``on_room_join`` with the data
loaded by the event's marshmallow schema, acks and errors, rate limits,
bad-frame accounting, heartbeat bookkeeping, token expiry, and clean-up on
close. A namespace subclass declares its ``namespace``, ``allowed_roles``,
``schemas`` and ``rate_classes`` and implements ``on_<event>`` methods
returning the ack data. Its dependencies arrive as one
:class:`handlers.deps.Deps` (the route's only ``initialize()`` argument).

Example::

    class EchoHandler(GatewayHandler):
        namespace = "echo"
        schemas = {"echo:say": SaySchema}

        async def on_echo_say(self, text: str) -> dict:
            return {"text": text}

Work that must follow the ack on the wire (never precede it) is returned
with the ack data as a :class:`Reply`: its ``after_ack`` runs once the ack
is queued. ``room:join`` releases the frames held back during the join this
way, since they carry later sequence numbers than the history in the ack::

        async def on_room_join(self, room_id: str, ...) -> Reply:
            self.hub.join(self, room_id, buffer=True)
            result = ...  # history up to seq `last`
            return Reply(result, lambda: self.hub.finish_join(self, room_id, last))

An event listed in ``early_acks`` hands its method an :class:`EarlyAck` as
``answer``: the method may write the frame's ack from a callback that runs
before its task resumes (``message:send`` acks from the group-commit
batcher's callback, in the iteration that learns of the commit)::

        early_acks = frozenset({"message:send"})

        async def on_message_send(self, ..., answer: EarlyAck) -> dict:
            return await self.messages.send(..., answer=answer)

It may even let the ack leave from the database thread, right after the
commit (:meth:`EarlyAck.lend`, then :meth:`EarlyAck.from_writer` there; see
:class:`~server.realtime.outbound.Outbound`)::

            return await self.messages.send(..., answer=answer, answer_now=answer)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from marshmallow import Schema
from prometheus_client import Histogram
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.util import (
    ObjectDict,
    _websocket_mask,  # the C helper tornado's own reader uses
)
from tornado.websocket import (
    WebSocketClosedError,
    WebSocketHandler,
    WebSocketProtocol,
    WebSocketProtocol13,
)

from handlers.schemas import AuthRefresh, Ping, load
from models import chat as chat_db
from server.core import errors, protocol
from server.core.auth import Identity
from server.realtime.hub import Target
from server.realtime.outbound import SLOW_CONSUMER_CLOSE_GRACE_SECS, Outbound
from server.services.admission import Seat, expiry_delays, handshake_token, require_roles
from server.services.connection_list import clean_user_agent

if TYPE_CHECKING:
    from handlers.deps import Deps

log = logging.getLogger("switchboard.ws")

# A client sending this many bad frames within the window is closed with 4400.
BAD_FRAME_LIMIT = 20
BAD_FRAME_WINDOW_SECS = 10.0
#: The first frame of a connection whose handshake carried no token.
AUTH_CONNECT_EVENT = "auth:connect"
# An auth frame is a token in an envelope; a first frame larger than this is
# refused unparsed (4401) rather than decoded for a peer nobody knows yet.
MAX_AUTH_FRAME_BYTES = 16 * 1024


class ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """The handler's logger: records carry ``connection_id`` and ``user_id``.

    Pass the event, when there is one, as ``extra={"event": name}``; the JSON
    log format (``SWITCHBOARD_LOG_FORMAT=json``) prints all three as fields.

    Example::

        self.log.info("joined %s", room_id, extra={"event": "room:join"})
    """

    def __init__(self, logger: logging.Logger, handler: GatewayHandler) -> None:
        super().__init__(logger)
        self.handler = handler

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        # Read at each call: the user id is known only once the token is checked.
        context = {"connection_id": self.handler.conn_id, "user_id": self.handler.user_id}
        kwargs["extra"] = {**context, **(kwargs.get("extra") or {})}
        return msg, kwargs


@dataclass(frozen=True, slots=True)
class Reply:
    """An ``on_<event>`` result with work to run right after its ack is queued.

    ``after_ack`` also runs when the frame asked for no ack; it does not run
    when the handler raised. See the module docstring for an example.
    """

    data: dict[str, Any]
    after_ack: Callable[[], object]


class EarlyAck:
    """The ack of the frame being handled, for its method to write before it returns.

    Called with the ack's data, it writes the ack (when the frame asked for
    one) at once, from wherever it is called -- a callback on the loop, ahead
    of the method's task -- and counts the event's duration and latency
    there, as :meth:`GatewayHandler.handle_envelope` counts them at the ack.
    ``handle_envelope`` then neither acks nor counts the frame again, and
    answers an error raised afterwards only in the log. Never called, the
    frame is answered from the method's result as any other. A second call
    is ignored: a frame has one answer.

    The ack may leave from the database thread instead, right after the
    commit: lent the connection on the loop first (:meth:`lend`), the
    database thread writes it (:meth:`from_writer`), and the call on the
    loop then only counts it (the thread holds the loan's lock from before
    the commit's outcome crosses to the loop until its write is done, and
    the call waits for it). Whatever ends the frame's handling ends the
    loan (:meth:`release`).
    """

    __slots__ = ("_ack", "_duration", "_handler", "_started", "given", "lent", "written")

    def __init__(
        self, handler: GatewayHandler, ack: int | None, started: float, duration: Histogram
    ) -> None:
        self._handler = handler
        self._ack = ack
        self._started = started
        self._duration = duration
        #: The ack went out (or, with no ack asked for, the frame was answered).
        self.given = False
        #: The connection is lent to the database thread (:meth:`lend`).
        self.lent = False
        #: Bytes of the ack the database thread wrote (0: none), set under the loan's lock.
        self.written = 0

    def __call__(self, data: dict[str, Any]) -> None:
        if self.given:
            return
        self.given = True
        handler = self._handler
        self.release()  # the thread wrote the ack by now, or never will
        if self.written:
            handler.metrics.frames_sent.inc()
            handler.metrics.bytes_sent.inc(self.written)
        elif self._ack is not None:
            handler.send_soon(protocol.ack_payload(self._ack, data))
        handler.count_answer(self._duration, self._started)

    def lend(self) -> None:
        """On the loop, before the request leaves: let :meth:`from_writer` write the ack."""
        if self._ack is not None and not self.lent:
            self.lent = self._handler.outbound.lend(self)

    def from_writer(self, data: dict[str, Any]) -> Callable[[], object] | None:
        """On the database thread, once committed: hold the loan to write the ack.

        Returns the write, to run once the outcome crossed to the loop (see
        :meth:`Outbound.write_from_thread`), or None. Counted and marked
        given on the loop, when this is called there.
        """
        if self._ack is None:
            return None
        frame = protocol.frame(protocol.ack_payload(self._ack, data))
        return self._handler.outbound.write_from_thread(frame, self, self._wrote)

    def _wrote(self, size: int) -> None:
        self.written = size

    def release(self) -> None:
        """On the loop: end the loan, if any (see :meth:`Outbound.release`)."""
        if self.lent:
            self.lent = False
            self._handler.outbound.release(self)


#: Most bytes one read of a connection's socket takes (tornado's read chunk size).
READ_CHUNK_BYTES = 64 * 1024
#: Tornado's fairness rule for a peer that keeps its socket full (tornado.websocket):
#: yield to the loop after this many bytes, each frame counting as this many more.
_YIELD_THRESHOLD = 256 * 1024
_FRAME_YIELD_COST = 1024

#: An open connection's template namespace: a WebSocket renders no templates.
_NO_UI = ObjectDict()


class _DetachedReceive(WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, with a frame reader of its own run as a task of its own.

    *A task of its own.* Tornado awaits the frame loop at the bottom of the
    handshake's coroutines (``RequestHandler._execute`` -> ``get`` ->
    ``accept_connection`` -> ``_accept_connection`` -> the loop), so every
    open connection kept five suspended coroutines, their task and callbacks
    (~1.9 KB, bench.idle --types). Started apart, the handshake's coroutines
    finish once the socket is open and only the reader waits for the peer.
    ``_receive_frame_loop`` is the abstract method of tornado's
    ``WebSocketProtocol`` that a protocol implements.

    *A reader of its own.* Tornado reads a frame with three or four
    ``read_bytes`` (header, length, mask, payload), each a future and a pass
    through the stream's buffer: ~120 µs of a lone ``message:send`` on a cold
    core (bench.stages, ``readable`` -> ``frame``). :meth:`_read_frames` takes
    what the socket has in one read and cuts every complete frame out of it,
    with tornado's rules (below). A text message goes to ``on_message``
    awaited in this task (:meth:`_on_text`, no task per message); binary,
    close, ping and pong frames to tornado's ``_handle_message``. Each is
    done before the next, so a connection's frames are handled one at a
    time, in order, as before. With compression negotiated (the gateway never offers
    it) tornado's own loop runs instead. tests/test_frames.py holds the
    rules; tests/test_idle_memory.py fails if tornado stops calling the loop
    this way.
    """

    def _write_frame(
        self, fin: bool, opcode: int, data: bytes, flags: int = 0
    ) -> asyncio.Future[None]:
        """Tornado's frame writer (pings, pongs, close frames), in turn with the database thread.

        While the connection is lent (:meth:`server.realtime.outbound.Outbound.lend`),
        a control frame must not go out in the middle of the ack that thread
        writes; tornado writes them here, its one frame writer (a private
        method: tests/test_direct_ack.py fails if tornado stops using it).
        """
        write = super()._write_frame
        handler = self.handler
        if not isinstance(handler, GatewayHandler):
            return write(fin, opcode, data, flags)
        return handler.outbound.in_turn(lambda: write(fin, opcode, data, flags))

    async def _receive_frame_loop(self) -> None:
        handler = self.handler
        assert isinstance(handler, GatewayHandler)
        reader = super()._receive_frame_loop() if self._decompressor else self._read_frames()
        # A strong reference (the event loop holds tasks weakly), on the
        # handler: a 30th attribute would cost this object a dict of its own.
        handler._receiving = asyncio.ensure_future(reader)

    async def _read_frames(self) -> None:
        """Frames as they come, each complete message handled before the next is cut.

        Tornado's rules, kept: reserved bits set (no extension is
        negotiated), a control frame that is fragmented or over 125 bytes, a
        continuation with nothing to continue, a new message inside a
        fragmented one: the connection is dropped. A message over
        ``max_message_size`` (counting its fragments) is closed with 1009 as
        soon as its header says so. A peer that keeps the socket full is made
        to yield to the loop every ``_YIELD_THRESHOLD`` bytes, frames counted
        ``_FRAME_YIELD_COST`` each, as tornado does.
        """
        stream = self.stream
        limit = self.params.max_message_size
        data = b""
        work = 0
        try:
            while not self.client_terminated:
                chunk = await stream.read_bytes(READ_CHUNK_BYTES, partial=True)
                self._wire_bytes_in += len(chunk)
                data = data + chunk if data else chunk
                pos, n = 0, len(data)
                while n - pos >= 2 and not self.client_terminated:
                    head, second = data[pos], data[pos + 1]
                    opcode, length, start = head & 0x0F, second & 0x7F, pos + 2
                    if head & 0x70 or (opcode & 0x8 and (length > 125 or not head & 0x80)):
                        self._abort()  # reserved bits; a long or fragmented control frame
                        return
                    if length == 126:
                        if n - pos < 4:
                            break
                        length, start = int.from_bytes(data[pos + 2 : pos + 4]), pos + 4
                    elif length == 127:
                        if n - pos < 10:
                            break
                        length, start = int.from_bytes(data[pos + 2 : pos + 10]), pos + 10
                    pending = self._fragmented_message_buffer
                    if length + (len(pending) if pending is not None else 0) > limit:
                        self.close(1009, "message too big")
                        self._abort()
                        return
                    masked = second & 0x80
                    if masked and start + 4 > n:
                        break  # the mask has not all come yet
                    end = start + (4 if masked else 0) + length
                    if end > n:
                        # The header is here, the payload is not: read the rest at once.
                        rest = await stream.read_bytes(end - n)
                        self._wire_bytes_in += len(rest)
                        data, n = data + rest, end
                    if masked:
                        payload = _websocket_mask(data[start : start + 4], data[start + 4 : end])
                    else:
                        payload = data[start:end]
                    pos = end
                    work += _FRAME_YIELD_COST + length
                    if opcode == 0:  # a continuation
                        if pending is None:
                            self._abort()
                            return
                        pending.extend(payload)
                        if not head & 0x80:
                            continue
                        opcode, payload = cast(int, self._fragmented_message_opcode), bytes(pending)
                        self._fragmented_message_buffer = None
                    elif not opcode & 0x8 and not head & 0x80:  # the first of a fragmented message
                        if pending is not None:
                            self._abort()
                            return
                        # Typed None by tornado, which sets it to the opcode too.
                        self._fragmented_message_opcode = opcode  # type: ignore[assignment]
                        self._fragmented_message_buffer = bytearray(payload)
                        continue
                    elif not opcode & 0x8 and pending is not None:
                        self._abort()  # a new message inside a fragmented one
                        return
                    if opcode != 0x1 or self.client_terminated:
                        # Binary, close, ping, pong: tornado's handling, as it was.
                        handled = self._handle_message(opcode, payload)
                        if handled is not None:
                            await handled
                    elif not await self._on_text(payload):
                        return
                    if work >= _YIELD_THRESHOLD:  # checked per frame: one read holds thousands
                        work = 0
                        await asyncio.sleep(0)
                data = data[pos:]
        except StreamClosedError:
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    async def _on_text(self, payload: bytes) -> bool:
        """A text message to the handler, awaited here; False when the connection is dropped.

        Tornado's ``_handle_message`` would wrap ``on_message`` in a task of
        its own and this reader would wait for that task: a task and a loop
        iteration per message for the same order. What it does around the
        call is kept: invalid UTF-8 drops the connection, and so does an
        exception out of ``on_message``, logged by the handler.
        """
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self._abort()
            return False
        self._message_bytes_in += len(payload)
        try:
            await self.handler.on_message(text)  # type: ignore[misc]  # typed "-> Awaitable | None"
        except Exception:
            self.handler.log_exception(*sys.exc_info())
            self._abort()
            return False
        # What the message queued (the room's broadcast: the hub's flush is a
        # callback of this iteration) goes out before the next read is armed,
        # which costs tornado a recv() and the stream's re-registration (~90 µs
        # cold, bench.stages' ``flush`` row); tornado's task per frame did the same.
        await asyncio.sleep(0)
        return True


#: Tornado's per-handler attributes, in the order an open WebSocket handler
#: gets them (RequestHandler/WebSocketHandler ``__init__``, ``_execute``,
#: ``get``, and the methods ``_detach_stream`` disables).
TORNADO_HANDLER_ATTRS = (
    "application", "request", "_headers_written", "_finished", "_auto_finish",
    "_prepared_future", "ui", "_headers", "_write_buffer", "_status_code", "_reason",
    "ws_connection", "close_code", "close_reason", "_on_close_called", "_transforms",
    "path_args", "path_kwargs", "open_args", "open_kwargs", "write", "redirect",
    "set_header", "set_cookie", "set_status", "flush", "finish",
)  # fmt: skip


class GatewayHandler(WebSocketHandler):
    """Shared mechanics of the gateway's namespaces (see module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # CPython (3.11+) stores a class's instance attributes in one key table
        # shared by its instances (8 bytes a value) only while the table can
        # still take the names, and every instance created shrinks what it can
        # take. Under concurrent handshakes it filled before the first
        # connection was open, and every connection got a dict of its own
        # (832 bytes, bench.idle --types). Naming tornado's attributes on a
        # throwaway instance fills the table while it is empty.
        # tests/test_idle_memory.py fails if tornado adds a name.
        primer = cls.__new__(cls)
        for name in TORNADO_HANDLER_ATTRS:
            object.__setattr__(primer, name, None)

    #: Namespace name as it appears in ``system:welcome`` and metrics.
    namespace: ClassVar[str] = ""
    #: Roles of which a connection needs at least one; None admits any user.
    allowed_roles: ClassVar[frozenset[str] | None] = None
    #: Inbound events of this namespace and the schema loading each one's data.
    schemas: ClassVar[dict[str, type[Schema]]] = {}
    #: Rate-limit class per event; unlisted events count as "other".
    rate_classes: ClassVar[dict[str, str]] = {}
    #: Events whose method takes ``answer``, an :class:`EarlyAck`, to ack before it returns.
    early_acks: ClassVar[frozenset[str]] = frozenset()

    _base_schemas: ClassVar[dict[str, type[Schema]]] = {
        "system:ping": Ping,
        "auth:refresh": AuthRefresh,
    }

    # Slots, not the instance dict, for what the gateway keeps per connection:
    # tornado's own attributes then fit a key-sharing instance dict, where
    # 60-odd keys needed a 1.6 KB dict of its own (bench.idle). A subclass
    # lists its own attributes the same way.
    __slots__ = (
        "_awaiting_auth",
        "_bad_frames",
        "_bad_window_start",
        "_close_reason",
        "_closing",
        "_gone",
        "_receiving",
        "_registered",
        "_seat",
        "_timer",
        "bytes_in",
        "client_ip",
        "config",
        "conn_id",
        "connected_at",
        "db",
        "deps",
        "event_started",
        "frames_in",
        "hub",
        "identity",
        "last_seen",
        "member_rooms",
        "metrics",
        "outbound",
        "presence",
        "state",
        "stats",
        "tasks",
        "user_agent",
        "user_id",
    )  # fmt: skip

    def initialize(self, deps: Deps) -> None:
        """Take the node's components; a subclass extending it calls ``super()`` first."""
        self.deps = deps
        # Shortcuts for what every namespace uses; the rest is read from deps.
        self.config = deps.config
        self.state = deps.state
        self.hub = deps.hub
        self.db = deps.db
        self.presence = deps.presence
        self.metrics = deps.metrics
        self.stats = deps.stats
        self.tasks = deps.tasks
        self.conn_id = uuid.uuid4().hex
        self.user_id = ""
        self.connected_at = time.monotonic()
        self.identity: Identity | None = None
        self.member_rooms: list[str] = []
        self.last_seen = time.monotonic()
        self.client_ip = ""
        #: The handshake's ``User-Agent`` as an admin sees it (the headers are not kept).
        self.user_agent = ""
        #: Frames and bytes received once admitted (what was sent: ``outbound``).
        self.frames_in = 0
        self.bytes_in = 0
        self._registered = False
        # This connection's place in the connection limits, once admitted.
        self._seat: Seat | None = None
        self._closing = False
        #: Every frame to the peer goes through here (budget, slow-consumer rule).
        self.outbound = Outbound(self.config.max_outbound_bytes, on_slow=self._slow_consumer)
        self._gone = False
        self._bad_frames = 0
        self._bad_window_start = 0.0
        # The one pending timer: the auth-frame deadline, then the token's
        # expiry warning, then its expiry (each schedules the next).
        self._timer: asyncio.TimerHandle | None = None
        #: Tornado's frame-reading loop (_DetachedReceive).
        self._receiving: asyncio.Task[None] | None = None
        self._close_reason = "client"
        # True from a token-less handshake until its first frame (auth:connect).
        self._awaiting_auth = False
        self.event_started = time.perf_counter()

    @property
    def log(self) -> ConnectionLog:
        """This connection's logger (made per call: logging is rare, connections are many)."""
        return ConnectionLog(log, self)

    def _set_timer(self, handle: asyncio.TimerHandle | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = handle

    # -- handshake ------------------------------------------------------------

    def check_origin(self, origin: str) -> bool:
        allowed = self.config.allowed_origins
        return "*" in allowed or origin.rstrip("/") in allowed

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if type(protocol) is WebSocketProtocol13:
            # Built again with tornado's parameters rather than re-typed:
            # assigning __class__ would cost the object a dict of its own.
            return _DetachedReceive(self, False, protocol.params)
        return protocol

    def get_compression_options(self) -> dict[str, Any] | None:
        # Off: broadcasts write one pre-built, uncompressed frame to everyone.
        return None

    async def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        ws = self.ws_connection
        if ws is not None and ws.stream is not None:
            self.outbound.attach(ws.stream)
        headers = self.request.headers
        self.client_ip = self.deps.admission.client_ip(
            self.request.remote_ip or "", headers.get("X-Forwarded-For")
        )
        token = handshake_token(
            headers.get("Authorization", ""),
            self.get_query_argument("token", None),
            # Only with a Cookie header: asking parses (and keeps) an empty jar.
            self.get_cookie("access_token") if "Cookie" in headers else None,
        )
        self.user_agent = sys.intern(clean_user_agent(headers.get("User-Agent")))
        self._drop_handshake_state()
        if token is None:
            # Browsers cannot set headers, and a URL token ends up in access
            # logs: the token comes in the first frame instead (on_message).
            # Until then the connection is in no hub, presence or limit.
            self._awaiting_auth = True
            self.state.awaiting_auth.add(self)
            loop = asyncio.get_running_loop()
            self._set_timer(loop.call_later(self.config.auth_timeout, self._auth_timed_out))
            return
        await self._authenticate(token, None)

    def _drop_handshake_state(self) -> None:
        """Let go of what only the upgrade needed (~1.8 KB a connection, bench.idle).

        Tornado keeps the request's and the 101 response's headers and the
        template namespace (``ui``) for the connection's life, and nothing
        reads them once the socket is open: the client address and user
        agent were copied above. The request's headers are re-initialised in
        place, empty, because tornado's HTTP/1 connection holds the same
        object (``clear()`` would keep the emptied tables). The response
        headers are only reachable as the private ``_headers``; tornado
        disables ``set_header`` and ``finish`` on a detached WebSocket
        handler, so nothing writes them again. tests/test_idle_memory.py
        fails if a tornado upgrade keeps any of them elsewhere.
        """
        HTTPHeaders.__init__(self.request.headers)
        self._headers = HTTPHeaders()
        self.ui = _NO_UI

    async def _authenticate(self, token: str, ack: int | None) -> None:
        """Admit the connection with ``token``, or refuse it (``system:error``, close)."""
        try:
            await self._admit(token, ack)
        except errors.GatewayError as exc:
            self._refuse(exc, token, ack)
            await self._release_limit()
        except Exception:
            self.log.exception("admitting %s connection from %s failed",
                               self.namespace, self.client_ip)  # fmt: skip
            self.send_payload(protocol.system_error_payload(errors.InternalError(), None))
            self.close_with(1011, "internal error")
            await self._release_limit()

    def _refuse(self, exc: errors.GatewayError, token: str | None, ack: int | None) -> None:
        self.metrics.auth_failures.labels(exc.code.lower()).inc()
        self.log.info(
            "refused %s connection from %s: %s (%s)",
            self.namespace, self.client_ip, exc.code, exc.message,
        )  # fmt: skip
        self._close_reason = exc.code.lower()
        self.deps.admission.refused(token, exc)
        if ack is not None:
            self.send_payload(protocol.ack_error_payload(ack, exc))
        self.send_payload(protocol.system_error_payload(exc, None))
        self.close_with(exc.close_code or 4400, exc.message)

    def _auth_timed_out(self) -> None:
        if self._awaiting_auth:
            self._awaiting_auth = False
            self.state.awaiting_auth.discard(self)
            self._refuse(errors.Unauthorized("Authentication timed out"), None, None)

    async def _on_auth_frame(self, message: str | bytes) -> None:
        """The first frame after a token-less handshake: ``auth:connect {token}`` or 4401.

        There is one attempt: whatever this frame is, the connection is
        either admitted or refused and closed.
        """
        self._awaiting_auth = False
        self.state.awaiting_auth.discard(self)
        self._set_timer(None)
        if isinstance(message, bytes) or len(message) > MAX_AUTH_FRAME_BYTES:
            what = "binary" if isinstance(message, bytes) else f"over {MAX_AUTH_FRAME_BYTES} bytes"
            self._refuse(errors.Unauthorized(f"Authentication frame is {what}"), None, None)
            return
        try:
            envelope = protocol.decode_envelope(message)
        except errors.BadRequest:
            self._refuse(errors.Unauthorized("Expected an auth:connect frame"), None,
                         protocol.salvage_ack(message))  # fmt: skip
            return
        token = envelope.data.get("token")
        if envelope.event != AUTH_CONNECT_EVENT:
            exc = errors.Unauthorized(f"Expected {AUTH_CONNECT_EVENT} as the first frame")
        elif not isinstance(token, str) or not token:
            exc = errors.Unauthorized(f"{AUTH_CONNECT_EVENT} needs data.token (a string)")
        else:
            await self._authenticate(token, envelope.ack)
            return
        self._refuse(exc, None, envelope.ack)

    async def _admit(self, token: str, ack: int | None) -> None:
        """Verify ``token`` and register the connection; ``ack`` also gets the welcome."""
        if self.state.shutting_down:
            raise errors.ServiceUnavailable("Server is shutting down")
        admission = self.deps.admission
        identity = admission.verify(token)
        needs = f"The {self.namespace} namespace needs one of the roles {{roles}}"
        require_roles(identity, self.allowed_roles, needs)
        # Known from here on: the log lines of a refusal below carry the user id.
        self.identity = identity
        self.user_id = identity.user_id
        self._seat, info = await admission.enter(identity, self.namespace, self.client_ip)
        if self._gone:
            # The peer left while we were checking; on_close already ran.
            await self._release_limit()
            return
        self.member_rooms = info.room_ids
        self.hub.add(self)
        # A broadcast another node sends to this user right after the welcome
        # must reach it: the welcome waits until this node hears the user's,
        # namespace's and roles' channels (no wait when it does already).
        await self.hub.wait_reachable(self)
        if self._gone:
            # The peer left meanwhile; on_close skipped what it did not register.
            self.hub.remove(self)
            await self._release_limit()
            return
        self._registered = True
        self.metrics.connections.labels(self.namespace).inc()
        self.metrics.connections_opened.labels(self.namespace).inc()
        self.log.info("accepted %s connection from %s", self.namespace, self.client_ip)
        self._schedule_expiry(identity.expires_at)
        welcome = {
            "connectionId": self.conn_id,
            "userId": self.user_id,
            "namespace": self.namespace,
            "node": self.state.node_id,
            "serverTime": protocol.iso(protocol.now()),
            "heartbeatInterval": int(self.config.heartbeat_interval * 1000),
            "user": identity.public(),
        }
        self.send_event("system:welcome", welcome)
        if ack is not None:
            self.send_payload(protocol.ack_payload(ack, welcome))
        if await self.presence.connect(self.user_id):
            self.announce_status("online")
        await self.on_connected()

    async def on_connected(self) -> None:
        """Hook: runs after the welcome frame; send initial state here."""

    # -- token expiry ---------------------------------------------------------

    def _schedule_expiry(self, expires_at: float) -> None:
        warn_in, _ = expiry_delays(expires_at, time.time())
        loop = asyncio.get_running_loop()
        self._set_timer(loop.call_later(warn_in, self._warn_expiry, expires_at))

    def _warn_expiry(self, expires_at: float) -> None:
        # One timer at a time (a connection holds one): the warning schedules the close.
        _, expire_in = expiry_delays(expires_at, time.time())
        self._set_timer(asyncio.get_running_loop().call_later(expire_in, self._expire))
        expires_in = max(0.0, round(expires_at - time.time(), 3))
        self.send_event("auth:expiring", {"expiresIn": expires_in})

    def _expire(self) -> None:
        exc = errors.TokenExpired("Token expired; reconnect with a fresh token")
        self._close_reason = "token_expired"
        self.send_payload(protocol.system_error_payload(exc, None))
        self.close_with(4401, exc.message)

    async def on_auth_refresh(self, token: str) -> dict[str, Any]:
        identity = self.deps.admission.verify(token)
        if identity.user_id != self.user_id:
            raise errors.Unauthorized("The new token is for another user")
        require_roles(
            identity, self.allowed_roles, "The new token lacks the roles this namespace needs"
        )
        self.identity = identity
        # The new token may carry other roles: role targets follow it from now on.
        self.hub.update_roles(self)
        self._schedule_expiry(identity.expires_at)
        return {"expiresAt": protocol.iso(_from_epoch(identity.expires_at))}

    # -- inbound frames -------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        self.last_seen = time.monotonic()
        if not self._registered:
            if self._awaiting_auth:
                await self._on_auth_frame(message)
            return
        size = len(message)
        self.metrics.frames_received.inc()
        self.metrics.bytes_received.inc(size)
        self.frames_in += 1
        self.bytes_in += size
        if isinstance(message, bytes):
            self._answer_bad_frame(errors.BadRequest("Binary frames are not supported"), None)
            return
        try:
            envelope = protocol.decode_envelope(message)
        except errors.BadRequest as exc:
            self._answer_bad_frame(exc, protocol.salvage_ack(message))
            return
        await self.handle_envelope(envelope)

    async def handle_envelope(self, envelope: protocol.Envelope) -> None:
        """Dispatch one decoded frame and answer it (ack or ``system:error``).

        An ``on_<event>`` returning a :class:`Reply` has its ``after_ack``
        run here, once the ack is queued. An event in ``early_acks`` may
        have been answered by its method already (:class:`EarlyAck`).
        """
        event = envelope.event
        schema = self.schemas.get(event) or self._base_schemas.get(event)
        received, duration = self.metrics.event_series(
            self.namespace, event if schema is not None else "unknown"
        )
        received.inc()
        self.stats.events.add()
        if schema is None:
            self._answer_bad_frame(
                errors.UnknownEvent(f"Unknown event {event!r}", {"event": event[:64]}),
                envelope.ack,
                event,
            )
            return
        started = time.perf_counter()
        # Handlers measure publish-to-deliver latency from here.
        self.event_started = started
        after_ack: Callable[[], object] | None = None
        answer: EarlyAck | None = None
        try:
            bucket = self.rate_classes.get(event, "other")
            limiter = self.deps.rate_limiter
            decision = limiter.hit_now(self.user_id, bucket)
            if decision is None:  # the cluster's buckets are in Redis
                decision = await limiter.hit(self.user_id, bucket)
            if not decision.allowed:
                self.metrics.rate_limited.labels(bucket).inc()
                self.deps.security.rate_limited(self.user_id, bucket)
                raise errors.RateLimited(details=decision.details())
            kwargs = load(schema, envelope.data)
            if event in self.early_acks:
                answer = kwargs["answer"] = EarlyAck(self, envelope.ack, started, duration)
            method = getattr(self, "on_" + event.replace(":", "_"))
            result = await method(**kwargs)
            if isinstance(result, Reply):
                after_ack = result.after_ack
                result = result.data
            if envelope.ack is not None and not (answer and answer.given):
                self.send_soon(protocol.ack_payload(envelope.ack, result or {}))
        except errors.GatewayError as exc:
            if answer and answer.given:  # a frame has one answer: it went out
                self.log.warning("%s %s failed after its ack: %s", self.namespace, event, exc,
                                 extra={"event": event})  # fmt: skip
            else:
                self._answer_error(exc, envelope.ack, event)
        except (WebSocketClosedError, StreamClosedError):
            pass
        except Exception:
            self.log.exception("%s %s failed for user %s", self.namespace, event, self.user_id,
                               extra={"event": event})  # fmt: skip
            if not (answer and answer.given):
                self._answer_error(errors.InternalError(), envelope.ack, event)
        finally:
            if answer is not None:
                answer.release()
            if not (answer and answer.given):  # else counted at the ack
                self.count_answer(duration, started)
        if after_ack is not None:
            after_ack()

    def count_answer(self, duration: Histogram, started: float) -> None:
        """An event answered: its time since ``started`` in its histogram and the stats."""
        elapsed = time.perf_counter() - started
        duration.observe(elapsed)
        # For p50/p95 in the admin namespace's metrics:update.
        self.stats.latency.add(elapsed)

    def _answer_error(self, exc: errors.GatewayError, ack: int | None, event: str | None) -> None:
        self.metrics.errors.labels(exc.code).inc()
        self.stats.error(exc.status)
        if ack is not None:
            self.send_payload(protocol.ack_error_payload(ack, exc))
        else:
            self.send_payload(protocol.system_error_payload(exc, event))

    def _answer_bad_frame(
        self, exc: errors.GatewayError, ack: int | None, event: str | None = None
    ) -> None:
        self._answer_error(exc, ack, event)
        now = time.monotonic()
        if now - self._bad_window_start > BAD_FRAME_WINDOW_SECS:
            self._bad_window_start, self._bad_frames = now, 0
        self._bad_frames += 1
        if self._bad_frames >= BAD_FRAME_LIMIT and not self._closing:
            self.log.warning("closing %s for user %s: repeated bad frames",
                             self.conn_id, self.user_id, extra={"event": event})  # fmt: skip
            self._close_reason = "protocol_abuse"
            self.close_with(4400, "too many bad frames")

    async def on_system_ping(self, t: float | None) -> dict[str, Any]:
        now_ms = protocol.epoch_ms()
        return {
            "serverTime": protocol.iso(protocol.now()),
            "latencyMs": max(0, round(now_ms - t)) if t is not None else None,
        }

    # -- outbound -------------------------------------------------------------

    def send_frame(self, frame: bytes) -> bool:
        """Queue a pre-built frame, closing the connection if it fell too far behind."""
        self.hub.flush_to(self)  # broadcasts queued for this iteration go first
        if not self.write_frame(frame):
            return False
        self.metrics.frames_sent.inc()
        self.metrics.bytes_sent.inc(len(frame))
        return True

    def write_frame(self, frame: bytes, frames: int = 1) -> bool:
        """:meth:`send_frame` without the metrics: the hub counts broadcasts in bulk.

        ``frame`` may be ``frames`` frames joined (the hub's coalesced writes).
        """
        return self.outbound.write(frame, frames)

    def send_soon(self, payload: bytes) -> None:
        """Like :meth:`send_payload`, for acks: now, or with this iteration's broadcasts.

        Written at once when nothing is queued in this loop iteration (a lone
        send's ack does not wait for the flush), else with the iteration's
        flush: one ``send()`` per connection and iteration, not one per ack
        (see :meth:`server.realtime.hub.Hub.send_ack`).
        """
        frame = protocol.frame(payload)
        if self.hub.send_ack(self, frame):
            self.metrics.frames_sent.inc()
            self.metrics.bytes_sent.inc(len(frame))

    def send_payload(self, payload: bytes) -> bool:
        return self.send_frame(protocol.frame(payload))

    def send_event(self, event: str, data: dict[str, Any]) -> bool:
        return self.send_payload(protocol.event_payload(event, data))

    def _slow_consumer(self) -> None:
        """The outbound budget is exceeded: 4408, which the peer sees if it reads again."""
        self.log.warning(
            "closing %s (user %s): slow consumer, outbound buffer over %d bytes",
            self.conn_id, self.user_id, self.config.max_outbound_bytes,
        )  # fmt: skip
        self.metrics.slow_consumers.inc()
        self._close_reason = "slow_consumer"
        self._close(4408, "slow consumer", abort_after=SLOW_CONSUMER_CLOSE_GRACE_SECS)

    def close_as(self, cause: str, code: int, reason: str) -> None:
        """Close like :meth:`close_with`, counted under ``cause`` in ``connections_closed``.

        For closes decided elsewhere (moderation: ``"kicked"``, ``"banned"``);
        a connection already closing keeps its first reason.
        """
        if not self._closing:
            self._close_reason = cause
        self.close_with(code, reason)

    def close_with(self, code: int, reason: str) -> None:
        # A silent peer (4408 from the heartbeat) will not answer the closing
        # handshake: drop the socket now instead of holding its rooms, presence
        # and limit slot through tornado's 5 s wait for the reply.
        self._close(code, reason, abort_after=0.0 if code == 4408 else None)

    def _close(self, code: int, reason: str, *, abort_after: float | None) -> None:
        """Send the close frame; drop the socket after ``abort_after`` seconds if given."""
        if self._closing:
            return
        self._closing = True
        self.outbound.closing = True
        if self._close_reason == "client":
            self._close_reason = {1001: "shutdown", 4408: "heartbeat_timeout"}.get(code, "server")
        if code != 4408:  # a silent or slow peer would not read them anyway
            self.hub.flush_to(self)
        try:
            self.close(code, reason)
        except (WebSocketClosedError, StreamClosedError):
            pass
        if abort_after is not None:
            self.outbound.abort_after(abort_after)

    def ping(self, data: str | bytes = b"") -> None:
        """Send a WebSocket ping; a no-op once the connection is closing."""
        ws = self.ws_connection
        if ws is None or self._closing:
            return
        try:
            ws.write_ping(data.encode() if isinstance(data, str) else data)
        except (WebSocketClosedError, StreamClosedError):
            pass

    def on_pong(self, data: bytes) -> None:
        self.last_seen = time.monotonic()

    # -- presence helpers -----------------------------------------------------

    async def refresh_member_rooms(self) -> None:
        """Re-read the user's rooms before announcing presence.

        ``member_rooms`` is loaded at connect; the user's other devices (or
        other users, adding members) may have changed the memberships since.
        """
        try:
            self.member_rooms = await self.db.run(
                "user.rooms", chat_db.member_room_ids, self.user_id
            )
        except Exception:
            self.log.warning("could not re-read the rooms of %s; using the list from connect",
                        self.user_id, exc_info=True)  # fmt: skip

    def announce_status(self, status: str) -> None:
        """Tell everyone sharing a room with this user about a status change."""
        if self.member_rooms:
            self.hub.publish_rooms(
                self.member_rooms, "user:status_changed", {"userId": self.user_id, "status": status}
            )

    # -- close ------------------------------------------------------------------

    def on_close(self) -> None:
        if self._gone:
            return
        self._gone = True
        self.state.awaiting_auth.discard(self)
        self._set_timer(None)
        if not self._registered:
            return
        rooms = self.hub.remove(self)
        self.log.info(
            "closed %s connection from %s: %s (code %s) after %.1f s",
            self.namespace, self.client_ip, self._close_reason, self.close_code,
            time.monotonic() - self.connected_at,
        )  # fmt: skip
        self.metrics.connections.labels(self.namespace).dec()
        self.metrics.connections_closed.labels(self.namespace, self._close_reason).inc()
        self.tasks.spawn(self._cleanup(rooms), f"cleanup-{self.conn_id}")

    async def _cleanup(self, rooms: set[str]) -> None:
        try:
            await self.on_disconnected(rooms)
        finally:
            await self._release_limit()
            if await self.presence.disconnect(self.user_id):
                await self.refresh_member_rooms()
                self.announce_status("offline")

    async def _release_limit(self) -> None:
        if self._seat is not None:
            await self._seat.release()

    async def on_disconnected(self, rooms: set[str]) -> None:
        """Hook: the connection closed; ``rooms`` are the rooms it was in."""

    # -- helpers for subclasses ---------------------------------------------

    def publish(
        self,
        target: Target,
        event: str,
        data: dict[str, Any],
        *,
        include_self: bool = False,
        seq: int | None = None,
    ) -> int:
        return self.hub.publish(
            target, event, data, exclude=None if include_self else self.conn_id, seq=seq
        )

    def describe(self) -> dict[str, Any]:
        """This connection in an admin's listing (:mod:`server.services.connection_list`).

        Read from what the connection holds anyway (the handshake's headers, the
        client address resolved through the trusted proxies), so listing costs
        an idle connection nothing. Never the token.
        """
        out = self.outbound
        started = time.time() - (time.monotonic() - self.connected_at)
        return {
            "connectionId": self.conn_id,
            "userId": self.user_id,
            "namespace": self.namespace,
            "ip": self.client_ip,
            "userAgent": self.user_agent,
            "connectedAt": protocol.iso(_from_epoch(started)),
            "framesIn": self.frames_in,
            "framesOut": out.frames_out,
            "bytesIn": self.bytes_in,
            "bytesOut": out.bytes_out,
        }

    @property
    def is_staff(self) -> bool:
        return self.identity is not None and self.identity.is_staff

    @property
    def roles(self) -> frozenset[str]:
        """The token's roles: the hub's role targets reach this connection by them."""
        return self.identity.roles if self.identity is not None else frozenset()


def _from_epoch(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)
