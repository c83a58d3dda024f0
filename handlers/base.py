"""The base WebSocket handler every namespace shares.

It owns the mechanics once: authentication at connect (a handshake token,
or an ``auth:connect`` first frame when the handshake has none), role checks,
connection limits, the envelope, dispatch of ``"room:join"`` to
``on_room_join`` with the data loaded by the event's marshmallow schema,
acks and errors, rate limits, bad-frame accounting, heartbeat bookkeeping,
token expiry, and clean-up on close. A namespace subclass declares its
``namespace``, ``allowed_roles``, ``schemas`` and ``rate_classes`` and
implements ``on_<event>`` methods returning the ack data.

Example::

    class EchoHandler(GatewayHandler):
        namespace = "echo"
        schemas = {"echo:say": SaySchema}

        async def on_echo_say(self, text: str) -> dict:
            return {"text": text}
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any, ClassVar

from marshmallow import Schema
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from handlers.schemas import AuthRefresh, Ping, load
from models import chat as chat_db
from server import errors, protocol
from server.auth import Identity, TokenVerifier
from server.batch import Batcher
from server.config import Config
from server.db import Database
from server.hub import Hub, Target
from server.limits import ConnectionLimiter, RateLimiter
from server.metrics import Metrics
from server.outbound import SLOW_CONSUMER_CLOSE_GRACE_SECS, Outbound
from server.presence import Presence
from server.security import SecurityMonitor
from server.stats import Stats
from server.tasks import BackgroundTasks

log = logging.getLogger("switchboard.ws")

# A client sending this many bad frames within the window is closed with 4400.
BAD_FRAME_LIMIT = 20
BAD_FRAME_WINDOW_SECS = 10.0
# auth:expiring goes out this long before exp (or at half the remaining time).
AUTH_EXPIRY_WARNING_SECS = 60.0
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


class NodeState:
    """Mutable facts about the node that handlers consult (shutting down...)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.started_at = time.time()
        self.shutting_down = False
        #: Sockets upgraded without a token, waiting for their auth:connect frame:
        #: in no hub yet, so shutdown finds them here.
        self.awaiting_auth: set[GatewayHandler] = set()


