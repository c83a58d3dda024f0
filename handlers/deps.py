"""What every handler is given: one frozen bundle of the node's components.

:func:`server.app.make_app` passes the same :class:`Deps` to every route as
its only ``initialize()`` argument (tornado's mechanism, one value instead of
a keyword list). A handler reads what it needs and nothing is swallowed.

Example::

    class Hello(JSONHandler):
        def get(self) -> None:
            self.write_json({"node": self.deps.config.node_id})

    routes = [(r"/hello", Hello, {"deps": deps})]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models import chat as chat_db
from server.core.config import Config
from server.core.limits import RateLimiter
from server.core.tasks import BackgroundTasks
from server.ops.health import Health
from server.ops.metrics import Metrics
from server.ops.stats import Stats
from server.realtime.hub import Hub
from server.realtime.presence import Presence
from server.services.admin_feed import AdminFeed
from server.services.admission import Admission
from server.services.connection_list import ConnectionList
from server.services.logcluster import LogCluster
from server.services.logstream import LogStream
from server.services.messages import Messages
from server.services.moderation import Moderation
from server.services.node_state import NodeState
from server.services.notify import NotificationService
from server.services.rooms import Rooms
from server.services.security import SecurityMonitor
from server.services.typing import TypingTracker
from server.store.batch import Batcher
from server.store.db import Database


@dataclass(frozen=True, slots=True)
class Deps:
    """The node's components, as the handlers see them (built once by the node)."""

    config: Config
    #: Mutable facts about this node (shutting down, sockets awaiting auth).
    state: NodeState
    hub: Hub
    db: Database
    #: Tokens, client addresses, roles, connection limits and bans.
    admission: Admission
    rate_limiter: RateLimiter
    presence: Presence
    metrics: Metrics
    stats: Stats
    tasks: BackgroundTasks
    security: SecurityMonitor
    health: Health
    notifications: NotificationService
    moderation: Moderation
    #: Group commit of ``room:read``.
    reads: Batcher[chat_db.ReadRequest, dict[str, Any]]
    rooms: Rooms
    #: message:send, edit, delete and react: store, broadcast, count.
    messages: Messages
    typing: TypingTracker
    feed: AdminFeed
    logstream: LogStream
    #: The cluster's log streams as one: relay, recent and stats of every node.
    logs: LogCluster
    #: Per-connection details of every node, for admins.
    connection_list: ConnectionList
