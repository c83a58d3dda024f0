"""The Redis broker: a hub's broadcasts reach every node of a cluster.

:class:`RedisBroker` is the :class:`~server.realtime.broker.Broker` of a cluster node.
The hub delivers a broadcast to this node's connections first, then hands
it to the broker, which publishes it once on Redis; every other node that
has an audience for it delivers it to its own connections (its hub builds
the WebSocket frame once there). The node's own copy comes back too and is
skipped by node id.

The broker is a few small parts composed: the envelope codec (plain
functions), :class:`PublishQueue` (one task publishes, in order, in
pipelined batches), :class:`Subscriptions` (Redis subscriptions follow the
hub's interest) and the broker itself (the link's state, the listener with
its reconnect loop and self-check, control messages, dedupe).

Channels (``p`` is ``config.redis_prefix``)::

    {p}:room:{roomId}   {p}:user:{userId}   {p}:role:{role}   {p}:ns:{namespace}
    {p}:all             {p}:node:{nodeId}   (control messages and the self-check)

Subscriptions follow interest: a node subscribes to a room, user, role or
namespace channel when its first local connection arrives there and
unsubscribes when the last one leaves, so its Redis traffic grows with its
own audience. ``{p}:all`` and its own node channel are always subscribed.

Wire envelope (orjson)::

    {"n": origin node, "t": target kind, "k": target key, "ns": namespace|null,
     "x": excluded connection id|null, "s": seq|null, "p": event payload (JSON text),
     "m": multi-target id|null, "g": [[kind, key, ns], ...] (with "m"), "ts": epoch secs}

Kinds besides the target kinds: ``ping`` (self-check, own node channel only)
and ``control`` (``"k"`` is the action, ``"d"`` its data), dispatched to the
handlers registered with :meth:`RedisBroker.on_control`.

Failure behaviour: while Redis is unreachable the node keeps serving its own
connections, publishes are dropped and counted, and the listener reconnects
with capped exponential backoff plus jitter, then subscribes to everything
currently needed. A self-check publishes a ping on the node's own channel
every few seconds; not hearing it back means the subscription went deaf
without an error, which is logged, counted and repaired by reconnecting.
The link's listeners (:meth:`~server.realtime.broker.Broker.on_link`) hear
``lost`` on each failure, ``resubscribing`` before it subscribes again and
``restored`` once its own ping made the round trip: what other nodes
published meanwhile never arrives, and the node's catch-up
(``server/services/catch_up.py``) delivers it from the database.

Example::

    client = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    broker = RedisBroker("node-a", client, prefix="switchboard", metrics=metrics)
    hub = Hub("node-a", broker=broker)
    await broker.start()
    hub.publish(Target.room("general"), "message:new", {"message": m}, seq=m["seq"])
    await broker.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.core import protocol
from server.ops.metrics import Metrics
from server.realtime.broker import (
    ALL_CHANNEL,
    LINK_LOST,
    LINK_RESTORED,
    LINK_RESUBSCRIBING,
    Broker,
    Receiver,
    channel,
    interest_channel,
    node_channel,
)
from server.realtime.hub import Target

log = logging.getLogger("switchboard.cluster")

#: Reconnect backoff: doubles from the minimum up to the cap, each wait jittered.
RECONNECT_MIN_SECS = 0.1
RECONNECT_MAX_SECS = 5.0
#: How often the node pings its own channel, and how long it waits to hear it.
SELF_CHECK_INTERVAL_SECS = 5.0
# How long a join waits for Redis to confirm a new subscription.
SUBSCRIBE_WAIT_SECS = 2.0
SELF_CHECK_TIMEOUT_SECS = 3.0
#: Publishes waiting for the publisher task; beyond this they are dropped
#: (a stalled Redis must not grow the node's memory without bound).
PUBLISH_QUEUE_MAX = 10_000
#: PUBLISHes sent in one pipeline round trip when the queue has a backlog.
PUBLISH_BATCH_MAX = 256
#: A publish (or batch) that takes longer than this counts as failed.
PUBLISH_TIMEOUT_SECS = 5.0
#: Multi-target ids remembered for deduplication (a copy arrives per channel).
SEEN_IDS_MAX = 4096
#: A publish_many with more targets than this goes once over ``{p}:all``
#: instead of once per target channel: each copy carries the whole target
#: list, so per-channel copies would cost O(targets²) bytes.
MANY_TARGETS_VIA_ALL = 16
#: How long :meth:`RedisBroker.start` waits for the first subscription before
#: letting the node start degraded.
STARTUP_WAIT_SECS = 2.0
#: How long :meth:`RedisBroker.stop` lets queued publishes go out.
STOP_FLUSH_SECS = 1.0
#: How long :meth:`RedisBroker.stop` waits for its tasks to end once cancelled.
STOP_TIMEOUT_SECS = 2.0


def _cancel_requested() -> bool:
    """Whether the current task was asked to stop.

    redis-py (on a connection error while cancelling) and asyncio.timeout can
    turn a cancellation into an ordinary error; a loop that handles that
    error must re-raise instead of carrying on, or stop() would hang.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Deaf(Exception):
    """The subscription stopped delivering without reporting an error."""


