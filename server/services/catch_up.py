"""Catch-up: a node delivers from the database what its link to the other nodes lost.

A broadcast between nodes travels once, over Redis pub/sub: while Redis is
down, or when a node dies between committing a message and publishing it,
the other nodes' members never hear of that message live. But every
message is in the database with its room's gapless ``seq``, and each hub
remembers which seqs it delivered per room (:class:`~server.realtime.seqs.RoomSeqs`).
So a node repairs what it can see:

* when its Redis link comes back (the broker reports ``resubscribing``,
  then ``restored``), and when another node's does (that node dropped its
  own publishes while down, and says so over the control bus), and
* when a node is lost (reaped by the node registry: the reaper catches up
  and tells every other node to, over the control bus),

it holds the live message frames of every room it has members in, reads
each room's messages above what it delivered, delivers those it has not
(in seq order, at most :data:`CATCH_UP_MAX` per room; beyond that a
``room:resync`` tells the room's members to fetch the rest), then releases
the held frames it has not delivered yet. Members get every message once,
in order, without reconnecting.

The hub knows no chat: this module reads the messages and builds the
``message:new`` frames; the hub holds, dedupes by seq and delivers.

Example::

    catch_up = CatchUp(hub, db, tasks)   # listens to hub.broker's link by itself
    registry = NodeRegistry(..., on_loss=catch_up.after_node_loss)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from models import chat as chat_db
from server.cluster.node_registry import NodeLoss
from server.core import protocol
from server.core.tasks import BackgroundTasks
from server.realtime.broker import LINK_LOST, LINK_RESTORED, LINK_RESUBSCRIBING
from server.realtime.hub import Hub, Target
from server.store.db import Database

log = logging.getLogger("switchboard.catch_up")

#: Most messages one catch-up delivers per room; past them the room's members
#: get ``room:resync`` (a client then fetches the rest with ``room:get_messages``).
CATCH_UP_MAX = 500
#: The control action a reaper sends so that every node catches up.
CATCH_UP_ACTION = "catch_up"


class CatchUp:
    """Delivers, after a lost link or a lost node, what this node's members missed."""

    def __init__(self, hub: Hub, db: Database, tasks: BackgroundTasks) -> None:
        self.hub = hub
        self.db = db
        self.tasks = tasks
        #: :data:`CATCH_UP_MAX`, an attribute so that tests can lower it.
        self.max_per_room = CATCH_UP_MAX
        self._running: asyncio.Task[None] | None = None
        self._again = False
        #: Catch-ups run, and the local deliveries they made (for tests and logs).
        self.runs = 0
        self.delivered = 0
        hub.broker.on_link(self.link_changed)
        hub.broker.on_control(CATCH_UP_ACTION, self._told)

    def link_changed(self, state: str) -> None:
        """The broker's link listener."""
        if state == LINK_RESUBSCRIBING:
            # From now on other nodes' frames may arrive: they wait for the catch-up,
            # which delivers the older messages first.
            self._hold_all()
        elif state == LINK_LOST:
            # A resubscription that failed: nothing to wait for; the next restore catches up.
            for room in self.hub.held_rooms():
                self.hub.release(room)
        elif state == LINK_RESTORED:
            # This node dropped its own publishes while down: the others catch up too.
            node = self.hub.node_id
            self.hub.broker.send_control(CATCH_UP_ACTION, {"why": f"node {node} back on redis"})
            self.start("redis link restored")

    def _told(self, data: dict[str, Any]) -> None:
        """Another node reaped one, or dropped publishes while its link was down."""
        self.start(str(data.get("why", "another node asked")))

    async def after_node_loss(self, loss: NodeLoss) -> None:
        """A node was reaped: what it committed but never published is in the database."""
        self.hub.broker.send_control(CATCH_UP_ACTION, {"why": f"node {loss.node_id} lost"})
        self.start(f"node {loss.node_id} lost")

    def start(self, why: str) -> None:
        """Hold every room with local members and catch them up (again, if one is running)."""
        self._hold_all()
        if self._running is not None:
            self._again = True
            return
        self._running = self.tasks.spawn(self._run(why), name="catch-up")

    async def _run(self, why: str) -> None:
        try:
            while True:
                self._again = False
                await self._catch_up(why)
                if not self._again:
                    return
        finally:
            self._running = None

    def _hold_all(self) -> None:
        for room in self.hub.active_rooms():
            self.hub.hold(room)

    async def _catch_up(self, why: str) -> None:
        # Again for a second round: the first released what it held.
        self._hold_all()
        rooms = self.hub.held_rooms()
        after = {room: seq for room in rooms if (seq := self.hub.seqs.baseline(room)) is not None}
        found: dict[str, list[dict[str, Any]]] = {}
        try:
            if after:
                found = await self.db.run(
                    "message.catch_up", chat_db.messages_after, after, self.max_per_room + 1
                )
        except Exception:
            # Not repaired now; clients still repair holes from the later messages.
            log.warning("catch-up after %s: could not read the rooms", why, exc_info=True)
        self.runs += 1
        delivered = 0
        for room in rooms:
            messages = found.get(room, [])
            frames = [
                (int(message["seq"]), _frame("message:new", {"message": message}))
                for message in messages[: self.max_per_room]
            ]
            delivered += self.hub.release(room, frames)
            if len(messages) > self.max_per_room:
                last = frames[-1][0]
                self.hub.deliver(
                    Target.room(room), _frame("room:resync", {"roomId": room, "afterSeq": last})
                )
        self.delivered += delivered
        if delivered:
            log.warning("catch-up after %s: %d delivery(ies) of missed messages in %d room(s)",
                        why, delivered, len(rooms))  # fmt: skip


def _frame(event: str, data: dict[str, Any]) -> bytes:
    return protocol.frame(protocol.event_payload(event, data))
