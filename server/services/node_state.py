"""What a node knows about itself that every surface consults.

The node's id and start time (``system:welcome``, ``/websocket/stats``,
``admin:stats``), whether it is shutting down (new connections and REST
writes are refused with SERVICE_UNAVAILABLE), and the sockets upgraded
without a token that are waiting for their ``auth:connect`` frame: they are
in no hub yet, so shutdown finds them here.

Example::

    state = NodeState("node-a")
    state.shutting_down = True
"""

from __future__ import annotations

import time

from server.realtime.hub import Connection


class NodeState:
    """Mutable facts about the node (see module docstring)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        #: Wall-clock start (``time.time()``), for uptimes.
        self.started_at = time.time()
        self.shutting_down = False
        #: Sockets upgraded without a token, waiting for their auth:connect frame.
        self.awaiting_auth: set[Connection] = set()
