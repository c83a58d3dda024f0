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
from server.admin_feed import AdminFeed
from server.admission import Admission
from server.batch import Batcher
from server.config import Config
from server.db import Database
from server.health import Health
from server.hub import Hub
from server.limits import RateLimiter
from server.logstream import LogStream
from server.metrics import Metrics
from server.moderation import Moderation
from server.node_state import NodeState
from server.notify import NotificationService
from server.presence import Presence
from server.rooms import Rooms
from server.security import SecurityMonitor
from server.stats import Stats
from server.tasks import BackgroundTasks
from server.typing import TypingTracker


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
    #: Group commit of ``message:send``.
    sends: Batcher[chat_db.SendRequest, chat_db.Sent]
    #: Group commit of ``message:react`` and of ``room:read``.
    reacts: Batcher[chat_db.ReactRequest, dict[str, Any]]
    reads: Batcher[chat_db.ReadRequest, dict[str, Any]]
    rooms: Rooms
    typing: TypingTracker
    feed: AdminFeed
    logstream: LogStream
