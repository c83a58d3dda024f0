"""What a hub needs from the other nodes: the broker interface, and a memory broker.

A :class:`~server.realtime.hub.Hub` delivers to its own connections and hands every
broadcast to its :class:`Broker`, which carries it to the other nodes and
calls their hubs back (:class:`Receiver`). The broker only publishes,
follows the hub's interest (the rooms, users, namespaces and token roles
that have a local connection) and listens; it knows nothing about connections, and the
hub knows nothing about how the other nodes are reached.

Two brokers have this interface:

* :class:`MemoryBroker` -- nodes of one process. Every hub gets one by
  default, alone on its :class:`MemoryBus`: a single node is a cluster of
  one, and publishing costs a look at an empty peer list. Hubs whose
  brokers share a bus form a cluster inside one process (tests, benchmarks).
* :class:`server.cluster.redis_broker.RedisBroker` -- nodes of a real cluster, over
  Redis pub/sub.

Channels name what a broadcast is for (:func:`channel`): ``room:{id}``,
``user:{id}``, ``role:{name}``, ``ns:{namespace}``, ``all``, ``node:{id}``
(control messages to one node) and ``logs:{LEVEL}`` (live log entries of one
level, control messages only: server/services/logcluster.py). A
namespace-narrowed user or role target goes on the user's or role's channel;
the receiving hub applies the namespace. A broker delivers a broadcast to
the nodes that hold interest in its channel, never back to its origin (the
origin's hub delivered it locally before publishing).

Example::

    bus = MemoryBus()
    a = Hub("a", broker=MemoryBroker("a", bus))
    b = Hub("b", broker=MemoryBroker("b", bus))
    a.publish(Target.room("general"), "message:new", {...})  # b's members get it too
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from server.core import protocol

if TYPE_CHECKING:
    from server.realtime.hub import Target

log = logging.getLogger("switchboard.broker")

#: The channel a target kind is published on (``connection`` targets stay local).
#: ``logs`` is an interest without a hub target: a node hears the log levels
#: its ``/ws/logs`` subscribers want (server/services/logcluster.py).
INTEREST_CHANNEL = {
    "room": "room", "user": "user", "role": "role", "namespace": "ns", "logs": "logs",
}  # fmt: skip
#: The channel every node hears.
ALL_CHANNEL = "all"

ControlHandler = Callable[[dict[str, Any]], None]
#: Called with the link's new state: :data:`LINK_LOST`, :data:`LINK_RESUBSCRIBING`
#: or :data:`LINK_RESTORED`.
LinkListener = Callable[[str], None]
#: Broadcasts stopped reaching (or coming from) the other nodes.
LINK_LOST = "lost"
#: Subscribing again after a loss: other nodes' traffic may arrive from now on.
LINK_RESUBSCRIBING = "resubscribing"
#: The link works again; what was broadcast meanwhile never reached this node.
LINK_RESTORED = "restored"


def channel(target: Target) -> str | None:
    """The channel ``target`` is published on, or None if it never leaves the node."""
    kind = target.kind
    if kind in INTEREST_CHANNEL:
        return f"{INTEREST_CHANNEL[kind]}:{target.key}"
    if kind == "all":
        # A namespace-narrowed "all" reaches exactly the namespace's nodes.
        return ALL_CHANNEL if target.namespace is None else f"ns:{target.namespace}"
    # Connection ids are node-local: nothing to tell the other nodes.
    return None


def interest_channel(kind: str, key: str) -> str:
    """The channel of a local interest (``kind`` is room, user, role, namespace or logs)."""
    return f"{INTEREST_CHANNEL[kind]}:{key}"


def node_channel(node_id: str) -> str:
    return f"node:{node_id}"


def control_channel(
    target: Target | None, node: str | None, interest: tuple[str, str] | None = None
) -> str:
    """Where a control message goes: one ``node``, the nodes ``target`` reaches, the
    nodes holding ``interest`` (kind, key), or all."""
    if node is not None:
        return node_channel(node)
    if interest is not None:
        return interest_channel(*interest)
    if target is None:
        return ALL_CHANNEL
    name = channel(target)
    if name is None:
        raise ValueError(f"control messages cannot go to {target!r}")
    return name


class Receiver(Protocol):
    """What a broker calls back: the hub of its node."""

    def deliver(
        self, target: Target, frame: bytes, *, exclude: str | None = None, seq: int | None = None
    ) -> int:
        """Write a frame another node published to this node's connections of ``target``."""

    def deliver_many(self, targets: Iterable[Target], frame: bytes) -> int:
        """Write a frame once to every local connection any of ``targets`` reaches."""


class _Asking:
    """One :meth:`Broker.ask` waiting for the other nodes' answers."""

    def __init__(self, expected: frozenset[str] | None) -> None:
        self.expected = expected
        self.answers: dict[str, dict[str, Any]] = {}
        self.done = asyncio.Event()

    def add(self, node: str, answer: dict[str, Any]) -> None:
        self.answers[node] = answer
        if self.expected is not None and self.expected <= self.answers.keys():
            self.done.set()


