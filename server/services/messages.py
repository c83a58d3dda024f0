"""Messages: what ``message:send``, ``edit``, ``delete`` and ``react`` do, whoever asks.

The chat handler translates frames; this service stores (a send through
the group-commit batcher) and broadcasts, and counts what a message
counts: metrics, stats, the sender's typing indicator, the notifications
it queues. A message is committed before its ack and before its
``message:new`` leaves. The sender's ack is written first and the rest
(typing stop, broadcast, counting, notifications) follows it, both from the
group-commit batcher's ``on_result``: in the loop iteration that learns of
the commit, in request order, before the sending handler's task resumes (a
loop iteration and a wake-up later). On a quiet node a lone send's ack
leaves sooner still, from the database thread right after the commit
(``answer_now``, the batcher's ``on_commit``). A batch's sends thus reach
the hub in the order a handler per send would have written them -- ack,
then broadcast, send after send -- and every connection keeps its frames in
seq order.

A send answered ``duplicate`` (a retry of a stored message: e.g. its node
stored it and died before acking, and the client retried here) broadcasts
the stored message again when it is recent
(:data:`DUPLICATE_REBROADCAST_SECS`): whether any node broadcast the
original is unknown here, and a node that did drops the second copy (each
hub delivers a room's seq once, :class:`~server.realtime.seqs.RoomSeqs`),
so only the members who missed it get it; clients dedupe by
``(roomId, seq)`` besides.

Example::

    messages = Messages(hub, sends, reacts, db, metrics, stats, typing, notifications)
    # write_ack(data) runs once the message is committed, before send returns.
    data = await messages.send(author, request, started=time.perf_counter(), answer=write_ack)
    # direct.from_writer(data) may run on the database thread first, right after the commit.
    data = await messages.send(author, request, started=..., answer=write_ack, answer_now=direct)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from models import chat as chat_db
from server.ops.metrics import Metrics
from server.ops.stats import Stats
from server.realtime.hub import Hub, Target
from server.services.notify import NotificationService
from server.services.typing import TypingTracker
from server.store.batch import Batcher
from server.store.db import Database

#: A retry answered ``duplicate`` re-broadcasts a message stored this recently
#: (a retry comes within seconds; an old one would reach a node that forgot
#: the room's seqs, its members left meanwhile, as a stale live message).
DUPLICATE_REBROADCAST_SECS = 120.0
#: A send's ack may leave from the database thread (``answer_now``) when the
#: hub flushed nothing for this long before it: a quiet node, whose loop
#: sleeps while the commit runs and would have to wake to write the ack. On
#: a busy node the loop is awake anyway, and acks written off it only made
#: its sends arrive one by one instead of in batches: rooms of 1,000 fell from
#: ~165k to ~100k deliveries/s (bench/README.md). 5 ms pass between a quiet
#: node's sends at 200 msg/s; a busy one flushes without pause.
DIRECT_ACK_QUIET_SECS = 0.001


class AnswerNow(Protocol):
    """What can write a send's ack from the database thread (the chat handler's ``EarlyAck``)."""

    def lend(self) -> None:
        """On the loop, before the send is queued: let :meth:`from_writer` write."""

    def from_writer(self, data: dict[str, Any]) -> Callable[[], object] | None:
        """On the database thread, right after the commit: what writes the ack, if it can.

        Called before the outcome crosses to the loop; what it returns, right after.
        """


@dataclass(frozen=True, slots=True)
class Author:
    """Who acts: the user's public dict (as events carry it) and their connection."""

    conn_id: str
    #: ``{userId, username, displayName}``.
    user: dict[str, Any]
    namespace: str = "chat"

    @property
    def user_id(self) -> str:
        user_id: str = self.user["userId"]
        return user_id


