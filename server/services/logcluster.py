"""Cluster-wide logs: live entries reach every node's subscribers; recent and stats gather.

A :class:`~server.services.logstream.LogStream` serves one node: its ring
buffer, its counters, its ``/ws/logs`` subscribers. :class:`LogCluster`
joins the streams of a cluster over the broker's control bus
(server/realtime/broker.py; Redis pub/sub in a cluster, a
:class:`~server.realtime.broker.MemoryBus` for nodes of one process).

Live entries. Every entry a node stores (its own records and what
``POST /api/v1/logs`` ingested there) is sent once, on the channel of its
level (``logs:{LEVEL}``). Entries are relayed in batches: those stored
within :data:`RELAY_FLUSH_SECS` go together, in the order they were
stored, one message per run of one level (at most
:data:`RELAY_BATCH_ENTRIES`), so ingesting 500 entries costs a few
publishes, not 500. A node hears a level's channel only while one of its
subscribers wants that level (its minimum or above): the level filter is
applied by the broker, before anything crosses the network, and the other
filters (services, contexts, contains) by the receiving node. A received
entry is delivered to local subscribers only, through the same bounded
backlogs as local entries (handlers/logs.py), never buffered or counted:
it belongs to its origin's ring buffer and stats. The origin's broker does
not hear its own messages, so each subscriber gets each entry once.

Gathering. :meth:`LogCluster.recent` and :meth:`LogCluster.stats` ask the
other nodes (``Broker.ask`` of :data:`GATHER_ACTION`: a question to all, each
answers on the asker's node channel) and wait until every member has answered, at
most :data:`GATHER_TIMEOUT_SECS`. Members are what the node registry lists
(a killed node until it is reaped; one that stopped cleanly has left), or
the nodes of a memory bus. A member that has not answered in time is
listed in ``missing``; its entries and counts are not in the answer. One
node's answer to ``recent`` is bounded to :data:`GATHER_ANSWER_MAX_BYTES`.

Example::

    logs = LogCluster(stream, broker, members=registry.members)
    stream.subscribe("conn-1", LogFilter(), sink)
    await logs.wait_heard()        # entries stored on other nodes now reach sink
    answer = await logs.recent(100)  # {"entries", "truncated", "missing"}
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from server.realtime.broker import Broker
from server.services.logstream import (
    LEVELS,
    RECENT_ERRORS_KEPT,
    LogEntry,
    LogStream,
    fit_entries,
)

log = logging.getLogger("switchboard.logstream.cluster")

#: The interest kind of the level channels (``logs:{LEVEL}``).
LOGS_INTEREST = "logs"
ENTRIES_ACTION = "logs_entries"
GATHER_ACTION = "logs"

#: Entries stored within this window are relayed together (latency vs. publishes).
RELAY_FLUSH_SECS = 0.02
#: Entries in one relayed message.
RELAY_BATCH_ENTRIES = 100
#: Entries waiting for the next relay; beyond this they are not relayed (counted),
#: so a logging storm cannot grow the node's memory. Local subscribers still get them.
RELAY_PENDING_MAX = 10_000
#: How long recent/stats wait for the other nodes' answers.
GATHER_TIMEOUT_SECS = 1.0
#: One node's ``recent`` answer at most (the newest entries that fit).
GATHER_ANSWER_MAX_BYTES = 1024 * 1024
# Fields every relayed entry has; a message without them is ignored.
_ENTRY_KEYS = frozenset({"timestamp", "level", "service", "context", "message"})

Members = Callable[[], Awaitable[frozenset[str] | None]]


def _timestamp(entry: LogEntry) -> str:
    # Wire timestamps are fixed-width ISO-8601 UTC: text order is time order.
    return str(entry["timestamp"])


class LogCluster:
    """The log streams of every node as one (see the module docstring).

    ``members`` lists the cluster's nodes (None when unknown: then a gather
    waits the whole timeout and reports nobody missing).
    """

    def __init__(self, stream: LogStream, broker: Broker, members: Members) -> None:
        self.stream = stream
        self.broker = broker
        self.node_id = stream.node_id
        self._members = members
        self.gather_timeout_secs = GATHER_TIMEOUT_SECS
        #: The levels this node hears from the others.
        self.heard: frozenset[str] = frozenset()
        self._outbox: list[LogEntry] = []
        self._flush: asyncio.TimerHandle | None = None
        #: Entries not relayed because :data:`RELAY_PENDING_MAX` were waiting.
        self.relay_dropped = 0
        stream.on_stored = self._relay
        stream.on_subscribers_changed = self._follow_subscribers
        broker.on_control(ENTRIES_ACTION, self._on_entries)
        broker.serve(GATHER_ACTION, self._answer)

    # -- live entries ---------------------------------------------------------------

    def _follow_subscribers(self) -> None:
        """Hear exactly the levels some local subscriber wants."""
        lowest = self.stream.lowest_level_wanted()
        wanted = frozenset(
            name for name, number in LEVELS.items() if lowest is not None and number >= lowest
        )
        for level in wanted - self.heard:
            self.broker.interest(LOGS_INTEREST, level, True)
        for level in self.heard - wanted:
            self.broker.interest(LOGS_INTEREST, level, False)
        self.heard = wanted

    async def wait_heard(self) -> bool:
        """Wait until the other nodes' entries of every level heard reach this node.

        False when that cannot be confirmed (the link is down, or slow).
        """
        confirmed = await asyncio.gather(
            *(self.broker.wait_subscribed(LOGS_INTEREST, level) for level in self.heard)
        )
        return all(confirmed)

    def _relay(self, entry: LogEntry) -> None:
        if len(self._outbox) >= RELAY_PENDING_MAX:
            self.relay_dropped += 1
            if self.relay_dropped == 1:
                log.warning("log relay: over %d entries waiting; not relaying more",
                            RELAY_PENDING_MAX)  # fmt: skip
            return
        self._outbox.append(entry)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(RELAY_FLUSH_SECS, self.flush)

    def flush(self) -> None:
        """Send the waiting entries now, in order, one message per run of one level."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        outbox, self._outbox = self._outbox, []
        batch: list[LogEntry] = []
        for entry in outbox:
            if batch and (entry["level"] != batch[0]["level"] or len(batch) >= RELAY_BATCH_ENTRIES):
                self._send(batch)
                batch = []
            batch.append(entry)
        if batch:
            self._send(batch)

    def _send(self, batch: list[LogEntry]) -> None:
        level = batch[0]["level"]
        self.broker.send_control(
            ENTRIES_ACTION, {"entries": batch}, interest=(LOGS_INTEREST, level)
        )

    def _on_entries(self, data: dict[str, Any]) -> None:
        entries = data.get("entries")
        if not isinstance(entries, list):
            return
        for entry in entries:
            if isinstance(entry, dict) and _ENTRY_KEYS <= entry.keys():
                self.stream.receive(entry)

    def close(self) -> None:
        """Relay what is waiting and stop relaying (the node is stopping; the broker
        still runs, and would only count later entries as dropped publishes)."""
        self.stream.on_stored = None
        self.flush()

    # -- recent and stats for the cluster -------------------------------------------

    async def recent(
        self, limit: int, *, min_level: int = 0, service: str | None = None
    ) -> dict[str, Any]:
        """``{entries (oldest first), truncated, missing}``: the newest ``limit`` matching
        entries of every node, merged by time."""
        args = {"limit": limit, "minLevel": min_level, "service": service}
        answers, missing = await self._gather("recent", args)
        answers[self.node_id] = self._answer({"op": "recent", "args": args})
        entries: list[LogEntry] = []
        truncated = False
        for answer in answers.values():
            entries.extend(answer["entries"])
            truncated = truncated or answer["truncated"]
        entries.sort(key=_timestamp)
        return {"entries": entries[-limit:], "truncated": truncated, "missing": missing}

    async def stats(self) -> dict[str, Any]:
        """Cluster totals ``{total, buffered, byLevel, byService, recentErrors,
        subscribers}`` plus ``nodes`` (each node's counts) and ``missing``."""
        answers, missing = await self._gather("stats", {})
        answers[self.node_id] = self.stream.stats()
        by_level: Counter[str] = Counter()
        by_service: Counter[str] = Counter()
        errors: list[LogEntry] = []
        nodes: dict[str, dict[str, Any]] = {}
        for node, answer in sorted(answers.items()):
            by_level.update(answer["byLevel"])
            by_service.update(answer["byService"])
            errors.extend(answer["recentErrors"])
            nodes[node] = {key: value for key, value in answer.items() if key != "recentErrors"}
        errors.sort(key=_timestamp, reverse=True)
        return {
            "total": sum(n["total"] for n in nodes.values()),
            "buffered": sum(n["buffered"] for n in nodes.values()),
            "byLevel": {name: by_level.get(name, 0) for name in LEVELS},
            "byService": dict(by_service),
            "recentErrors": errors[:RECENT_ERRORS_KEPT],
            "subscribers": sum(n["subscribers"] for n in nodes.values()),
            "nodes": nodes,
            "missing": missing,
        }

    def _answer(self, query: dict[str, Any]) -> dict[str, Any]:
        """This node's part of a gathering: ``{op: "recent" | "stats", args}``."""
        op, args = query.get("op"), query.get("args") or {}
        if op == "stats":
            return self.stream.stats()
        entries = self.stream.recent(
            int(args["limit"]), min_level=int(args["minLevel"]), service=args["service"]
        )
        entries, truncated = fit_entries(entries, GATHER_ANSWER_MAX_BYTES)
        return {"entries": entries, "truncated": truncated}

    async def _gather(self, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The other nodes' answers, and the members that gave none in time."""
        return await self.broker.ask(
            GATHER_ACTION, {"op": op, "args": args}, await self._members(),
            self.gather_timeout_secs,
        )  # fmt: skip