# -- envelopes ----------------------------------------------------------------------


def encode_broadcast(
    node_id: str,
    target: Target,
    payload: bytes,
    *,
    exclude: str | None = None,
    seq: int | None = None,
    mid: str | None = None,
    targets: list[list[str | None]] | None = None,
) -> bytes:
    """The wire envelope of a broadcast (see the module docstring)."""
    envelope: dict[str, Any] = {
        "n": node_id,
        "t": target.kind,
        "k": target.key,
        "ns": target.namespace,
        "x": exclude,
        "s": seq,
        "p": payload.decode(),
        "m": mid,
        "ts": time.time(),
    }
    if targets is not None:
        envelope["g"] = targets
    return orjson.dumps(envelope)


def encode_control(node_id: str, action: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"n": node_id, "t": "control", "k": action, "d": data, "ts": time.time()})


def encode_ping(node_id: str, token: str) -> bytes:
    return orjson.dumps({"n": node_id, "t": "ping", "k": token, "ts": time.time()})


def decode(data: bytes) -> dict[str, Any] | None:
    """An envelope with its kind ``t`` and origin ``n``; None if malformed."""
    try:
        envelope = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(envelope, dict) or "t" not in envelope or "n" not in envelope:
        return None
    return envelope


# -- publishing ----------------------------------------------------------------------


class PublishQueue:
    """Publishes for the other nodes, in order, by one task in pipelined batches.

    Bounded (:data:`PUBLISH_QUEUE_MAX`): while the link is down, or the queue
    is full, publishes are dropped and counted -- a stalled Redis must not
    grow the node's memory -- and logged once per outage.
    """

    def __init__(self, redis: aioredis.Redis, metrics: Metrics | None) -> None:
        self._redis = redis
        self.metrics = metrics
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(PUBLISH_QUEUE_MAX)
        self._drop_logged = False
        #: Publishes dropped because Redis was down or the queue full (also a metric).
        self.dropped = 0

    def empty(self) -> bool:
        return self._outbox.empty()

    def put(self, channel_name: str, data: bytes, up: bool, reason: str | None) -> None:
        if not up:
            self.drop(1, reason or "redis down")
            return
        try:
            self._outbox.put_nowait((channel_name, data))
        except asyncio.QueueFull:
            self.drop(1, "publish queue full")

    def drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self.metrics is not None:
            self.metrics.redis_dropped.inc(count)
        # Once per outage: a broadcast storm must not become a log storm.
        if not self._drop_logged:
            self._drop_logged = True
            log.warning("redis mirror: dropping publishes for other nodes (%s)", why)

    def link_up(self) -> None:
        """A new outage will be logged again."""
        self._drop_logged = False

    async def run(self) -> None:
        """The one task that publishes, so a node's broadcasts keep their order."""
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < PUBLISH_BATCH_MAX and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel
                # that lands as the publish completes, and stop() then hangs.
                async with asyncio.timeout(PUBLISH_TIMEOUT_SECS):
                    await self._publish_batch(batch)
            except (aioredis.RedisError, OSError, TimeoutError) as exc:
                if _cancel_requested():
                    raise asyncio.CancelledError from exc
                self.drop(len(batch), f"publish failed: {type(exc).__name__}: {exc}")
                continue
            if self.metrics is not None:
                self.metrics.redis_published.inc(len(batch))

    async def _publish_batch(self, batch: list[tuple[str, bytes]]) -> None:
        if len(batch) == 1:
            await self._redis.publish(*batch[0])
            return
        pipe = self._redis.pipeline(transaction=False)
        for channel_name, data in batch:
            pipe.publish(channel_name, data)
        await pipe.execute()


# -- subscriptions --------------------------------------------------------------------