class GatewayHandler(WebSocketHandler):
    """Shared mechanics of the gateway's namespaces (see module docstring)."""

    #: Namespace name as it appears in ``system:welcome`` and metrics.
    namespace: ClassVar[str] = ""
    #: Roles of which a connection needs at least one; None admits any user.
    allowed_roles: ClassVar[frozenset[str] | None] = None
    #: Inbound events of this namespace and the schema loading each one's data.
    schemas: ClassVar[dict[str, type[Schema]]] = {}
    #: Rate-limit class per event; unlisted events count as "other".
    rate_classes: ClassVar[dict[str, str]] = {}

    _base_schemas: ClassVar[dict[str, type[Schema]]] = {
        "system:ping": Ping,
        "auth:refresh": AuthRefresh,
    }

    def initialize(
        self,
        config: Config,
        hub: Hub,
        db: Database,
        verifier: TokenVerifier,
        rate_limiter: RateLimiter,
        connection_limiter: ConnectionLimiter,
        presence: Presence,
        metrics: Metrics,
        tasks: BackgroundTasks,
        state: NodeState,
        stats: Stats,
        security: SecurityMonitor,
        admissions: Batcher[chat_db.ConnectRequest, chat_db.ConnectInfo],
    ) -> None:
        self.config = config
        self.hub = hub
        self.db = db
        self.verifier = verifier
        self.rate_limiter = rate_limiter
        self.connection_limiter = connection_limiter
        self.presence = presence
        self.metrics = metrics
        self.tasks = tasks
        self.state = state
        self.stats = stats
        self.security = security
        self.admissions = admissions
        self.conn_id = uuid.uuid4().hex
        self.user_id = ""
        self.log = ConnectionLog(log, self)
        self.connected_at = time.monotonic()
        self.identity: Identity | None = None
        self.member_rooms: list[str] = []
        self.last_seen = time.monotonic()
        self.client_ip = ""
        self._registered = False
        self._limit_held = False
        self._closing = False
        #: Every frame to the peer goes through here (budget, slow-consumer rule).
        self.outbound = Outbound(self.config.max_outbound_bytes, on_slow=self._slow_consumer)
        self._gone = False
        self._bad_frames = 0
        self._bad_window_start = 0.0
        self._timers: list[asyncio.TimerHandle] = []
        self._close_reason = "client"
        # True from a token-less handshake until its first frame (auth:connect).
        self._awaiting_auth = False
        self.event_started = time.perf_counter()

    # -- handshake ------------------------------------------------------------

    def check_origin(self, origin: str) -> bool:
        allowed = self.config.allowed_origins
        return "*" in allowed or origin.rstrip("/") in allowed

    def get_compression_options(self) -> dict[str, Any] | None:
        # Off: broadcasts write one pre-built, uncompressed frame to everyone.
        return None

    def _token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip() or None
        token = self.get_query_argument("token", None)
        if token:
            return token
        return self.get_cookie("access_token")

    def _remote_ip(self) -> str:
        peer = self.request.remote_ip or ""
        proxies = self.config.trusted_proxies
        forwarded = self.request.headers.get("X-Forwarded-For")
        if not proxies or not forwarded or not _in_networks(peer, proxies):
            return peer
        # Walk from the nearest hop outwards; the first untrusted address is the client.
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        for hop in reversed(hops):
            if not _in_networks(hop, proxies):
                return hop
        return hops[0] if hops else peer

    async def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        ws = self.ws_connection
        if ws is not None and ws.stream is not None:
            self.outbound.attach(ws.stream)
        self.client_ip = self._remote_ip()
        token = self._token()
        if token is None:
            # Browsers cannot set headers, and a URL token ends up in access
            # logs: the token comes in the first frame instead (on_message).
            # Until then the connection is in no hub, presence or limit.
            self._awaiting_auth = True
            self.state.awaiting_auth.add(self)
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(self.config.auth_timeout, self._auth_timed_out))
            return
        await self._authenticate(token, None)

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
        if isinstance(exc, errors.Unauthorized | errors.TokenExpired):
            # Counted per (unverified) sub: repeated failures raise an alert.
            self.security.auth_failed(token, exc.code)
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
        for timer in self._timers:
            timer.cancel()
        self._timers = []
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
        identity = self.verifier.verify(token)
        if self.allowed_roles is not None and not identity.has_any(self.allowed_roles):
            raise errors.Forbidden(
                f"The {self.namespace} namespace needs one of the roles "
                f"{', '.join(sorted(self.allowed_roles))}"
            )
        self.identity = identity
        self.user_id = identity.user_id
        exceeded = await self.connection_limiter.acquire(
            self.user_id, self.namespace, self.client_ip
        )
        if exceeded:
            raise errors.TooManyConnections(
                f"Too many connections per {exceeded}",
                {"limit": self.connection_limiter.per_user
                 if exceeded == "user" else self.connection_limiter.per_ip, "per": exceeded},
            )  # fmt: skip
        self._limit_held = True
        # With the connections arriving alongside: one transaction records them
        # all; a banned user's own outcome is BANNED, a database outage's
        # SERVICE_UNAVAILABLE for the whole batch.
        info = await self.admissions.submit(chat_db.ConnectRequest(
            identity.user_id, identity.username, identity.display_name,
            tuple(sorted(identity.roles)),
        ))  # fmt: skip
        if self._gone:
            # The peer left while we were checking; on_close already ran.
            await self._release_limit()
            return
        self.member_rooms = info.room_ids
        self.hub.add(self)
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
        for timer in self._timers:
            timer.cancel()
        loop = asyncio.get_running_loop()
        remaining = expires_at - time.time()
        warn_in = remaining - min(AUTH_EXPIRY_WARNING_SECS, remaining / 2)
        self._timers = [
            loop.call_later(max(0.0, warn_in), self._warn_expiry, expires_at),
            loop.call_later(max(0.0, remaining), self._expire),
        ]

    def _warn_expiry(self, expires_at: float) -> None:
        expires_in = max(0.0, round(expires_at - time.time(), 3))
        self.send_event("auth:expiring", {"expiresIn": expires_in})

    def _expire(self) -> None:
        exc = errors.TokenExpired("Token expired; reconnect with a fresh token")
        self._close_reason = "token_expired"
        self.send_payload(protocol.system_error_payload(exc, None))
        self.close_with(4401, exc.message)

    async def on_auth_refresh(self, token: str) -> dict[str, Any]:
        identity = self.verifier.verify(token)
        if identity.user_id != self.user_id:
            raise errors.Unauthorized("The new token is for another user")
        if self.allowed_roles is not None and not identity.has_any(self.allowed_roles):
            raise errors.Forbidden("The new token lacks the roles this namespace needs")
        self.identity = identity
        self._schedule_expiry(identity.expires_at)
        return {"expiresAt": protocol.iso(_from_epoch(identity.expires_at))}

    # -- inbound frames -------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        self.last_seen = time.monotonic()
        if not self._registered:
            if self._awaiting_auth:
                await self._on_auth_frame(message)
            return
        self.metrics.frames_received.inc()
        self.metrics.bytes_received.inc(len(message))
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
        """Dispatch one decoded frame and answer it (ack or ``system:error``)."""
        event = envelope.event
        schema = self.schemas.get(event) or self._base_schemas.get(event)
        label = event if schema is not None else "unknown"
        self.metrics.events.labels(self.namespace, label).inc()
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
        try:
            decision = await self.rate_limiter.hit(
                self.user_id, self.rate_classes.get(event, "other")
            )
            if not decision.allowed:
                bucket = self.rate_classes.get(event, "other")
                self.metrics.rate_limited.labels(bucket).inc()
                self.security.rate_limited(self.user_id, bucket)
                raise errors.RateLimited(details=decision.details())
            kwargs = load(schema, envelope.data)
            method = getattr(self, "on_" + event.replace(":", "_"))
            result = await method(**kwargs)
            if envelope.ack is not None:
                self.send_soon(protocol.ack_payload(envelope.ack, result or {}))
        except errors.GatewayError as exc:
            self._answer_error(exc, envelope.ack, event)
        except (WebSocketClosedError, StreamClosedError):
            pass
        except Exception:
            self.log.exception("%s %s failed for user %s", self.namespace, event, self.user_id,
                               extra={"event": event})  # fmt: skip
            self._answer_error(errors.InternalError(), envelope.ack, event)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.event_duration.labels(self.namespace, label).observe(elapsed)
            # For p50/p95 in the admin namespace's metrics:update.
            self.stats.latency.add(elapsed)

    def _answer_error(self, exc: errors.GatewayError, ack: int | None, event: str | None) -> None:
        self.metrics.errors.labels(exc.code).inc()
        self.stats.errors.add()
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

    def write_frame(self, frame: bytes) -> bool:
        """:meth:`send_frame` without the metrics: the hub counts broadcasts in bulk."""
        return self.outbound.write(frame)

    def send_soon(self, payload: bytes) -> None:
        """Like :meth:`send_payload`, but written with this iteration's broadcasts.

        For acks (see :meth:`server.hub.Hub.send_soon`): one ``send()`` per
        connection and loop iteration, not one per ack.
        """
        frame = protocol.frame(payload)
        if self.hub.send_soon(self, frame):
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
        for timer in self._timers:
            timer.cancel()
        self._timers = []
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
        if self._limit_held:
            self._limit_held = False
            await self.connection_limiter.release(self.user_id, self.namespace, self.client_ip)

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

    @property
    def is_staff(self) -> bool:
        return self.identity is not None and self.identity.is_staff


def _in_networks(
    address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _from_epoch(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)