class Broker(abc.ABC):
    """How a node's hub reaches the other nodes (see the module docstring).

    Publishing never blocks and never raises: a broker that cannot reach the
    other nodes drops the broadcast and reports it (``ok``/``reason``, logs,
    metrics); the node keeps serving its own connections.

    The control bus is the same for every broker: handlers registered by
    action (:meth:`on_control`), messages routed by :func:`control_channel`;
    a broker implements only the transport (:meth:`_send_control`) and
    hands what arrives to :meth:`_run_control`.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._control: dict[str, ControlHandler] = {}
        self._asking: dict[str, _Asking] = {}
        self._link_listeners: list[LinkListener] = []

    @abc.abstractmethod
    def listen(self, receiver: Receiver) -> None:
        """Deliver what other nodes publish to ``receiver`` (the node's hub)."""

    @abc.abstractmethod
    def publish(
        self, target: Target, payload: bytes, *, exclude: str | None, seq: int | None
    ) -> None:
        """Send an event payload (JSON text) for ``target`` to the other nodes."""

    @abc.abstractmethod
    def publish_many(self, targets: Sequence[Target], payload: bytes) -> None:
        """Send one payload for several targets; each node delivers it once per connection."""

    @abc.abstractmethod
    def interest(self, kind: str, key: str, interested: bool) -> None:
        """The first local subscriber of a channel arrived (or the last one left)."""

    @abc.abstractmethod
    async def wait_subscribed(self, kind: str, key: str) -> bool:
        """Wait until other nodes' broadcasts for an interest reach this node.

        False when that cannot be confirmed (the link is down, or slow).
        """

    @abc.abstractmethod
    async def start(self) -> bool:
        """Connect; True if the link is up (a node starts degraded otherwise)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Let queued broadcasts go out (briefly) and disconnect."""

    @property
    @abc.abstractmethod
    def ok(self) -> bool:
        """Whether broadcasts currently reach the other nodes."""

    @property
    @abc.abstractmethod
    def reason(self) -> str | None:
        """Why the broker is not ok (None when it is)."""

    async def check(self) -> tuple[bool, str | None]:
        """Health probe (``Health(redis_check=broker.check)``): ``(ok, reason)``."""
        return self.ok, self.reason

    @abc.abstractmethod
    def subscribed_channels(self) -> frozenset[str]:
        """The channels this node currently hears (for operators and tests)."""

    # -- the link's state --------------------------------------------------------

    def on_link(self, listener: LinkListener) -> None:
        """Call ``listener(state)`` when the link to the other nodes is lost or comes back.

        A broker that cannot lose its link (:class:`MemoryBroker`) never calls it.
        Example (server/services/catch_up.py)::

            hub.broker.on_link(catch_up.link_changed)
        """
        self._link_listeners.append(listener)

    def _link_changed(self, state: str) -> None:
        for listener in self._link_listeners:
            try:
                listener(state)
            except Exception:
                log.exception("broker %s: a link listener failed on %r", self.node_id, state)

    # -- the control bus --------------------------------------------------------

    def on_control(self, action: str, handler: ControlHandler) -> None:
        """Run ``handler(data)`` when another node sends control ``action``.

        Example (how kick and ban reach every node, server/services/moderation.py)::

            hub.broker.on_control("disconnect_user", self._disconnect_from_elsewhere)
        """
        self._control[action] = handler

    def send_control(
        self,
        action: str,
        data: dict[str, Any],
        *,
        target: Target | None = None,
        node: str | None = None,
        interest: tuple[str, str] | None = None,
    ) -> None:
        """Send a control message to one ``node``, to the nodes ``target`` reaches, to
        the nodes holding ``interest`` (kind, key), or to all.

        The sender does not get it.
        """
        self._send_control(control_channel(target, node, interest), action, data)

    def serve(self, action: str, respond: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Answer other nodes' :meth:`ask` of ``action`` with ``respond(query)``.

        Every node serves and asks the same actions, so this also registers
        where this node's own asks collect their answers.

        Example (server/services/connection_list.py)::

            broker.serve("connections", self.local)
            answers, missing = await broker.ask("connections", {"limit": 50}, nodes, 2.0)
        """

        def question(data: dict[str, Any]) -> None:
            asker, request_id, query = data.get("from"), data.get("id"), data.get("query")
            if not isinstance(asker, str) or not isinstance(request_id, str):
                log.warning("broker %s: malformed %s question %r", self.node_id, action, data)
                return
            try:
                answer = respond(query if isinstance(query, dict) else {})
            except Exception:  # a bad question must not take the listener down
                log.exception("broker %s: answering %s failed", self.node_id, action)
                return
            self.send_control(f"{action}:answer", {"id": request_id, "node": self.node_id,
                                                  "answer": answer}, node=asker)  # fmt: skip

        def answered(data: dict[str, Any]) -> None:
            asking = self._asking.get(str(data.get("id")))
            node, answer = data.get("node"), data.get("answer")
            # Late (the ask timed out), unasked or malformed: nobody waits for it.
            if asking is not None and isinstance(node, str) and isinstance(answer, dict):
                asking.add(node, answer)

        self.on_control(f"{action}:ask", question)
        self.on_control(f"{action}:answer", answered)

    async def ask(
        self,
        action: str,
        query: dict[str, Any],
        nodes: Iterable[str] | None,
        timeout_secs: float,
    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Ask the other nodes ``action`` (see :meth:`serve`): ``(answers by node, missing)``.

        ``nodes`` are the nodes expected to answer (this one is left out); the
        ask ends when all have, or after ``timeout_secs``, and those still
        silent are ``missing``. None: whoever answers within the timeout (the
        whole timeout is waited). With the link down nobody is asked.
        """
        others = None if nodes is None else frozenset(nodes) - {self.node_id}
        if others is not None and not others:
            return {}, []
        if not self.ok:
            return {}, sorted(others or ())
        request_id = secrets.token_hex(8)
        asking = self._asking[request_id] = _Asking(others)
        try:
            # The memory broker answers within send_control: registered first.
            self.send_control(f"{action}:ask", {"id": request_id, "from": self.node_id,
                                               "query": query})  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_secs):
                    await asking.done.wait()
        finally:
            del self._asking[request_id]
        missing = sorted((others or frozenset()) - asking.answers.keys())
        if missing:
            log.info("broker %s: no %s answer from %s within %.1f s", self.node_id, action,
                     missing, timeout_secs)  # fmt: skip
        return asking.answers, missing

    async def members(self) -> frozenset[str] | None:
        """The nodes of the cluster, this one included, if the broker knows them.

        None: it does not (Redis pub/sub has no membership; the node registry does).
        """
        return None

    @abc.abstractmethod
    def _send_control(self, channel_name: str, action: str, data: dict[str, Any]) -> None:
        """Carry a control message to the other nodes hearing ``channel_name``."""

    def _run_control(self, action: object, data: dict[str, Any]) -> None:
        """A control message from another node: run its handler."""
        handler = self._control.get(action) if isinstance(action, str) else None
        if handler is None:
            log.warning("broker %s: no handler for control action %r", self.node_id, action)
            return
        handler(data)


class MemoryBus:
    """What the :class:`MemoryBroker` s of one process share: who is listening."""

    def __init__(self) -> None:
        self.nodes: dict[str, MemoryBroker] = {}


class MemoryBroker(Broker):
    """A :class:`Broker` for nodes in one process, delivering synchronously.

    Without a ``bus`` the node is alone (the single-node default). Delivery
    follows interest exactly like the Redis broker: a node hears a room,
    user, role or namespace channel only while it has a local connection there,
    plus ``all`` and its own node channel.
    """

    def __init__(self, node_id: str, bus: MemoryBus | None = None) -> None:
        super().__init__(node_id)
        self.bus = bus if bus is not None else MemoryBus()
        self._receiver: Receiver | None = None
        self._channels: set[str] = {ALL_CHANNEL, node_channel(node_id)}

    def listen(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.bus.nodes[self.node_id] = self

    def _peers(self, channel_name: str) -> list[MemoryBroker]:
        # A snapshot: a delivery may close connections, which changes interest.
        return [
            peer
            for peer in tuple(self.bus.nodes.values())
            if peer is not self and channel_name in peer._channels
        ]

    def publish(
        self, target: Target, payload: bytes, *, exclude: str | None, seq: int | None
    ) -> None:
        name = channel(target)
        peers = self._peers(name) if name is not None and len(self.bus.nodes) > 1 else ()
        if not peers:
            return
        frame = protocol.frame(payload)
        for peer in peers:
            if peer._receiver is not None:
                peer._receiver.deliver(target, frame, exclude=exclude, seq=seq)

    def publish_many(self, targets: Sequence[Target], payload: bytes) -> None:
        if len(self.bus.nodes) < 2:
            return
        names = {name for name in map(channel, targets) if name is not None}
        frame: bytes | None = None
        for peer in tuple(self.bus.nodes.values()):
            if peer is self or peer._receiver is None or not names & peer._channels:
                continue
            frame = frame or protocol.frame(payload)
            peer._receiver.deliver_many(targets, frame)

    def interest(self, kind: str, key: str, interested: bool) -> None:
        name = interest_channel(kind, key)
        if interested:
            self._channels.add(name)
        else:
            self._channels.discard(name)

    async def wait_subscribed(self, kind: str, key: str) -> bool:
        return True  # interest takes effect at once

    async def members(self) -> frozenset[str] | None:
        return frozenset(self.bus.nodes) | {self.node_id}

    def _send_control(self, channel_name: str, action: str, data: dict[str, Any]) -> None:
        for peer in self._peers(channel_name):
            peer._run_control(action, data)

    async def start(self) -> bool:
        return True

    async def stop(self) -> None:
        if self.bus.nodes.get(self.node_id) is self:
            del self.bus.nodes[self.node_id]

    @property
    def ok(self) -> bool:
        return True

    @property
    def reason(self) -> str | None:
        return None

    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._channels)
