"""Live logs: the ``/ws/logs`` namespace and the ``/api/v1/logs`` endpoints.

``/ws/logs`` (roles admin or ``logs``) subscribes to the node's
:class:`~server.services.logstream.LogStream` with a filter and receives entries as
``log:error`` / ``log:warning`` / ``log:entry``, stored on any node of the
cluster (:class:`~server.services.logcluster.LogCluster`); ``logs:recent``
reads every node's ring buffer. Over HTTP, services (role ``service``) ingest their own
entries with ``POST /api/v1/logs``, and operators read
``GET /api/v1/logs/recent`` and ``GET /api/v1/logs/stats``.

A subscriber that cannot keep up loses entries, not the server's memory:
each connection has its own backlog of log frames bounded in bytes (half
the connection's outbound limit, ``SWITCHBOARD_MAX_OUTBOUND_BYTES``), and
only one log frame at a time sits in the socket's write buffer — the next
is written when the previous one has been flushed to the kernel. Entries
that arrive while the backlog is full are counted, and once the backlog
has drained to half its size the subscriber gets ``log:dropped {count}``
before the next entry. Log traffic therefore never trips the slow-consumer
close (4408) that other namespaces use.

Example (client side)::

    await client.emit("logs:subscribe", {"level": "WARNING", "services": ["billing"]})
    frame = await client.next_event("log:error")
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from marshmallow import Schema, ValidationError, fields, validate, validates
from tornado.iostream import StreamClosedError
from tornado.web import RequestHandler, stream_request_body
from tornado.websocket import WebSocketClosedError

from handlers.base import GatewayHandler
from handlers.http import JSONHandler
from handlers.schemas import EventSchema, Int, JSONObject, Strict, Text, Timestamp, load
from server.core import errors, protocol
from server.core.auth import Identity
from server.services.logstream import (
    LEVELS,
    MAX_MESSAGE_CHARS,
    MAX_STACK_CHARS,
    OWN_SERVICE,
    LogEntry,
    LogFilter,
    fit_entries,
    ingested_entry,
    normalize_level,
)

if TYPE_CHECKING:
    from handlers.deps import Deps

#: Roles that may read logs (socket and HTTP).
READER_ROLES = frozenset({"admin", "logs"})
#: Roles that may ingest entries over HTTP.
WRITER_ROLES = frozenset({"service"})

MAX_RECENT = 1000
DEFAULT_RECENT = 100
MAX_FILTER_ITEMS = 50
# One ingest request: enough for a service flushing a few seconds of logs,
# small enough that validating it does not stall the loop noticeably.
MAX_INGEST_ENTRIES = 500
MAX_INGEST_BODY_BYTES = 1024 * 1024
# Bodies up to this size are read and discarded to answer 413 cleanly; a
# larger one makes tornado drop the connection.
INGEST_DISCARD_LIMIT_BYTES = 8 * MAX_INGEST_BODY_BYTES
MAX_ENTRY_METADATA_BYTES = 4096
SERVICE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")


# -- schemas ------------------------------------------------------------------


class LevelField(fields.String):
    """A level name (any case; ``warn``/``fatal``/``log``/``verbose`` accepted) → ``"WARNING"``."""

    default_error_messages = {"invalid_level": f"Must be one of {', '.join(LEVELS)}."}

    def __init__(self, **kwargs: Any) -> None:
        # Longer than any level name or alias: refused before it is looked up.
        super().__init__(validate=validate.Length(1, 16), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return normalize_level(text)
        except ValueError:
            raise self.make_error("invalid_level") from None


def _names(max_chars: int) -> fields.List[str]:
    return fields.List(
        fields.String(validate=validate.Length(1, max_chars)),
        validate=validate.Length(1, MAX_FILTER_ITEMS),
        load_default=None,
    )


class Subscribe(EventSchema):
    level = LevelField(load_default=None)
    services = _names(64)
    contexts = _names(200)
    contains = fields.String(validate=validate.Length(1, 200), load_default=None)


class Recent(EventSchema):
    limit = Int(1, MAX_RECENT, load_default=DEFAULT_RECENT)
    level = LevelField(load_default=None)
    service = fields.String(validate=validate.Length(1, 64), load_default=None)


class IngestEntry(EventSchema):
    timestamp = Timestamp(load_default=None)
    level = LevelField(required=True)
    service = fields.String(
        validate=validate.Regexp(SERVICE_RE, error="Must match ^[A-Za-z0-9_.:-]{{1,64}}$."),
        load_default=None,
    )
    context = Text(validate=validate.Length(0, 200), load_default="")
    message = Text(required=True, validate=validate.Length(1, MAX_MESSAGE_CHARS))
    metadata = JSONObject(MAX_ENTRY_METADATA_BYTES, load_default=dict)
    stack = fields.String(validate=validate.Length(1, MAX_STACK_CHARS), load_default=None)

    @validates("service")
    def _not_ours(self, value: str | None, **kwargs: Any) -> None:
        if value == OWN_SERVICE:
            raise ValidationError(f"{OWN_SERVICE!r} is reserved for the gateway's own entries.")


class IngestBody(EventSchema):
    entries = fields.List(
        fields.Nested(IngestEntry), required=True, validate=validate.Length(1, MAX_INGEST_ENTRIES)
    )


# -- /ws/logs -----------------------------------------------------------------


class LogsHandler(GatewayHandler):
    """The live logs namespace (roles admin or ``logs``)."""

    namespace = "logs"
    allowed_roles = READER_ROLES
    schemas: ClassVar[dict[str, type[Schema]]] = {
        "logs:subscribe": Subscribe,
        "logs:unsubscribe": EventSchema,
        "logs:recent": Recent,
    }

    def initialize(self, deps: Deps) -> None:
        super().initialize(deps)
        self.logstream = deps.logstream
        self.logs = deps.logs
        #: Byte bound of this subscriber's pending log frames.
        self.backlog_cap = max(1, self.config.max_outbound_bytes // 2)
        #: Highest ``backlog_bytes`` seen (for tests and diagnostics).
        self.backlog_peak = 0
        self.backlog_bytes = 0
        # Frames waiting for the socket, each with the entries it carries
        # (1 for a log:* frame, 0 for log:dropped) for the streamed/dropped metrics.
        self._backlog: deque[tuple[bytes, int]] = deque()
        #: Entries lost since the last ``log:dropped`` was queued.
        self.dropped = 0
        self._dropping = False
        self._pump: asyncio.Task[None] | None = None

    async def on_logs_subscribe(
        self,
        level: str | None,
        services: list[str] | None,
        contexts: list[str] | None,
        contains: str | None,
    ) -> dict[str, Any]:
        wanted = LogFilter.of(level, services, contexts, contains)
        self.logstream.subscribe(self.conn_id, wanted, self._on_log)
        # After the ack, entries stored on any node reach this subscriber (unless
        # the cluster link is down: then this node's own entries only).
        await self.logs.wait_heard()
        return {"subscribed": True, "filter": wanted.public()}

    async def on_logs_unsubscribe(self) -> dict[str, Any]:
        self.logstream.unsubscribe(self.conn_id)
        return {"subscribed": False}

    async def on_logs_recent(
        self, limit: int, level: str | None, service: str | None
    ) -> dict[str, Any]:
        answer = await self.logs.recent(
            limit, min_level=LEVELS[level] if level else 0, service=service
        )
        # Keep the ack well inside the outbound limit, or it would close us as slow.
        entries, truncated = fit_entries(answer["entries"], self.config.max_outbound_bytes // 2)
        return {**answer, "entries": entries, "truncated": truncated or answer["truncated"]}

    async def on_disconnected(self, rooms: set[str]) -> None:
        self.logstream.unsubscribe(self.conn_id)
        # Entries still queued never reach this subscriber.
        lost = sum(entries for _, entries in self._backlog)
        if lost:
            self.metrics.log_entries_dropped.inc(lost)
        self._backlog.clear()
        self.backlog_bytes = 0
        if self._pump is not None:
            self._pump.cancel()

    # -- delivery (loop thread, called by LogStream.publish) ------------------

    def _on_log(self, entry: LogEntry, frame: bytes) -> None:
        if self._gone or self._closing:
            return
        if self._dropping:
            if self.backlog_bytes > self.backlog_cap // 2:
                self.dropped += 1
                self.metrics.log_entries_dropped.inc()
                return
            self._flush_dropped()
        if self.backlog_bytes + len(frame) > self.backlog_cap:
            self._dropping = True
            self.dropped += 1
            self.metrics.log_entries_dropped.inc()
            return
        self._enqueue(frame, 1)

    def _flush_dropped(self) -> None:
        """Caught up: queue ``log:dropped`` where the gap is."""
        self._dropping = False
        if self.dropped:
            self._enqueue(protocol.event_frame("log:dropped", {"count": self.dropped}), 0)
            self.dropped = 0

    def _enqueue(self, frame: bytes, entries: int) -> None:
        self._backlog.append((frame, entries))
        self.backlog_bytes += len(frame)
        self.backlog_peak = max(self.backlog_peak, self.backlog_bytes)
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(
                self._run_pump(), name=f"logs-pump-{self.conn_id}"
            )

    async def _run_pump(self) -> None:
        """Write queued frames one at a time, each after the previous one flushed."""
        try:
            while True:
                if not self._backlog and self._dropping:
                    self._flush_dropped()
                if not self._backlog:
                    return
                frame, entries = self._backlog.popleft()
                self.backlog_bytes -= len(frame)
                written = self._write_now(frame)
                if written is None:
                    self.metrics.log_entries_dropped.inc(entries)
                    return
                self.metrics.log_entries_streamed.inc(entries)
                await written
        except (StreamClosedError, WebSocketClosedError):
            pass  # the connection went away; on_disconnected clears the rest
        finally:
            self._pump = None

    def _write_now(self, frame: bytes) -> asyncio.Future[None] | None:
        """Write one log frame outside the budget (the backlog bounds log traffic)."""
        ws = self.ws_connection
        if ws is None or ws.is_closing():
            return None
        self.hub.flush_to(self)  # keep frame order with queued broadcasts
        written = self.outbound.write_unbudgeted(frame)
        if written is not None:
            self.metrics.frames_sent.inc()
            self.metrics.bytes_sent.inc(len(frame))
        return written


# -- HTTP -----------------------------------------------------------------------


class _LogsHTTPHandler(JSONHandler):
    def initialize(self, deps: Deps) -> None:
        super().initialize(deps)
        self.logstream = deps.logstream
        self.logs = deps.logs
        self.node_id = deps.config.node_id

    async def authorize(self, roles: frozenset[str]) -> Identity:
        """The caller's identity from ``Authorization: Bearer``, if it has one of ``roles``."""
        return await self.bearer_identity(roles)


