"""Building and running a gateway node.

:func:`make_app` wires the routes to their dependencies (one
:class:`~handlers.deps.Deps`, each route's ``initialize()`` argument);
:class:`Node` creates those dependencies from a :class:`Config`, starts
listening and shuts down gracefully.

Example::

    node = Node(Config.from_env(os.environ, port=0))
    await node.start()
    print(node.port)
    ...
    await node.stop()
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from handlers.admin import AdminHandler
from handlers.api import API_ROUTES
from handlers.chat import ChatHandler
from handlers.deps import Deps
from handlers.http import (
    LivenessHandler,
    MetricsHandler,
    ReadinessHandler,
    WebSocketHealthHandler,
    WebSocketStatsHandler,
)
from handlers.logs import LOGS_ROUTES
from handlers.notifications import NotificationsHandler
from handlers.web import web_routes
from models import chat as chat_db
from server import __version__
from server.cluster.node_registry import NodeLoss, NodeRegistry
from server.cluster.redis_broker import RedisBroker
from server.cluster.redis_limits import RedisConnectionLimiter, RedisRateLimiter
from server.cluster.redis_link import ClusterLink
from server.cluster.redis_presence import RedisPresence
from server.core.auth import TokenVerifier
from server.core.config import Config
from server.core.limits import ConnectionLimiter, RateLimiter
from server.core.redaction import log_request
from server.core.tasks import BackgroundTasks
from server.listener import Listener
from server.ops.health import Health, LoopMonitor
from server.ops.metrics import Metrics
from server.ops.stats import Stats
from server.realtime.broker import Broker, MemoryBroker
from server.realtime.hub import Hub
from server.realtime.presence import Presence
from server.services.admin_feed import AdminFeed
from server.services.admission import Admission
from server.services.catch_up import CatchUp
from server.services.connection_list import ConnectionList
from server.services.logcluster import LogCluster
from server.services.logstream import LogStream
from server.services.messages import Messages
from server.services.moderation import Moderation
from server.services.node_loss import announce_node_loss
from server.services.node_state import NodeState
from server.services.notify import NotificationService
from server.services.rooms import Rooms
from server.services.security import SecurityMonitor
from server.services.typing import TypingTracker
from server.store.batch import Batcher
from server.store.db import Database

log = logging.getLogger("switchboard")

# How long shutdown waits for clients to acknowledge the close and for
# in-flight work to finish before it stops waiting.
SHUTDOWN_GRACE_SECS = 5.0
# Largest request body the node reads (tornado's default is 100 MB). REST bodies
# are small JSON (handlers answer 413 above max_message_bytes); the log ingest
# endpoint raises its own per-request limit (handlers/logs.py). Bigger bodies are
# refused by tornado with a bare 400 and the connection is closed, unread.
MAX_HTTP_BODY_BYTES = 1024 * 1024


def make_app(deps: Deps) -> Application:
    """The Tornado application: every route given the same ``deps``.

    WebSocket namespaces, the REST API, health, metrics and the web app.
    """
    handlers: list[tuple[str, type[RequestHandler]]] = [
        (r"/ws/chat", ChatHandler),
        (r"/ws/admin", AdminHandler),
        (r"/ws/notifications", NotificationsHandler),
        *LOGS_ROUTES,
        *API_ROUTES,
        (r"/health", LivenessHandler),
        (r"/health/ready", ReadinessHandler),
        (r"/health/websocket", WebSocketHealthHandler),
        (r"/websocket/health", WebSocketHealthHandler),  # seed 003's path for the same document
        (r"/metrics", MetricsHandler),
        (r"/websocket/stats", WebSocketStatsHandler),
    ]
    routes: list[Any] = [(pattern, handler, {"deps": deps}) for pattern, handler in handlers]
    # The web app last: its static pattern is narrow, but it is rooted at "/".
    routes += web_routes(deps)
    return Application(
        routes,
        websocket_max_message_size=deps.config.max_message_bytes,
        # Pings are sent by the node's single heartbeat sweep, not per connection.
        websocket_ping_interval=0,
        # tornado's access line, with ?token= / ?access_token= values redacted.
        log_function=log_request,
    )


class Node:
    """One gateway process: components, listener, heartbeat, shutdown."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        hub_class: type[Hub] = Hub,
        broker: Broker | None = None,
    ) -> None:
        """``broker`` replaces the one the config implies (e.g. a :class:`MemoryBroker`
        on a bus shared with other nodes of the same process)."""
        self.config = config
        self.registry = registry or CollectorRegistry()
        if registry is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.metrics = Metrics(
            self.registry, config.node_id, __version__, redis_enabled=config.redis_url is not None
        )
        self.state = NodeState(config.node_id)
        self.stats = Stats()
        self.tasks = BackgroundTasks()
        # One Redis client for the cluster components; None on a single node.
        self.redis = aioredis.Redis.from_url(config.redis_url) if config.redis_url else None
        # How broadcasts reach the other nodes: Redis, or nobody (a cluster of one).
        if broker is None:
            broker = (
                RedisBroker(config.node_id, self.redis, prefix=config.redis_prefix,
                            metrics=self.metrics)
                if self.redis is not None else MemoryBroker(config.node_id)
            )  # fmt: skip
        self.broker = broker
        self.hub = hub_class(
            config.node_id, broker=self.broker, on_delivered=self._count_deliveries, coalesce=True
        )
        self.db = Database(
            config.database_url, workers=config.db_workers, observe=self._observe_db
        )
        self.presence: Presence = Presence(config.node_id)
        self.rate_limiter: RateLimiter = RateLimiter(config.rate_limits)
        self.connection_limiter: ConnectionLimiter = ConnectionLimiter(
            config.max_connections_per_user, config.max_connections_per_ip
        )
        # What a lost Redis link or a lost node kept from this node's members.
        self.catch_up = CatchUp(self.hub, self.db, self.tasks)
        # With Redis: cluster-wide presence and limits, node registry and reaper.
        self.node_registry: NodeRegistry | None = None
        if self.redis is not None:
            link = ClusterLink(self.redis, config.redis_prefix, config.node_id)
            presence = RedisPresence(link)
            connection_limiter = RedisConnectionLimiter(
                link, config.max_connections_per_user, config.max_connections_per_ip
            )
            self.presence, self.connection_limiter = presence, connection_limiter
            self.rate_limiter = RedisRateLimiter(link, config.rate_limits)
            self.node_registry = NodeRegistry(
                link, presence, connection_limiter, config.heartbeat_interval,
                local_connections=lambda: len(self.hub.connections),
                on_loss=self._node_lost,
            )  # fmt: skip
        self.loop_monitor = LoopMonitor(on_lag=self.metrics.event_loop_lag.set)
        # Redis health is the broker's own state (subscribed and hearing itself).
        redis_check = self.broker.check if self.redis is not None else None
        self.health = Health(
            self.db, self.hub, self.stats, self.loop_monitor, redis_check=redis_check
        )
        self.typing = TypingTracker(self.hub)
        # Group commit for message:send: one transaction for every send waiting
        # (store_sends opens it: a lone send on SQLite runs its own by hand).
        self.sends: Batcher[chat_db.SendRequest, chat_db.Sent] = Batcher(
            self.db, "message.send", chat_db.store_sends, transaction=False,
            max_batch=config.write_batch_max, observe=self.metrics.write_batch_size.observe,
        )  # fmt: skip
        # The same for connection admission: user upserts, bans, member rooms.
        self.admissions: Batcher[chat_db.ConnectRequest, chat_db.ConnectInfo] = Batcher(
            self.db, "user.connect", chat_db.connect_users,
            max_batch=config.write_batch_max, observe=self.metrics.admission_batch_size.observe,
        )  # fmt: skip
        self.metrics.write_batch_waiting.set_function(lambda: self.sends.waiting)
        # And for message:react: reactions come in bursts (bench.persist --phases react).
        self.reacts: Batcher[chat_db.ReactRequest, dict[str, Any]] = Batcher(
            self.db, "message.react", chat_db.react_many, max_batch=config.write_batch_max
        )
        # And room:read: members of a busy room mark it read as messages arrive.
        self.reads: Batcher[chat_db.ReadRequest, dict[str, Any]] = Batcher(
            self.db, "room.read", chat_db.mark_read_many, max_batch=config.write_batch_max
        )
        self.logstream = LogStream(config.node_id, config.log_buffer_size)
        # Log entries reach every node's subscribers; recent/stats ask every member.
        self.logs = LogCluster(
            self.logstream, self.broker,
            self.node_registry.members if self.node_registry is not None else self.broker.members,
        )  # fmt: skip
        # Notifications (server/services/notify.py) plug in as ``self.moderation.notifier``.
        self.moderation = Moderation(self.hub, self.db, self.tasks)
        self.notifications = NotificationService(
            self.db, self.hub, self.connection_limiter, config.max_notifications_per_user,
            metrics=self.metrics, tasks=self.tasks, batch_max=config.write_batch_max,
        )  # fmt: skip
        self.moderation.notifier = self.notifications
        self.rooms = Rooms(
            self.hub, self.db, self.presence, self.stats, self.typing, self.notifications,
            self.tasks,
        )  # fmt: skip
        self.messages = Messages(
            self.hub, self.sends, self.reacts, self.db, self.metrics, self.stats, self.typing,
            self.notifications,
        )  # fmt: skip
        if self.redis is not None:
            self.moderation.cluster_connections = self.presence.user_connections
        # Security alerts (auth failures, rate-limit abuse) for sockets and REST alike.
        self.security = SecurityMonitor(self.notifications, self.db, self.tasks, self.metrics)
        self.admin_feed = AdminFeed(
            self.hub, self.stats, self.health, self.state, config.metrics_interval
        )
        self.admission = Admission(
            TokenVerifier(config), self.connection_limiter, self.admissions, self.db,
            self.security, config.trusted_proxies,
        )  # fmt: skip
        self.deps = Deps(
            config=config, state=self.state, hub=self.hub, db=self.db,
            admission=self.admission, rate_limiter=self.rate_limiter, presence=self.presence,
            metrics=self.metrics, stats=self.stats, tasks=self.tasks, security=self.security,
            health=self.health, notifications=self.notifications, moderation=self.moderation,
            reads=self.reads, typing=self.typing,
            feed=self.admin_feed, logstream=self.logstream, logs=self.logs,
            rooms=self.rooms, connection_list=ConnectionList(self.hub, self.presence),
            messages=self.messages,
        )  # fmt: skip
        self.app = make_app(self.deps)
        self.server: HTTPServer | None = None
        self.listener: Listener | None = None
        self.sockets: list[socket.socket] = []
        self.port = 0
        self._heartbeat: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None

    async def _node_lost(self, loss: NodeLoss) -> None:
        """The registry reaped a node: tell its users' rooms, deliver what it never published."""
        await announce_node_loss(self.hub, self.db, loss)
        await self.catch_up.after_node_loss(loss)

    def _count_deliveries(self, count: int, nbytes: int) -> None:
        """One broadcast reached ``count`` local connections with ``nbytes`` in all."""
        self.metrics.deliveries.inc(count)
        self.metrics.frames_sent.inc(count)
        self.metrics.bytes_sent.inc(nbytes)

    def _observe_db(self, op: str, secs: float) -> None:
        self.metrics.db_duration.labels(op).observe(secs)

    async def start(self) -> None:
        """Migrate the database, bind the listener, start periodic work."""
        # First, so that start-up records reach /ws/logs and the ring buffer too.
        self.logstream.install(asyncio.get_running_loop())
        await self.db.start()
        if self.node_registry is not None:
            await self.node_registry.start()
        await self.broker.start()  # waits briefly for Redis; starts degraded without it
        self.sockets = bind_sockets(self.config.port, self.config.host, backlog=2048)
        self.port = self.sockets[0].getsockname()[1]
        # One timeout for headers and body: REST bodies are small JSON, and a
        # slow-drip body holds a descriptor as long as slow-drip headers do.
        self.server = HTTPServer(
            self.app, xheaders=False,
            idle_connection_timeout=self.config.header_timeout,
            body_timeout=self.config.header_timeout,
            max_body_size=MAX_HTTP_BODY_BYTES,
        )  # fmt: skip
        # Our accept loop instead of add_sockets(): per-address bound, fd exhaustion.
        self.listener = Listener(
            self.server, self.metrics,
            max_per_ip=self.config.tcp_connections_per_ip, exempt=self.config.trusted_proxies,
        )  # fmt: skip
        self.listener.start(self.sockets)
        if self.config.exposed and not self.config.is_production:
            # Only an explicit SWITCHBOARD_ENV gets here: without one, an exposed
            # host means production (Config.from_env).
            log.warning(
                "%s mode is exposed beyond loopback (listening on %s:%s): its permissive "
                "defaults%s are meant for one machine; set SWITCHBOARD_ENV=production",
                self.config.env, self.config.host, self.port,
                " and POST /dev/token" if self.config.env == "development" else "",
            )  # fmt: skip
        self.loop_monitor.start()
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.create_task(self._heartbeat_loop(), name="heartbeat")
        self._gauges = loop.create_task(self._gauge_loop(), name="gauges")
        self.admin_feed.start()

    @property
    def urls(self) -> dict[str, str]:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        base = f"{host}:{self.port}"
        return {"http": f"http://{base}", "chat": f"ws://{base}/ws/chat", "web": f"http://{base}/"}

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            closed = self.hub.sweep(time.monotonic(), interval + self.config.heartbeat_timeout)
            if closed:
                log.info("heartbeat: closed %d silent connection(s)", closed)

    async def _gauge_loop(self) -> None:
        while True:
            rooms = self.hub.active_rooms()
            self.metrics.set_room_gauges(rooms, self.config.metrics_room_series)
            await asyncio.sleep(1.0)

    async def stop(self, grace_secs: float = SHUTDOWN_GRACE_SECS) -> None:
        """Graceful shutdown: stop accepting, say goodbye, close 1001, drain, close DB."""
        if self.state.shutting_down:
            return
        self.state.shutting_down = True
        if self.listener is not None:
            self.listener.stop()
        for task in (self._heartbeat, self._gauges):
            if task is not None:
                task.cancel()
        # Sockets still waiting for their auth frame are in no hub: close them too.
        conns = [*self.hub.connections.values(), *self.state.awaiting_auth]
        for conn in conns:
            send_event = getattr(conn, "send_event", None)
            if send_event is not None:
                send_event("system:disconnect", {"reason": "server_shutdown", "reconnect": True})
            conn.close_with(1001, "server shutting down")
        deadline = time.monotonic() + grace_secs
        while self.hub.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.tasks.drain(max(0.1, deadline - time.monotonic()))
        await self.loop_monitor.stop()
        self.logs.close()
        await self.broker.stop()
        await self.admin_feed.stop()
        if self.node_registry is not None:
            await self.node_registry.stop()
        await self.db.close()
        if self.server is not None:
            await self.server.close_all_connections()
        if self.redis is not None:
            await self.redis.aclose()
        log.info("node %s stopped", self.config.node_id)
        self.logstream.uninstall()
