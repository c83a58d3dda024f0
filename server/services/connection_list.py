"""Per-connection details for admins, gathered from every node on request.

``admin:online_users`` and ``/websocket/stats`` list connections with their
client address, user agent, start time, node, namespace and frame counts.
Each node knows its own connections; a listing asks every node that may hold
some over the broker's control bus and gathers the answers, waiting at most
:data:`ASK_TIMEOUT_SECS` (a node that did not answer in time is named in
``missingNodes``, and the listing is what the others said).

Why a request over the control bus rather than a hash per node in Redis:
nothing is written anywhere when a connection opens, closes or sends a
frame. A connection pays for its counters (plain ints on its handler and its
outbound writer) and nothing else -- no Redis write at connect, no periodic
flush of counters, no clean-up of a dead node's records -- and the figures
are the live ones. The cost is at listing time, which is rare and admin-only:
each node scans its own connections once and answers at most
:data:`ANSWER_MAX_CONNECTIONS` of them. Measured (2026-11-27, 2 loaded
cores): the counters add 42 bytes of Python allocations per idle connection
(``bench.idle --tracemalloc``, 3,000 connections; RSS per connection 19.3-19.8
KiB before and 19.2-19.9 KiB after, within the run-to-run noise) and two int
increments per frame; a node picks a page of 500 among 10,000 connections in
about 5 ms, the connections of 500 users in about 1 ms.

A connection describes itself (:class:`Listed`); the gateway handlers do,
from what they hold anyway (the handshake's headers, the resolved client
address), so idle connections carry no extra copies.

Example::

    listing = ConnectionList(hub, presence)
    page = await listing.page(limit=50, after=None)          # every node, by connection id
    mine = await listing.of_users(["alice"], nodes={"a", "b"})  # alice's, on a and b
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from server.realtime.hub import Connection, Hub
from server.realtime.presence import Presence

log = logging.getLogger("switchboard.admin")

#: What a listing asks every node over the broker (Broker.serve / Broker.ask).
ASK_ACTION = "connections"
#: How long a listing waits for the other nodes: a live node answers in
#: milliseconds; a node that is dying, or cut off from Redis, is not waited for.
ASK_TIMEOUT_SECS = 2.0
#: The most connections one node puts in an answer (a page asks for at most
#: 500; a page of 500 users holds at most their connection limits' worth).
ANSWER_MAX_CONNECTIONS = 2000
#: User agents are listed up to this many characters, control characters removed.
USER_AGENT_MAX_CHARS = 256

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def clean_user_agent(value: str | None) -> str:
    """A client's ``User-Agent`` as an admin may see it: printable and bounded."""
    if not value:
        return ""
    return _CONTROL.sub("", value[: USER_AGENT_MAX_CHARS * 2])[:USER_AGENT_MAX_CHARS]


class Listed(Protocol):
    """A connection that describes itself for the listing (the gateway handlers)."""

    def describe(self) -> dict[str, Any]:
        """``{connectionId, userId, namespace, ip, userAgent, connectedAt, framesIn,
        framesOut, bytesIn, bytesOut}`` (the node is added by the listing)."""


def _describe(conn: Connection, node: str) -> dict[str, Any]:
    describe = getattr(conn, "describe", None)
    if describe is not None:
        details: dict[str, Any] = describe()
    else:  # not a gateway handler (e.g. a test's connection): what the hub knows
        details = {"connectionId": conn.conn_id, "userId": conn.user_id,
                   "namespace": conn.namespace}  # fmt: skip
    details["node"] = node
    return details


@dataclass(frozen=True, slots=True)
class Listing:
    """Connections gathered from the nodes, with who answered."""

    connections: list[dict[str, Any]]
    #: Connections matching the query on the nodes that answered (before the page).
    total: int
    #: Connections after the page's last one (a page): there is a next page.
    more: bool
    missing_nodes: list[str]


class ConnectionList:
    """Per-connection details of every node, on request (see the module docstring)."""

    def __init__(
        self, hub: Hub, presence: Presence, *, timeout_secs: float = ASK_TIMEOUT_SECS
    ) -> None:
        self.hub = hub
        self.presence = presence
        self.node_id = hub.node_id
        self.timeout_secs = timeout_secs
        hub.broker.serve(ASK_ACTION, self.local)

    async def page(self, limit: int, after: str | None) -> Listing:
        """Up to ``limit`` connections of the cluster by connection id, after ``after``."""
        nodes = {n["id"] for n in await self.presence.nodes()}
        listing = await self._gather({"after": after, "limit": limit}, nodes)
        listing.connections.sort(key=lambda c: str(c["connectionId"]))
        more = len(listing.connections) > limit or listing.more
        del listing.connections[limit:]
        return Listing(listing.connections, listing.total, more, listing.missing_nodes)

    async def of_users(self, user_ids: Iterable[str], nodes: Iterable[str]) -> Listing:
        """Every connection of ``user_ids`` on ``nodes`` (where presence says they are)."""
        users = sorted(set(user_ids))
        if not users:
            return Listing([], 0, False, [])
        listing = await self._gather({"users": users, "limit": ANSWER_MAX_CONNECTIONS}, set(nodes))
        listing.connections.sort(key=lambda c: (str(c["userId"]), str(c["connectionId"])))
        return listing

    # -- one node's share -------------------------------------------------------

    def local(self, query: dict[str, Any]) -> dict[str, Any]:
        """This node's answer to ``query`` (``users``, ``after``, ``limit``)."""
        users, after = query.get("users"), query.get("after")
        limit = min(int(query.get("limit") or ANSWER_MAX_CONNECTIONS), ANSWER_MAX_CONNECTIONS)
        conns: Iterable[Connection]
        if users is not None:
            conns = [c for u in users for c in self.hub.user_connections(str(u))]
        else:
            conns = self.hub.connections.values()
        total = 0
        matching = []
        for conn in conns:
            total += 1
            if after is None or conn.conn_id > after:
                matching.append(conn)
        chosen = heapq.nsmallest(limit, matching, key=lambda c: c.conn_id)
        return {
            "node": self.node_id,
            "connections": [_describe(c, self.node_id) for c in chosen],
            "total": total,
            "more": len(matching) > len(chosen),
        }

    # -- over the control bus ---------------------------------------------------

    async def _gather(self, query: dict[str, Any], nodes: set[str]) -> Listing:
        """This node's answer and those of ``nodes`` (waited for, within the timeout)."""
        answers = {self.node_id: self.local(query)}
        others, missing = await self.hub.broker.ask(ASK_ACTION, query, nodes, self.timeout_secs)
        answers.update(others)
        return Listing(
            [c for a in answers.values() for c in a["connections"]],
            total=sum(int(a["total"]) for a in answers.values()),
            more=any(a["more"] for a in answers.values()),
            missing_nodes=missing,
        )