@stream_request_body
class LogIngestHandler(_LogsHTTPHandler):
    """``POST /api/v1/logs {entries: [...]}`` (role ``service``) → ``{accepted}``.

    Each entry: ``{level, message, service?, context?, timestamp?, metadata?,
    stack?}``; ``service`` defaults to the token's ``name``. The request is
    all or nothing: one invalid entry fails it with ``VALIDATION_ERROR``.
    """

    async def prepare(self) -> None:
        # A coroutine: tornado reads the body only once it is done.
        self._chunks: list[bytes] = []
        self._size = 0
        self._refusal: errors.GatewayError | None = None
        self._identity: Identity | None = None
        self.request.connection.set_max_body_size(INGEST_DISCARD_LIMIT_BYTES)  # type: ignore[union-attr]
        try:
            self._identity = await self.authorize(WRITER_ROLES)
        except errors.GatewayError as exc:
            self._refusal = exc  # answered once the body is read, so the client sees it
            return
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_INGEST_BODY_BYTES:
            self._refusal = self._too_large()

    def _too_large(self) -> errors.GatewayError:
        return errors.PayloadTooLarge(
            f"At most {MAX_INGEST_BODY_BYTES} bytes per request",
            {"limit": MAX_INGEST_BODY_BYTES},
        )

    def data_received(self, chunk: bytes) -> None:
        if self._refusal is not None:
            return  # discard: memory stays bounded whatever the client sends
        self._size += len(chunk)
        if self._size > MAX_INGEST_BODY_BYTES:
            self._refusal = self._too_large()
            self._chunks = []
            return
        self._chunks.append(chunk)

    def post(self) -> None:
        try:
            if self._refusal is not None:
                raise self._refusal
            assert self._identity is not None
            self.query_args()
            try:
                body = orjson.loads(b"".join(self._chunks))
            except orjson.JSONDecodeError:
                raise errors.BadRequest("Body is not valid JSON") from None
            if not isinstance(body, dict):
                raise errors.BadRequest("Body must be a JSON object")
            loaded = load(IngestBody, body)
        except errors.GatewayError as exc:
            self.send_error_for(exc)
            return
        service = self._identity.username
        for item in loaded["entries"]:
            self.logstream.publish(ingested_entry(item, service, self.node_id))
        self.write_json({"accepted": len(loaded["entries"])})


