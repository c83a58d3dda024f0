"""The connection hub: who is connected, where, and delivery to them.

The hub indexes live connections by id, user, room, namespace and token
role in plain ``dict[str, set]`` maps that drop keys as they empty, and delivers events
to a :class:`Target`. A broadcast is serialised and framed once; the same
bytes are written to every recipient's stream, which is what makes fan-out
cheap (no per-recipient JSON, compression or Future wrapping).

With ``coalesce=True`` (what the node uses) broadcasts are not written at
once: each is queued whole -- its audience, frame and the few members it
skips -- and written by :meth:`Hub.flush`, which runs once per event-loop
iteration. A recipient that gets several broadcasts in the same iteration
(busy rooms, several senders) then gets them in one ``send()`` instead of
one each -- the system call is most of a delivery's cost -- and the delay
is one loop iteration, not a timer. Queueing does no work per recipient,
and a busy room's broadcasts share one audience (the room's member tuple,
kept until its membership changes), so the flush joins their frames once
and writes the same bytes to every member; only the few connections that
differ (the senders, joins in flight, acks) get a list of their own. A
direct write to a connection (:meth:`Hub.flush_to`, called by the handlers
before every ``send_frame``) sends that connection's queued frames first,
so a connection sees frames in the order they were produced. An ack with
nothing queued in the iteration is written at once (:meth:`Hub.send_ack`):
a lone send's sender does not wait for the flush.

The hub knows nothing about chat, nor about how other nodes are reached:
it has a :class:`~server.realtime.broker.Broker` (given, or a
:class:`~server.realtime.broker.MemoryBroker` of its own: a cluster of one), tells
it where local interest begins and ends, hands it every broadcast after
delivering locally, and is called back with what other nodes publish.

Room frames that carry a ``seq`` are delivered once per node
(:class:`~server.realtime.seqs.RoomSeqs` remembers which), and a room's message
frames can be held (:meth:`Hub.hold`) while a catch-up reads what the node
missed, then released after it (:meth:`Hub.release`): see
:mod:`server.services.catch_up`.

Example::

    hub = Hub(node_id="n1")  # or Hub("n1", broker=RedisBroker(...))
    hub.add(conn)
    hub.join(conn, "general")
    hub.publish(Target.room("general"), "message:new", {"message": m}, seq=m["seq"])
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

from server.core import protocol
from server.realtime.broker import Broker, MemoryBroker
from server.realtime.outbound import Outbound
from server.realtime.seqs import RoomSeqs

log = logging.getLogger("switchboard.hub")


class Connection(Protocol):
    """What the hub needs from a connection (handlers implement it)."""

    conn_id: str
    user_id: str
    #: Monotonic time the peer last sent anything (a frame, a pong).
    last_seen: float
    #: The connection's writes: what is pending for it, and its budget.
    outbound: Outbound

    @property
    def namespace(self) -> str:
        """The namespace the connection belongs to (``chat``, ``admin``...)."""

    @property
    def roles(self) -> frozenset[str]:
        """The roles of the connection's token; role targets reach it by these.

        When they change (a refreshed token), the owner calls :meth:`Hub.update_roles`.
        """

    def send_frame(self, frame: bytes) -> bool:
        """Queue a pre-built frame; False if the connection is gone or too slow."""

    def write_frame(self, frame: bytes, frames: int = 1) -> bool:
        """Like :meth:`send_frame` but uncounted: the hub counts whole broadcasts.

        ``frame`` may be ``frames`` frames joined (a coalesced write).
        """

    def close_with(self, code: int, reason: str) -> None:
        """Start closing the connection with a WebSocket close code."""

    def ping(self) -> None:
        """Send a WebSocket ping."""


class Target(NamedTuple):
    """Where an event goes: a room, a user, a role, a namespace, everyone or one connection.

    ``namespace`` narrows user, role and all targets (e.g. a user's chat
    connections only). A role target reaches every connection whose token
    carries the role.
    """

    kind: str
    key: str = ""
    namespace: str | None = None

    @classmethod
    def room(cls, room_id: str) -> Target:
        return cls("room", room_id)

    @classmethod
    def user(cls, user_id: str, namespace: str | None = None) -> Target:
        return cls("user", user_id, namespace)

    @classmethod
    def role(cls, name: str, namespace: str | None = None) -> Target:
        return cls("role", name, namespace)

    @classmethod
    def ns(cls, namespace: str) -> Target:
        return cls("namespace", namespace)

    @classmethod
    def all(cls) -> Target:
        return cls("all")

    @classmethod
    def connection(cls, conn_id: str) -> Target:
        return cls("connection", conn_id)


def _discard(index: dict[str, set[Any]], key: str, item: Any) -> bool:
    """Remove ``item`` from ``index[key]``; drop the key when empty. True if it emptied."""
    members = index.get(key)
    if members is None:
        return False
    members.discard(item)
    if not members:
        del index[key]
        return True
    return False


#: The most bytes one coalesced write joins. A write is held to the
#: connection's outbound budget (MAX_OUTBOUND_BYTES) as a whole, so a burst
#: of frames that each fit must not be refused for being joined; frames are
#: joined up to this size (well under any workable budget), a bigger frame
#: goes alone, exactly as it would without coalescing.
COALESCE_MAX_BYTES = 64 * 1024
# How long after a join its connection refuses room frames whose seq its ack
# already carried: past the broadcast of a commit the join read (one loop
# step on this node, a Redis hop from another), with margin for a busy node.
# Per connection, unlike ``self.seqs`` (per node): the room's other members
# have not had that message yet and must still get it live.
JOIN_FLOOR_SECS = 10.0

#: A queued write of the coalescing hub: (audience, frame, connections of the
#: audience to skip, whether it is a broadcast delivery rather than an ack).
_Entry = tuple[tuple["Connection", ...], bytes, "set[Connection] | None", bool]


def _write_batches(conn: Connection, frames: list[bytes]) -> tuple[int, int]:
    """Write ``frames`` in order, joined up to :data:`COALESCE_MAX_BYTES` a write.

    Returns the frames and bytes written; stops at the first refused write.
    """
    data = b"".join(frames)
    if len(data) <= COALESCE_MAX_BYTES:  # the usual case: one write
        return (len(frames), len(data)) if conn.write_frame(data, frames=len(frames)) else (0, 0)
    count = nbytes = 0
    start, size = 0, 0
    for end, frame in enumerate(frames):
        if end > start and size + len(frame) > COALESCE_MAX_BYTES:
            data = b"".join(frames[start:end])
            if not conn.write_frame(data, frames=end - start):
                return count, nbytes
            count, nbytes = count + end - start, nbytes + len(data)
            start, size = end, 0
        size += len(frame)
    data = frames[start] if len(frames) - start == 1 else b"".join(frames[start:])
    if conn.write_frame(data, frames=len(frames) - start):
        count, nbytes = count + len(frames) - start, nbytes + len(data)
    return count, nbytes


class Hub:
    """The node's connections and delivery to them, local and through the broker."""

    def __init__(
        self,
        node_id: str,
        *,
        broker: Broker | None = None,
        on_delivered: Callable[[int, int], None] | None = None,
        coalesce: bool = False,
    ) -> None:
        """``on_delivered(count, nbytes)`` is called once per write pass that reached anyone.

        That is once per broadcast, or with ``coalesce`` once per :meth:`flush`
        (the frames and bytes of every broadcast it wrote). Without a
        ``broker`` the hub is a single node (a :class:`MemoryBroker` alone).
        """
        self.node_id = node_id
        self.broker: Broker = broker if broker is not None else MemoryBroker(node_id)
        self.connections: dict[str, Connection] = {}
        self._by_user: dict[str, set[Connection]] = {}
        self._by_room: dict[str, set[Connection]] = {}
        self._by_namespace: dict[str, set[Connection]] = {}
        self._by_role: dict[str, set[Connection]] = {}
        # conn id -> the roles it is indexed under: what remove() and
        # update_roles() take out, whatever the connection says by then.
        self._roles_indexed: dict[str, frozenset[str]] = {}
        self._rooms_of: dict[str, set[str]] = {}
        # Joins whose recovery query is in flight: room -> conn -> buffered (seq, frame).
        self._pending: dict[str, dict[Connection, list[tuple[int | None, bytes]]]] = {}
        # Joins just finished: room -> conn -> (the last seq its ack carried, until
        # when). A broadcast of a message the join's query already returned can
        # still be on its way (published a loop step after its commit, or late
        # through another node); it must not reach that connection twice.
        self._floors: dict[str, dict[Connection, tuple[int, float]]] = {}
        # Room -> at least its highest floor: a broadcast above it (nearly all
        # of them) skips the floors without looking at each one.
        self._floor_top: dict[str, int] = {}
        #: The seqs delivered per room on this node: a seq is delivered once.
        self.seqs = RoomSeqs()
        # Rooms whose live frames wait for a catch-up (:meth:`hold`): (seq, frame, exclude).
        self._held: dict[str, list[tuple[int, bytes, str | None]]] = {}
        self._on_delivered = on_delivered
        self.coalesce = coalesce
        # Room -> its connections as a tuple, until the membership changes
        # (:meth:`_room_members`).
        self._members: dict[str, tuple[Connection, ...]] = {}
        # coalesce: what waits for this loop iteration's flush, in order.
        self._outbox: list[_Entry] = []
        self._flush_scheduled = False
        #: When the last flush that had frames to write ended (``time.monotonic()``).
        self.flushed_at = float("-inf")
        # Connections :meth:`flush_to` wrote -> how many outbox entries it covered.
        self._flushed: dict[Connection, int] = {}
        # id(audience) -> the audience as a set, for flush_to's membership tests.
        self._member_sets: dict[int, set[Connection]] = {}
        self.broker.listen(self)

    # -- membership -------------------------------------------------------

    def add(self, conn: Connection) -> bool:
        """Register a connection. True if it is the user's first on this node."""
        self.connections[conn.conn_id] = conn
        first = conn.user_id not in self._by_user
        self._by_user.setdefault(conn.user_id, set()).add(conn)
        if first:
            self.broker.interest("user", conn.user_id, True)
        if conn.namespace not in self._by_namespace:
            self.broker.interest("namespace", conn.namespace, True)
        self._by_namespace.setdefault(conn.namespace, set()).add(conn)
        self._index_roles(conn, conn.roles)
        return first

    def remove(self, conn: Connection) -> set[str]:
        """Forget a connection; returns the rooms it was in (already left)."""
        if self._outbox:  # what is queued for it is dropped
            self._flushed[conn] = len(self._outbox)
        if self.connections.pop(conn.conn_id, None) is None:
            return set()
        rooms = self._rooms_of.pop(conn.conn_id, set())
        for room in rooms:
            self._drop_from_room(conn, room)
        if _discard(self._by_user, conn.user_id, conn):
            self.broker.interest("user", conn.user_id, False)
        if _discard(self._by_namespace, conn.namespace, conn):
            self.broker.interest("namespace", conn.namespace, False)
        self._index_roles(conn, frozenset())
        return rooms

    def update_roles(self, conn: Connection) -> None:
        """Re-read ``conn.roles`` (its token was refreshed): role targets follow at once."""
        if self.connections.get(conn.conn_id) is conn:
            self._index_roles(conn, conn.roles)

    def _index_roles(self, conn: Connection, roles: frozenset[str]) -> None:
        """Index ``conn`` under exactly ``roles``, telling the broker where interest changed."""
        before = self._roles_indexed.pop(conn.conn_id, frozenset())
        if roles:
            self._roles_indexed[conn.conn_id] = roles
        for role in before - roles:
            if _discard(self._by_role, role, conn):
                self.broker.interest("role", role, False)
        for role in roles - before:
            if role not in self._by_role:
                self.broker.interest("role", role, True)
            self._by_role.setdefault(role, set()).add(conn)

    def join(self, conn: Connection, room: str, *, buffer: bool = False) -> None:
        """Subscribe ``conn`` to ``room``.

        With ``buffer=True`` room frames for this connection are held back
        until :meth:`finish_join`, so a recovery query and live traffic can be
        stitched together without a gap or a duplicate.
        """
        if room not in self._by_room:
            self.broker.interest("room", room, True)
        self._by_room.setdefault(room, set()).add(conn)
        self._members.pop(room, None)
        self._rooms_of.setdefault(conn.conn_id, set()).add(room)
        if buffer:
            self._pending.setdefault(room, {})[conn] = []

    async def wait_subscribed(self, kind: str, key: str) -> bool:
        """Wait until other nodes' traffic for a channel reaches this node (see the broker)."""
        return await self.broker.wait_subscribed(kind, key)

    async def wait_reachable(self, conn: Connection) -> bool:
        """Wait until other nodes' broadcasts to ``conn``'s user, namespace and roles reach
        this node (:meth:`add` asked for them); False if that cannot be confirmed.

        One after the other without a Task each: every subscription was sent by
        :meth:`add` already, so this waits for the slowest, and costs nothing
        for channels this node hears already (the usual case).
        """
        reachable = await self.broker.wait_subscribed("user", conn.user_id)
        reachable = await self.broker.wait_subscribed("namespace", conn.namespace) and reachable
        for role in conn.roles:
            reachable = await self.broker.wait_subscribed("role", role) and reachable
        return reachable

    def finish_join(self, conn: Connection, room: str, after_seq: int | None) -> int:
        """Release frames buffered since :meth:`join`, skipping ``seq <= after_seq``."""
        pending = self._pending.get(room)
        frames = pending.pop(conn, []) if pending is not None else []
        if pending is not None and not pending:
            del self._pending[room]
        sent = 0
        for seq, frame in frames:
            if seq is not None and after_seq is not None and seq <= after_seq:
                continue
            conn.send_frame(frame)
            sent += 1
        if after_seq is not None and self.in_room(conn, room):
            until = time.monotonic() + JOIN_FLOOR_SECS
            self._floors.setdefault(room, {})[conn] = (after_seq, until)
            self._floor_top[room] = max(after_seq, self._floor_top.get(room, after_seq))
        return sent

    def leave(self, conn: Connection, room: str) -> bool:
        """Unsubscribe; False if the connection was not in the room."""
        rooms = self._rooms_of.get(conn.conn_id)
        if rooms is None or room not in rooms:
            return False
        _discard(self._rooms_of, conn.conn_id, room)
        self._drop_from_room(conn, room)
        return True

    def _drop_from_room(self, conn: Connection, room: str) -> None:
        pending = self._pending.get(room)
        if pending is not None:
            pending.pop(conn, None)
            if not pending:
                del self._pending[room]
        floors = self._floors.get(room)
        if floors is not None:
            floors.pop(conn, None)
            if not floors:
                del self._floors[room]
                del self._floor_top[room]
        self._members.pop(room, None)
        if _discard(self._by_room, room, conn):
            self.broker.interest("room", room, False)
            self.seqs.forget(room)
            self._held.pop(room, None)

    def clear_room(self, room: str) -> list[Connection]:
        """Unsubscribe everyone from ``room`` (deleted); returns who was in it."""
        conns = list(self._by_room.get(room, ()))
        for conn in conns:
            self.leave(conn, room)
        return conns

    # -- queries ----------------------------------------------------------

    def rooms_of(self, conn: Connection) -> frozenset[str]:
        return frozenset(self._rooms_of.get(conn.conn_id, ()))

    def in_room(self, conn: Connection, room: str) -> bool:
        return room in self._rooms_of.get(conn.conn_id, ())

    def room_connections(self, room: str) -> set[Connection]:
        return set(self._by_room.get(room, ()))

    def user_in_room(self, user_id: str, room: str, *, besides: Connection | None = None) -> bool:
        """Whether ``user_id`` has a connection in ``room`` here other than ``besides``."""
        return any(c.user_id == user_id and c is not besides for c in self._by_room.get(room, ()))

    def user_connections(self, user_id: str, namespace: str | None = None) -> list[Connection]:
        conns = self._by_user.get(user_id, ())
        return [c for c in conns if namespace is None or c.namespace == namespace]

    def online_users(self) -> set[str]:
        return set(self._by_user)

    def count_by_namespace(self) -> dict[str, int]:
        return {ns: len(conns) for ns, conns in self._by_namespace.items()}

    def active_rooms(self) -> dict[str, int]:
        """Room → number of local connections subscribed."""
        return {room: len(conns) for room, conns in self._by_room.items()}

    # -- delivery ---------------------------------------------------------

    def publish(
        self,
        target: Target,
        event: str,
        data: dict[str, Any],
        *,
        exclude: str | None = None,
        seq: int | None = None,
    ) -> int:
        """Deliver here, then to other nodes. Returns the local delivery count.

        ``exclude`` is a connection id that must not receive it (the sender,
        who gets an ack instead); ``seq`` lets joins in flight deduplicate.
        """
        payload = protocol.event_payload(event, data)
        delivered = self.deliver(target, protocol.frame(payload), exclude=exclude, seq=seq)
        self.broker.publish(target, payload, exclude=exclude, seq=seq)
        return delivered

    def publish_many(self, targets: Iterable[Target], event: str, data: dict[str, Any]) -> int:
        """Deliver once per connection to everyone any of ``targets`` reaches, on every node."""
        targets = list(targets)
        payload = protocol.event_payload(event, data)
        delivered = self.deliver_many(targets, protocol.frame(payload))
        remote = [t for t in targets if t.kind != "connection"]
        if remote:
            self.broker.publish_many(remote, payload)
        return delivered

    def publish_rooms(self, rooms: Iterable[str], event: str, data: dict[str, Any]) -> int:
        """Deliver once per connection to everyone in any of ``rooms``."""
        return self.publish_many((Target.room(r) for r in rooms), event, data)

    def deliver(
        self,
        target: Target,
        frame: bytes,
        *,
        exclude: str | None = None,
        seq: int | None = None,
    ) -> int:
        """Write a pre-built frame to the local connections of ``target``."""
        if target.kind != "room":
            conns = tuple(self._local(target))
            return self._write(conns, frame, self._excluded(conns, exclude))
        room = target.key
        if seq is not None:
            waiting = self._held.get(room)
            if waiting is not None:
                waiting.append((seq, frame, exclude))
                return 0
            if self.seqs.seen(room, seq):
                return 0  # a second copy: a re-broadcast, or a catch-up's
            if room in self._by_room:
                self.seqs.add(room, seq)
        members = self._room_members(room)
        # Who of the room must not get this frame: a handful, whatever the
        # room's size, so the broadcast loop tests membership in a small set
        # instead of filtering the room's list per broadcast.
        skip = None
        if exclude is not None and (one := self.connections.get(exclude)) is not None:
            if room in self._rooms_of.get(exclude, ()):
                skip = {one}
        pending = self._pending.get(room)
        if pending:
            for conn, held in pending.items():
                if conn.conn_id != exclude:
                    held.append((seq, frame))
            skip = skip | pending.keys() if skip else set(pending)
        floors = self._floors.get(room)
        if floors and seq is not None and seq <= self._floor_top[room]:
            below = {c for c, (floor, _) in floors.items() if seq <= floor}
            if below:
                skip = skip | below if skip else below
        return self._write(members, frame, skip)

    def _room_members(self, room: str) -> tuple[Connection, ...]:
        """The room's local connections as a tuple, kept until its membership changes.

        Every broadcast to a busy room reuses the same tuple (no per-message
        copy), and :meth:`flush` recognises broadcasts with the same audience
        by its identity.
        """
        members = self._members.get(room)
        if members is None:
            conns = self._by_room.get(room)
            if conns is None:
                return ()
            members = self._members[room] = tuple(conns)
        return members

    def _excluded(
        self, conns: tuple[Connection, ...], exclude: str | None
    ) -> set[Connection] | None:
        """``{the connection with id exclude}`` if it is among ``conns``, else None."""
        if exclude is None:
            return None
        one = self.connections.get(exclude)
        return {one} if one is not None and one in conns else None

    # -- catch-up ----------------------------------------------------------

    def hold(self, room: str) -> None:
        """Hold the room's seq-carrying frames until :meth:`release` (a catch-up is coming).

        Frames without a seq (edits, typing...) are not ordered against
        messages by clients and keep flowing.
        """
        if room in self._by_room:
            self._held.setdefault(room, [])

    def held_rooms(self) -> list[str]:
        return list(self._held)

    def release(self, room: str, caught_up: Iterable[tuple[int, bytes]] = ()) -> int:
        """Deliver ``caught_up`` (seq, frame) in order, then the frames held since :meth:`hold`.

        A held frame whose seq was delivered by then is dropped. Returns the
        local deliveries of ``caught_up``.

        A message both caught up and held was sent on this node while the
        catch-up ran: its held frame goes out in its place, so the sending
        connection is still left out (the database copy does not know it).
        """
        held = self._held.pop(room, [])
        sent_here = {seq: exclude for seq, _, exclude in held if exclude is not None}
        target = Target.room(room)
        delivered = 0
        for seq, frame in caught_up:
            delivered += self.deliver(target, frame, exclude=sent_here.get(seq), seq=seq)
        for held_seq, frame, exclude in sorted(held, key=lambda h: h[0]):
            self.deliver(target, frame, exclude=exclude, seq=held_seq)
        return delivered

    def deliver_many(self, targets: Iterable[Target], frame: bytes) -> int:
        """Write a pre-built frame once to every local connection any of ``targets`` reaches."""
        conns: set[Connection] = set()
        for target in targets:
            conns.update(self._local(target))
        return self._write(tuple(conns), frame, None)

    def _local(self, target: Target) -> Iterable[Connection]:
        kind = target.kind
        conns: Iterable[Connection]
        if kind == "room":
            conns = self._by_room.get(target.key, ())
        elif kind == "user":
            conns = self.user_connections(target.key, target.namespace)
        elif kind == "namespace":
            conns = self._by_namespace.get(target.key, ())
        elif kind == "role":
            conns = self._by_role.get(target.key, ())
            if target.namespace is not None:
                conns = [c for c in conns if c.namespace == target.namespace]
        elif kind == "all":
            if target.namespace is not None:
                conns = self._by_namespace.get(target.namespace, ())
            else:
                conns = self.connections.values()
        elif kind == "connection":
            one = self.connections.get(target.key)
            conns = (one,) if one is not None else ()
        else:
            raise ValueError(f"unknown target kind {kind!r}")
        return conns

    def _write(
        self, conns: tuple[Connection, ...], frame: bytes, skip: set[Connection] | None
    ) -> int:
        """Write ``frame`` to ``conns`` (a snapshot) but those in ``skip`` (all among ``conns``)."""
        if self.coalesce:
            return self._queue(conns, frame, skip, True)
        return self._write_each(conns, frame, skip, True)

    def _write_each(
        self,
        conns: tuple[Connection, ...],
        frame: bytes,
        skip: set[Connection] | None,
        counted: bool,
    ) -> int:
        """Write ``frame`` to each of ``conns`` but ``skip`` now; how many took it.

        ``counted``: the writes are broadcast deliveries (not acks), reported to
        ``on_delivered`` -- once per broadcast rather than per recipient: two
        metric increments per delivery were 10-20% of this loop (bench/README.md).
        """
        delivered = 0
        # ``conns`` is a snapshot: a write may close a slow consumer, which
        # removes it from the hub's sets, not from the tuple.
        for conn in conns:
            if (skip is None or conn not in skip) and conn.write_frame(frame):
                delivered += 1
        if counted and delivered and self._on_delivered is not None:
            self._on_delivered(delivered, delivered * len(frame))
        return delivered

    def _queue(
        self,
        conns: tuple[Connection, ...],
        frame: bytes,
        skip: set[Connection] | None,
        counted: bool,
    ) -> int:
        """``_write`` with ``coalesce``: queue for this iteration's :meth:`flush`.

        The broadcast is queued whole, (audience, frame, skip): no work per
        recipient until the flush writes. ``counted`` is False for frames that
        are not broadcast deliveries (:meth:`send_soon`).
        """
        queued = len(conns) - (len(skip) if skip else 0)
        if queued <= 0:
            return 0
        self._outbox.append((conns, frame, skip, counted))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return queued

    def send_soon(self, conn: Connection, frame: bytes) -> bool:
        """Queue a frame for ``conn`` alone in this iteration's flush (with ``coalesce``).

        For acks: group commit wakes every sender of a batch in one loop
        iteration, and each sender's ack then shares a ``send()`` with the
        broadcasts queued for it, instead of a syscall of its own. Without
        ``coalesce`` the frame is written now. Frames keep their order: a
        direct write first flushes what is queued (:meth:`flush_to`).
        """
        if not self.coalesce:
            return conn.write_frame(frame)
        self._queue((conn,), frame, None, False)
        return True

    def send_ack(self, conn: Connection, frame: bytes) -> bool:
        """Write an ack now when nothing is queued in this iteration, else as :meth:`send_soon`.

        A lone send's ack then leaves at once instead of one loop iteration
        (and the flush's bookkeeping) later. Nothing queued means nothing
        queued for ``conn`` either, so its frames keep their order; once
        something is queued -- the iteration's batch woke several senders, a
        broadcast is waiting -- the ack shares the flush's write as before.
        """
        if self._outbox:
            return self.send_soon(conn, frame)
        return conn.write_frame(frame)

    def flush(self) -> int:
        """Write every connection's queued frames, one write per connection.

        Returns the number of connections written to. The usual iteration
        queued broadcasts to one audience (a busy room's cached member
        tuple): their frames are joined once and the same bytes written to
        each member, with no per-member list. Only the few connections that
        differ -- skipped by a broadcast (the sender, a join in flight), in
        another audience too (an ack, a user target), or already flushed by
        :meth:`flush_to` -- get their own list of frames, in queued order.
        """
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        done, self._flushed = self._flushed, {}
        self._member_sets = {}
        if not outbox:
            return 0
        if len(outbox) == 1 and not done:  # a lone broadcast (a lone send's): nothing to merge
            conns, frame, skip, counted = outbox[0]
            self._write_each(conns, frame, skip, counted)
            self.flushed_at = time.monotonic()
            return len(conns) - (len(skip) if skip else 0)
        main = max((entry[0] for entry in outbox), key=len)
        main_at: list[int] = []  # positions of broadcasts to ``main``
        special: set[Connection] = set(done)
        others: dict[Connection, list[int]] = {}  # positions of other entries, per connection
        for at, (conns, _, skip, _) in enumerate(outbox):
            if conns is main:
                main_at.append(at)
                if skip:
                    special.update(skip)
            else:
                for conn in conns:
                    if skip is None or conn not in skip:
                        positions = others.get(conn)
                        if positions is None:
                            others[conn] = [at]
                        else:
                            positions.append(at)
        special.update(others)
        # The few connections that differ go first: among them are the senders
        # waiting for their acks, and the common write below is one send() per
        # member of the room. The two sets are disjoint, so each connection's
        # frames keep their order either way.
        count = nbytes = writes = 0
        if special:
            members = set(main)
            for conn in special:
                mine = others.get(conn)  # already without the entries that skip it
                if conn in members or conn in done:
                    wanted = self._merge(conn, outbox, main_at if conn in members else [],
                                         mine or [], done.get(conn, 0))  # fmt: skip
                elif mine is None:
                    continue
                elif len(mine) == 1:  # the usual case: an ack, one small room's broadcast
                    _, frame, _, counted = outbox[mine[0]]
                    writes += 1
                    if conn.write_frame(frame) and counted:
                        count, nbytes = count + 1, nbytes + len(frame)
                    continue
                else:
                    wanted = mine
                if wanted:
                    written, size = self._write_entries(conn, outbox, wanted)
                    count, nbytes, writes = count + written, nbytes + size, writes + 1
        common = self._write_common(outbox, main, main_at, special)
        count, nbytes, writes = count + common[0], nbytes + common[1], writes + common[2]
        if self._on_delivered is not None and count > 0:
            self._on_delivered(count, nbytes)
        self.flushed_at = time.monotonic()
        return writes

    def quiet_for(self, secs: float) -> bool:
        """Whether no flush wrote anything for ``secs`` (the loop is likely idle)."""
        return time.monotonic() - self.flushed_at >= secs

    @staticmethod
    def _merge(
        conn: Connection, outbox: list[_Entry], main_at: list[int], mine: list[int], start: int
    ) -> list[int]:
        """The outbox positions ``conn`` gets from ``start`` on, in order.

        ``main_at``: the main audience's entries (``conn`` is a member), some
        of which may skip it; ``mine``: the other entries that reach it.
        """
        wanted = [
            a for a in main_at if a >= start and not ((skip := outbox[a][2]) and conn in skip)
        ]
        if mine:
            wanted = sorted(wanted + [a for a in mine if a >= start])
        return wanted

    @staticmethod
    def _write_common(
        outbox: list[_Entry],
        main: tuple[Connection, ...],
        main_at: list[int],
        special: set[Connection],
    ) -> tuple[int, int, int]:
        """Write ``main``'s frames to its members but ``special``: (deliveries, bytes, writes)."""
        frames = [outbox[a][1] for a in main_at]
        counted = outbox[main_at[0]][3]  # ``main`` is a broadcast's, or a lone send_soon's
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        n, size = len(frames), len(data)
        writes = ok = 0
        if size <= COALESCE_MAX_BYTES or n == 1:  # the usual case: one write each
            for conn in main:
                if conn not in special:
                    writes += 1
                    if conn.write_frame(data, n):
                        ok += 1
            return (ok * n, ok * size, writes) if counted else (0, 0, writes)
        count = nbytes = 0
        for conn in main:
            if conn not in special:
                writes += 1
                written, wrote = _write_batches(conn, frames)
                count, nbytes = count + written, nbytes + wrote
        return (count, nbytes, writes) if counted else (0, 0, writes)

    @staticmethod
    def _write_entries(conn: Connection, outbox: list[_Entry], at: list[int]) -> tuple[int, int]:
        """Write the frames of ``outbox[at]`` to ``conn``: the broadcast deliveries and bytes."""
        frames = [outbox[a][1] for a in at]
        written, _ = _write_batches(conn, frames)
        # Writes stop at the first refusal: what was written is a prefix.
        # Frames of send_soon (acks) are not deliveries.
        count = nbytes = 0
        for a, frame in zip(at[:written], frames[:written], strict=True):
            if outbox[a][3]:
                count, nbytes = count + 1, nbytes + len(frame)
        return count, nbytes

    def flush_to(self, conn: Connection) -> None:
        """Write ``conn``'s queued frames now, ahead of a direct write to it."""
        outbox = self._outbox
        if not outbox:
            return
        start = self._flushed.get(conn, 0)
        at = [
            a
            for a in range(start, len(outbox))
            if conn in self._member_set(outbox[a][0])
            and not ((skip := outbox[a][2]) and conn in skip)
        ]
        # Later frames of this iteration still go with the flush; these did.
        self._flushed[conn] = len(outbox)
        if at:
            count, nbytes = self._write_entries(conn, outbox, at)
            if self._on_delivered is not None and count > 0:
                self._on_delivered(count, nbytes)

    def _member_set(
        self, conns: tuple[Connection, ...]
    ) -> set[Connection] | tuple[Connection, ...]:
        """``conns`` to test membership in: a set, built once per iteration, for a big one."""
        if len(conns) <= 8:
            return conns
        members = self._member_sets.get(id(conns))
        if members is None:
            members = self._member_sets[id(conns)] = set(conns)
        return members

    # -- liveness -----------------------------------------------------------

    def _expire_floors(self, now: float) -> None:
        for room, floors in tuple(self._floors.items()):
            for conn, (_, until) in tuple(floors.items()):
                if until <= now:
                    del floors[conn]
            if floors:
                self._floor_top[room] = max(floor for floor, _ in floors.values())
            else:
                del self._floors[room]
                del self._floor_top[room]

    def sweep(self, now: float, timeout: float) -> int:
        """Ping every connection; close those with no sign of life for ``timeout``.

        Signs of life: a frame or a pong (``last_seen``), or reading a backlog
        of ours (``outbound.progress_at``) -- a ping queued behind that backlog
        cannot be answered yet, and a peer that cannot keep up is the outbound
        budget's to judge (:mod:`server.realtime.outbound`), not the heartbeat's.

        One timer for the whole node instead of one per connection keeps idle
        connections cheap. Returns the number closed.
        """
        self._expire_floors(now)
        closed = 0
        for conn in tuple(self.connections.values()):
            out = conn.outbound
            out.observe(now)
            if now - max(conn.last_seen, out.progress_at) > timeout:
                conn.close_with(4408, "heartbeat timeout")
                closed += 1
            else:
                conn.ping()
        return closed