class Subscriptions:
    """The Redis subscriptions of a node, following the hub's interest.

    ``wanted`` is what local interest asks for, ``subscribed`` what was sent
    to Redis on the current connection, ``confirmed`` what Redis answered
    (from then on every PUBLISH to it reaches this node).
    """

    def __init__(self, always: set[str]) -> None:
        self.wanted: set[str] = set(always)
        self.subscribed: set[str] = set()
        self.confirmed: set[str] = set()
        self._confirm_changed = asyncio.Event()
        self._dirty = asyncio.Event()

    def want(self, channel_name: str, interested: bool) -> None:
        if interested:
            self.wanted.add(channel_name)
        else:
            self.wanted.discard(channel_name)
        self._dirty.set()

    async def subscribe_all(self, pubsub: PubSub) -> None:
        """On a fresh connection: subscribe to everything wanted."""
        channels = set(self.wanted)
        self.subscribed = set(channels)
        await pubsub.subscribe(*channels)

    async def sync(self, pubsub: PubSub) -> None:
        """Bring the Redis subscriptions in line with local interest, in batches."""
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            add = self.wanted - self.subscribed
            drop = self.subscribed - self.wanted
            if add:
                self.subscribed |= add
                await pubsub.subscribe(*add)
            if drop:
                self.subscribed -= drop
                await pubsub.unsubscribe(*drop)

    def answered(self, kind: str, channel_name: str) -> None:
        """Redis confirmed a ``subscribe`` or an ``unsubscribe``."""
        if kind == "subscribe":
            self.confirmed.add(channel_name)
        else:
            self.confirmed.discard(channel_name)
        self._confirm_changed.set()

    def lost(self) -> None:
        """The connection is gone, and every subscription with it."""
        self.subscribed = set()
        self.confirmed = set()
        self._confirm_changed.set()

    async def wait_confirmed(self, channel_name: str, up: Callable[[], bool]) -> bool:
        """Wait until Redis confirmed ``channel_name``; False if down, unwanted or late."""
        try:
            async with asyncio.timeout(SUBSCRIBE_WAIT_SECS):
                while channel_name not in self.confirmed:
                    if not up() or channel_name not in self.wanted:
                        return False
                    self._confirm_changed.clear()
                    await self._confirm_changed.wait()
        except TimeoutError:
            log.warning("redis mirror: no confirmation for %s within %.1f s", channel_name,
                        SUBSCRIBE_WAIT_SECS)  # fmt: skip
            return False
        return True


# -- the broker -------------------------------------------------------------------------