class RecentQuery(Strict):
    limit = Int(1, MAX_RECENT, load_default=DEFAULT_RECENT)
    level = LevelField(load_default=None)
    service = fields.String(validate=validate.Length(1, 64), load_default=None)


class LogRecentHandler(_LogsHTTPHandler):
    """``GET /api/v1/logs/recent?level=&service=&limit=`` (admin or ``logs``) →
    ``{entries, missing}``, gathered from every node."""

    async def get(self) -> None:
        try:
            await self.authorize(READER_ROLES)
            loaded = self.query_args(RecentQuery, blank_is_absent=True)
        except errors.GatewayError as exc:
            self.send_error_for(exc)
            return
        answer = await self.logs.recent(
            loaded["limit"],
            min_level=LEVELS[loaded["level"]] if loaded["level"] else 0,
            service=loaded["service"],
        )
        self.write_json({"entries": answer["entries"], "missing": answer["missing"]})


class LogStatsHandler(_LogsHTTPHandler):
    """``GET /api/v1/logs/stats`` (admin or ``logs``).

    Answers the cluster's ``{total, buffered, byLevel, byService, recentErrors,
    subscribers}`` plus ``nodes`` (per node, without recentErrors) and ``missing``.
    """

    async def get(self) -> None:
        try:
            await self.authorize(READER_ROLES)
            self.query_args()
        except errors.GatewayError as exc:
            self.send_error_for(exc)
            return
        self.write_json(await self.logs.stats())


#: The routes of this module (:func:`server.app.make_app` gives each the node's deps).
LOGS_ROUTES: list[tuple[str, type[RequestHandler]]] = [
    (r"/ws/logs", LogsHandler),
    (r"/api/v1/logs", LogIngestHandler),
    (r"/api/v1/logs/recent", LogRecentHandler),
    (r"/api/v1/logs/stats", LogStatsHandler),
]