@dataclass(slots=True)
class Messages:
    """Sending, editing, deleting and reacting to messages (see the module docstring)."""

    hub: Hub
    sends: Batcher[chat_db.SendRequest, chat_db.Sent]
    reacts: Batcher[chat_db.ReactRequest, dict[str, Any]]
    db: Database
    metrics: Metrics
    stats: Stats
    typing: TypingTracker
    notifications: NotificationService
    #: See :data:`DIRECT_ACK_QUIET_SECS` (0: whenever the batcher allows).
    quiet_secs: float = DIRECT_ACK_QUIET_SECS

    async def send(
        self,
        author: Author,
        request: chat_db.SendRequest,
        *,
        started: float,
        answer: Callable[[dict[str, Any]], object] | None = None,
        answer_now: AnswerNow | None = None,
    ) -> dict[str, Any]:
        """Store ``request`` (group commit); returns the ack's data.

        Once the message is committed, before this returns: ``answer`` is
        called with the ack's data (the caller writes the sender's ack there),
        then the room's broadcast and the rest follow. ``started`` is when the
        event arrived (``time.perf_counter()``), for the publish latency metric.
        ``answer_now``, when given, may get the ack's data before that, on the
        database thread right after the commit (``from_writer``), on a quiet
        node (:data:`DIRECT_ACK_QUIET_SECS`; it is then lent first) and as the
        batcher's ``on_commit`` rule allows (a lone send, nothing earlier
        still to write); ``answer`` still runs.
        """
        on_commit = None
        if answer_now is not None and self.hub.quiet_for(self.quiet_secs):
            answer_now.lend()
            on_commit = partial(_answer_now, answer_now.from_writer)
        stored = partial(self._stored, author, started, answer)
        sent = await self.sends.submit(request, stored, on_commit)
        return _ack_data(sent)

    def _stored(
        self,
        author: Author,
        started: float,
        answer: Callable[[dict[str, Any]], object] | None,
        sent: chat_db.Sent,
    ) -> None:
        """Committed (the batcher's ``on_result``): the sender's ack, then what follows it.

        The broadcast goes to the room's other connections, never the
        sender's: after the ack, it spares the sender's wait the typing stop,
        the publish, the counting and the notification queueing.
        """
        if answer is not None:
            answer(_ack_data(sent))
        if sent.duplicate:
            self._rebroadcast(author, sent.message)
        else:
            self._announce(author, sent.message, started)

    def _announce(self, author: Author, message: dict[str, Any], started: float) -> None:
        room_id = message["roomId"]
        # Before message:new, so no member sees the author typing past their message.
        self.typing.stop(room_id, author.user, author.conn_id)
        self._publish_new(author, message)
        # The publish queued the hub's flush with call_soon; queued behind it,
        # the counting and the notification work run once the room's frames
        # are written, not before them, and still before this node reads
        # anything more (the loop runs what is queued before new I/O's callbacks).
        asyncio.get_running_loop().call_soon(self._count, author.namespace, message, started)

    def _count(self, namespace: str, message: dict[str, Any], started: float) -> None:
        self.metrics.messages_persisted.inc()
        self.stats.messages.add()
        self.stats.rooms.message(message["roomId"])
        # Receiving to delivery to the local members: the flush wrote them.
        self.metrics.publish_latency.labels(namespace).observe(time.perf_counter() - started)
        # Mentions and missed messages: queued for the background, per room.
        self.notifications.message_sent(message)

    def _rebroadcast(self, author: Author, message: dict[str, Any]) -> None:
        if _recent(message):
            self._publish_new(author, message)

    def _publish_new(self, author: Author, message: dict[str, Any]) -> None:
        """``message:new`` to the room, but the author's connection (it gets the ack)."""
        self.hub.publish(
            Target.room(message["roomId"]), "message:new", {"message": message},
            exclude=author.conn_id, seq=message["seq"],
        )  # fmt: skip

    async def edit(self, author: Author, message_id: int, content: str) -> dict[str, Any]:
        message = await self.db.run(
            "message.edit", chat_db.edit_message, message_id, author.user_id, content
        )
        self.hub.publish(
            Target.room(message["roomId"]), "message:updated", {"message": message},
            exclude=author.conn_id,
        )  # fmt: skip
        return {"message": message}

    async def delete(self, author: Author, message_id: int, *, is_staff: bool) -> dict[str, Any]:
        message = await self.db.run(
            "message.delete", chat_db.delete_message, message_id, author.user_id, is_staff
        )
        data = {
            "messageId": message["id"], "roomId": message["roomId"], "deletedBy": author.user_id,
        }  # fmt: skip
        self.hub.publish(Target.room(message["roomId"]), "message:deleted", data,
                         exclude=author.conn_id)  # fmt: skip
        return data

    async def react(
        self, author: Author, message_id: int, emoji: str, action: str
    ) -> dict[str, Any]:
        result = await self.reacts.submit(
            chat_db.ReactRequest(message_id, author.user_id, emoji, action)
        )
        data = {**result, "emoji": emoji, "userId": author.user_id, "action": action}
        self.hub.publish(Target.room(result["roomId"]), "message:reaction", data,
                         exclude=author.conn_id)  # fmt: skip
        return data


def _ack_data(sent: chat_db.Sent) -> dict[str, Any]:
    return {"message": sent.message, "duplicate": sent.duplicate}


def _answer_now(
    answer_now: Callable[[dict[str, Any]], Callable[[], object] | None], sent: chat_db.Sent
) -> Callable[[], object] | None:
    """On the database thread, committed: the ack's data to ``answer_now``."""
    return answer_now(_ack_data(sent))


def _recent(message: dict[str, Any]) -> bool:
    created = message.get("createdAt")
    if not isinstance(created, str):
        return False
    age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created)
    return age.total_seconds() < DUPLICATE_REBROADCAST_SECS