class RedisBroker(Broker):
    """A :class:`~server.realtime.broker.Broker` over Redis pub/sub (see the module docstring).

    ``redis`` is the node's shared client; the broker derives its own small
    connection pool from it (same address, TLS and credentials) without
    redis-py's silent command retries, so every broken connection surfaces
    here and is handled in one place: state, logs, metrics, backoff.

    The self-check timings are attributes so tests can shorten them before
    :meth:`start`.
    """

    def __init__(
        self,
        node_id: str,
        redis: aioredis.Redis,
        *,
        prefix: str = "switchboard",
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(node_id)
        self.prefix = prefix
        self.metrics = metrics
        self.self_check_interval_secs = SELF_CHECK_INTERVAL_SECS
        self.self_check_timeout_secs = SELF_CHECK_TIMEOUT_SECS
        shared = redis.connection_pool
        # The maintenance-notification entries belong to the shared pool's handler.
        kwargs = {
            k: v
            for k, v in shared.connection_kwargs.items()
            if not k.startswith(("maint_notifications", "orig_"))
        }
        self._pool = aioredis.ConnectionPool(
            connection_class=shared.connection_class, **{**kwargs, "retry": Retry(NoBackoff(), 0)}
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self.all_channel = self._name(ALL_CHANNEL)
        self.node_channel = self._name(node_channel(node_id))
        self.subscriptions = Subscriptions({self.all_channel, self.node_channel})
        self.queue = PublishQueue(self._redis, metrics)
        self._receiver: Receiver | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._mid_prefix = f"{node_id}:{uuid.uuid4().hex[:8]}:"
        self._mid_counter = itertools.count()
        self._ping_token = ""
        self._ping_heard = asyncio.Event()
        self._up = False
        self._up_event = asyncio.Event()
        self._reason: str | None = "not connected yet"
        self._down_since: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Successful reconnections after a loss or a deaf subscription (also a metric).
        self.reconnects = 0

    def _name(self, channel_name: str) -> str:
        return f"{self.prefix}:{channel_name}"

    # -- state ----------------------------------------------------------------

    @property
    def ok(self) -> bool:
        """True while subscribed and the self-check hears its own pings."""
        return self._up

    @property
    def reason(self) -> str | None:
        """Why the broker is not ok (None when it is)."""
        return None if self._up else self._reason

    @property
    def dropped(self) -> int:
        """Publishes dropped because Redis was down or the queue full (also a metric)."""
        return self.queue.dropped

    def subscribed_channels(self) -> frozenset[str]:
        """The channels currently subscribed on Redis (for operators and tests)."""
        return frozenset(self.subscriptions.subscribed)

    def _set_up(self) -> None:
        if self._up:
            return
        was_down = self._down_since is not None
        self._up = True
        self._reason = None
        self._up_event.set()
        self.queue.link_up()
        if self.metrics is not None:
            self.metrics.redis_up.set(1)
        subscribed = len(self.subscriptions.subscribed)
        if was_down:
            assert self._down_since is not None
            self.reconnects += 1
            if self.metrics is not None:
                self.metrics.redis_reconnects.inc()
            log.warning(
                "redis mirror: reconnected after %.1f s, subscribed to %d channel(s)",
                time.monotonic() - self._down_since, subscribed,
            )  # fmt: skip
        else:
            log.info("redis mirror: connected, subscribed to %d channel(s)", subscribed)
        self._down_since = None
        if was_down:
            self._link_changed(LINK_RESTORED)

    def _set_down(self, reason: str, attempt: int) -> None:
        if self._up or self._down_since is None:
            log.warning("redis mirror: down (%s); reconnecting with backoff", reason)
            self._down_since = time.monotonic()
        self._up = False
        self._up_event.clear()
        self._reason = f"{reason} (reconnect attempt {attempt})"
        if self.metrics is not None:
            self.metrics.redis_up.set(0)
        self._link_changed(LINK_LOST)

    # -- lifetime ---------------------------------------------------------------

    def listen(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def start(self, wait_secs: float = STARTUP_WAIT_SECS) -> bool:
        """Start the listener and publisher; wait up to ``wait_secs`` for Redis.

        Returns whether the link is up. A node whose Redis is down starts
        anyway (degraded) and keeps trying in the background.
        """
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="redis-mirror"),
            loop.create_task(self.queue.run(), name="redis-publisher"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_secs):
                await self._up_event.wait()
        if not self._up:
            log.warning("redis mirror: not connected at start-up (%s)", self._reason)
        return self._up

    async def stop(self) -> None:
        """Let queued publishes go out (briefly), then stop and disconnect."""
        deadline = time.monotonic() + STOP_FLUSH_SECS
        while self._up and not self.queue.empty() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a library that swallows the cancellation must not hang shutdown.
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECS)
            if pending:
                log.error("redis mirror: %d task(s) ignored cancellation at stop", len(pending))
        self._tasks = []
        self._up = False
        if self.metrics is not None:
            self.metrics.redis_up.set(0)
        await self._redis.aclose()
        await self._pool.disconnect()

    # -- the hub's side ---------------------------------------------------------------

    def interest(self, kind: str, key: str, interested: bool) -> None:
        self.subscriptions.want(self._name(interest_channel(kind, key)), interested)

    def _enqueue(self, channel_name: str, data: bytes) -> None:
        self.queue.put(channel_name, data, self._up, self._reason)

    def publish(
        self, target: Target, payload: bytes, *, exclude: str | None, seq: int | None
    ) -> None:
        name = channel(target)
        if name is not None:
            envelope = encode_broadcast(self.node_id, target, payload, exclude=exclude, seq=seq)
            self._enqueue(self._name(name), envelope)

    def publish_many(self, targets: Sequence[Target], payload: bytes) -> None:
        """One tagged copy per target channel.

        Every copy carries the same id and the whole target list, so a node
        reached through several channels delivers to the union on the first
        copy and ignores the others.
        """
        mid = f"{self._mid_prefix}{next(self._mid_counter)}"
        listed = [[t.kind, t.key, t.namespace] for t in targets]
        if len(targets) > MANY_TARGETS_VIA_ALL:
            routes = {self.all_channel: Target.all()}
        else:
            routes = {}
            for target in targets:
                name = channel(target)
                if name is not None:
                    routes.setdefault(self._name(name), target)
        for channel_name, target in routes.items():
            envelope = encode_broadcast(self.node_id, target, payload, mid=mid, targets=listed)
            self._enqueue(channel_name, envelope)

    async def wait_subscribed(self, kind: str, key: str) -> bool:
        """Wait until Redis confirmed the subscription for a local interest.

        A join calls this between subscribing and reading history, so a message
        another node commits after the history query is published to a channel
        this node already hears. Returns False when Redis is down (local
        delivery only) or the confirmation did not come in time.
        """
        channel_name = self._name(interest_channel(kind, key))
        return await self.subscriptions.wait_confirmed(channel_name, lambda: self._up)

    # -- control messages -----------------------------------------------------------

    def _send_control(self, channel_name: str, action: str, data: dict[str, Any]) -> None:
        self._enqueue(self._name(channel_name), encode_control(self.node_id, action, data))

    # -- listening --------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, subscribe, listen; on any failure back off and do it again."""
        delay = RECONNECT_MIN_SECS
        attempt = 0
        while True:
            pubsub = self._redis.pubsub()
            try:
                await self._listen(pubsub)
            except (_Deaf, aioredis.RedisError, OSError) as exc:
                if _cancel_requested():
                    raise asyncio.CancelledError from exc
                if self._up:
                    # It was working: start the backoff over.
                    delay, attempt = RECONNECT_MIN_SECS, 0
                if isinstance(exc, _Deaf):
                    log.error("redis mirror: %s; reconnecting", exc)
                attempt += 1
                self._set_down(f"{type(exc).__name__}: {exc}", attempt)
            finally:
                self.subscriptions.lost()
                # A broken connection may not close cleanly; it is discarded either way.
                with contextlib.suppress(aioredis.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_SECS)

    async def _listen(self, pubsub: PubSub) -> None:
        """Subscribe to everything needed, then read, re-sync and self-check until one fails."""
        if self._down_since is not None:
            self._link_changed(LINK_RESUBSCRIBING)
        await self.subscriptions.subscribe_all(pubsub)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._read(pubsub), name="redis-mirror-read"),
            loop.create_task(self.subscriptions.sync(pubsub), name="redis-mirror-sync"),
            loop.create_task(self._self_check(), name="redis-mirror-self-check"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raises the failure
            raise aioredis.ConnectionError("a mirror task ended")
        finally:
            for task in tasks:
                task.cancel()
            # Bounded for the same reason as in stop().
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECS)

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            if message is None:
                continue
            kind = message["type"]
            if kind == "message":
                self._on_message(message["data"])
            elif kind in ("subscribe", "unsubscribe"):
                name = message["channel"]
                self.subscriptions.answered(
                    kind, name.decode() if isinstance(name, bytes) else str(name)
                )

    async def _self_check(self) -> None:
        """Ping the own node channel; not hearing it back means the subscription is deaf.

        The first ping also confirms the fresh subscription: the broker is
        reported up only once its own message made the round trip.
        """
        while True:
            token = uuid.uuid4().hex
            self._ping_token = token
            self._ping_heard.clear()
            await self._redis.publish(self.node_channel, encode_ping(self.node_id, token))
            try:
                async with asyncio.timeout(self.self_check_timeout_secs):  # see PublishQueue.run
                    await self._ping_heard.wait()
            except TimeoutError:
                raise _Deaf(
                    f"subscription deaf: own ping not heard within "
                    f"{self.self_check_timeout_secs:g} s"
                ) from None
            self._set_up()
            await asyncio.sleep(self.self_check_interval_secs)

    def _on_message(self, data: bytes) -> None:
        envelope = decode(data)
        if envelope is None:
            log.warning("redis mirror: ignoring a malformed message (%d bytes)", len(data))
            return
        kind, origin = envelope["t"], envelope["n"]
        if kind == "ping":
            if origin == self.node_id and envelope.get("k") == self._ping_token:
                self._ping_heard.set()
            return
        if origin == self.node_id:
            return  # our own broadcast: delivered locally before it was published
        if self.metrics is not None:
            self.metrics.redis_received.inc()
            sent_at = envelope.get("ts")
            if isinstance(sent_at, int | float):
                self.metrics.redis_pubsub_lag.observe(max(0.0, time.time() - sent_at))
        try:
            if kind == "control":
                self._run_control(envelope.get("k"), envelope.get("d") or {})
            else:
                self._deliver(envelope)
        except Exception:
            # One bad message must not take the node's link down with it.
            log.exception("redis mirror: failed to handle a %s message from %s", kind, origin)

    def _deliver(self, envelope: dict[str, Any]) -> None:
        receiver = self._receiver
        if receiver is None:
            return
        frame = protocol.frame(envelope["p"].encode())
        mid = envelope.get("m")
        if mid is None:
            target = Target(envelope["t"], envelope["k"], envelope.get("ns"))
            receiver.deliver(target, frame, exclude=envelope.get("x"), seq=envelope.get("s"))
            return
        if mid in self._seen:
            return
        self._seen[mid] = None
        if len(self._seen) > SEEN_IDS_MAX:
            self._seen.popitem(last=False)
        receiver.deliver_many((Target(*listed) for listed in envelope["g"]), frame)
