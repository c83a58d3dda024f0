"""The Redis mirror: a hub whose broadcasts reach every node of a cluster.

:class:`RedisHub` is the :class:`~server.hub.Hub` with its two cluster hooks
implemented. A broadcast is delivered to this node's connections first (the
base class does that), then published once on Redis; every other node that
has an audience for it delivers it to its own connections, building the
WebSocket frame once there. The node's own copy comes back too and is
skipped by node id.

Channels (``p`` is ``config.redis_prefix``)::

    {p}:room:{roomId}   {p}:user:{userId}   {p}:ns:{namespace}
    {p}:all             {p}:node:{nodeId}   (control messages and the self-check)

Subscriptions follow interest: a node subscribes to a room, user or
namespace channel when its first local connection arrives there and
unsubscribes when the last one leaves, so its Redis traffic grows with its
own audience. ``{p}:all`` and its own node channel are always subscribed.

Wire envelope (orjson)::

    {"n": origin node, "t": target kind, "k": target key, "ns": namespace|null,
     "x": excluded connection id|null, "s": seq|null, "p": event payload (JSON text),
     "m": multi-target id|null, "g": [[kind, key, ns], ...] (with "m"), "ts": epoch secs}

Kinds besides the target kinds: ``ping`` (self-check, own node channel only)
and ``control`` (``"k"`` is the action, ``"d"`` its data), dispatched to the
handlers registered with :meth:`RedisHub.on_control`.

Failure behaviour: while Redis is unreachable the node keeps serving its own
connections, publishes are dropped and counted, and the listener reconnects
with capped exponential backoff plus jitter, then subscribes to everything
currently needed. A self-check publishes a ping on the node's own channel
every few seconds; not hearing it back means the subscription went deaf
without an error, which is logged, counted and repaired by reconnecting.

Example::

    client = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    hub = RedisHub("node-a", client, prefix="switchboard", metrics=metrics)
    await hub.start()
    hub.publish(Target.room("general"), "message:new", {"message": m}, seq=m["seq"])
    await hub.stop()
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
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server import errors, protocol
from server.hub import Connection, Hub, Target
from server.metrics import Metrics
from server.moderation import Moderation

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
#: How long :meth:`RedisHub.start` waits for the first subscription before
#: letting the node start degraded.
STARTUP_WAIT_SECS = 2.0
#: How long :meth:`RedisHub.stop` lets queued publishes go out.
STOP_FLUSH_SECS = 1.0
#: How long :meth:`RedisHub.stop` waits for its tasks to end once cancelled.
STOP_TIMEOUT_SECS = 2.0

ControlHandler = Callable[[dict[str, Any]], None]

_INTEREST_CHANNEL = {"room": "room", "user": "user", "namespace": "ns"}


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


class RedisHub(Hub):
    """A :class:`Hub` mirrored to the other nodes through Redis pub/sub.

    ``redis`` is the node's shared client; the mirror derives its own small
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
        on_delivered: Callable[[int, int], None] | None = None,
        coalesce: bool = False,
    ) -> None:
        super().__init__(node_id, on_delivered=on_delivered, coalesce=coalesce)
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
        self.all_channel = f"{prefix}:all"
        self.node_channel = f"{prefix}:node:{node_id}"
        self._wanted: set[str] = {self.all_channel, self.node_channel}
        self._subscribed: set[str] = set()
        # Channels Redis has confirmed (SUBSCRIBE reply seen): from then on every
        # PUBLISH to them reaches this node.
        self._confirmed: set[str] = set()
        self._confirm_changed = asyncio.Event()
        self._dirty = asyncio.Event()
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(PUBLISH_QUEUE_MAX)
        self._control: dict[str, ControlHandler] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._mid_prefix = f"{node_id}:{uuid.uuid4().hex[:8]}:"
        self._mid_counter = itertools.count()
        self._ping_token = ""
        self._ping_heard = asyncio.Event()
        self._up = False
        self._up_event = asyncio.Event()
        self._reason: str | None = "not connected yet"
        self._down_since: float | None = None
        self._drop_logged = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Publishes dropped because Redis was down or the queue full (also a metric).
        self.dropped = 0
        #: Successful reconnections after a loss or a deaf subscription (also a metric).
        self.reconnects = 0

    # -- state ----------------------------------------------------------------

    @property
    def ok(self) -> bool:
        """True while subscribed and the self-check hears its own pings."""
        return self._up

    @property
    def reason(self) -> str | None:
        """Why the mirror is not ok (None when it is)."""
        return None if self._up else self._reason

    async def check(self) -> tuple[bool, str | None]:
        """Health probe (``Health(redis_check=hub.check)``): ``(ok, reason)``."""
        return self._up, self.reason

    def subscribed_channels(self) -> frozenset[str]:
        """The channels currently subscribed on Redis (for operators and tests)."""
        return frozenset(self._subscribed)

    def _set_up(self) -> None:
        if self._up:
            return
        was_down = self._down_since is not None
        self._up = True
        self._reason = None
        self._up_event.set()
        self._drop_logged = False
        if self.metrics is not None:
            self.metrics.redis_up.set(1)
        if was_down:
            assert self._down_since is not None
            self.reconnects += 1
            if self.metrics is not None:
                self.metrics.redis_reconnects.inc()
            log.warning(
                "redis mirror: reconnected after %.1f s, subscribed to %d channel(s)",
                time.monotonic() - self._down_since, len(self._subscribed),
            )  # fmt: skip
        else:
            log.info("redis mirror: connected, subscribed to %d channel(s)", len(self._subscribed))
        self._down_since = None

    def _set_down(self, reason: str, attempt: int) -> None:
        if self._up or self._down_since is None:
            log.warning("redis mirror: down (%s); reconnecting with backoff", reason)
            self._down_since = time.monotonic()
        self._up = False
        self._up_event.clear()
        self._reason = f"{reason} (reconnect attempt {attempt})"
        if self.metrics is not None:
            self.metrics.redis_up.set(0)

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self.metrics is not None:
            self.metrics.redis_dropped.inc(count)
        # Once per outage: a broadcast storm must not become a log storm.
        if not self._drop_logged:
            self._drop_logged = True
            log.warning("redis mirror: dropping publishes for other nodes (%s)", why)

    # -- lifetime ---------------------------------------------------------------

    async def start(self, wait_secs: float = STARTUP_WAIT_SECS) -> bool:
        """Start the listener and publisher; wait up to ``wait_secs`` for Redis.

        Returns whether the mirror is up. A node whose Redis is down starts
        anyway (degraded) and keeps trying in the background.
        """
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="redis-mirror"),
            loop.create_task(self._publisher(), name="redis-publisher"),
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
        while self._up and not self._outbox.empty() and time.monotonic() < deadline:  # noqa: ASYNC110
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

    # -- hooks --------------------------------------------------------------------

    def _remote_interest(self, kind: str, key: str, interested: bool) -> None:
        channel = f"{self.prefix}:{_INTEREST_CHANNEL[kind]}:{key}"
        if interested:
            self._wanted.add(channel)
        else:
            self._wanted.discard(channel)
        self._dirty.set()

    def _remote_publish(
        self, target: Target, payload: bytes, exclude: str | None, seq: int | None
    ) -> None:
        channel = self._channel_for(target)
        if channel is None:
            return
        self._enqueue(channel, self._envelope(target, payload, exclude=exclude, seq=seq))

    def publish_many(self, targets: Iterable[Target], event: str, data: dict[str, Any]) -> int:
        """Deliver once per connection here; one tagged copy per target channel elsewhere.

        Every copy carries the same id and the whole target list, so a node
        reached through several channels delivers to the union on the first
        copy and ignores the others.
        """
        targets = list(targets)
        payload = protocol.event_payload(event, data)
        local: set[Connection] = set()
        for target in targets:
            local.update(self._local(target))
        delivered = self._write(local, protocol.frame(payload), None)
        remote = [t for t in targets if t.kind != "connection"]
        if not remote:
            return delivered
        mid = f"{self._mid_prefix}{next(self._mid_counter)}"
        listed = [[t.kind, t.key, t.namespace] for t in remote]
        if len(remote) > MANY_TARGETS_VIA_ALL:
            routes = {self.all_channel: Target.all()}
        else:
            routes = {}
            for target in remote:
                channel = self._channel_for(target)
                if channel is not None:
                    routes.setdefault(channel, target)
        for channel, target in routes.items():
            self._enqueue(channel, self._envelope(target, payload, mid=mid, targets=listed))
        return delivered

    # -- control messages -----------------------------------------------------------

    def on_control(self, action: str, handler: ControlHandler) -> None:
        """Run ``handler(data)`` when another node sends control ``action``."""
        self._control[action] = handler

    def send_control(
        self,
        action: str,
        data: dict[str, Any],
        *,
        target: Target | None = None,
        node: str | None = None,
    ) -> None:
        """Send a control message to the other nodes.

        To one ``node``, to the nodes ``target`` reaches (e.g. those with the
        user's connections), or to every node. The sender does not get it.
        """
        if node is not None:
            channel: str | None = f"{self.prefix}:node:{node}"
        elif target is not None:
            channel = self._channel_for(target)
        else:
            channel = self.all_channel
        if channel is None:
            raise ValueError(f"control messages cannot go to {target!r}")
        envelope = {"n": self.node_id, "t": "control", "k": action, "d": data, "ts": time.time()}
        self._enqueue(channel, orjson.dumps(envelope))

    # -- publishing -----------------------------------------------------------------

    def _channel_for(self, target: Target) -> str | None:
        kind = target.kind
        if kind == "room":
            return f"{self.prefix}:room:{target.key}"
        if kind == "user":
            return f"{self.prefix}:user:{target.key}"
        if kind == "namespace":
            return f"{self.prefix}:ns:{target.key}"
        if kind == "all":
            # A namespace-narrowed "all" reaches exactly the namespace's nodes.
            if target.namespace is not None:
                return f"{self.prefix}:ns:{target.namespace}"
            return self.all_channel
        # Connection ids are node-local: nothing to tell the other nodes.
        return None

    def _envelope(
        self,
        target: Target,
        payload: bytes,
        *,
        exclude: str | None = None,
        seq: int | None = None,
        mid: str | None = None,
        targets: list[list[str | None]] | None = None,
    ) -> bytes:
        envelope: dict[str, Any] = {
            "n": self.node_id,
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

    def _enqueue(self, channel: str, data: bytes) -> None:
        if not self._up:
            self._drop(1, self._reason or "redis down")
            return
        try:
            self._outbox.put_nowait((channel, data))
        except asyncio.QueueFull:
            self._drop(1, "publish queue full")

    async def _publisher(self) -> None:
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
                self._drop(len(batch), f"publish failed: {type(exc).__name__}: {exc}")
                continue
            if self.metrics is not None:
                self.metrics.redis_published.inc(len(batch))

    async def _publish_batch(self, batch: list[tuple[str, bytes]]) -> None:
        if len(batch) == 1:
            await self._redis.publish(*batch[0])
            return
        pipe = self._redis.pipeline(transaction=False)
        for channel, data in batch:
            pipe.publish(channel, data)
        await pipe.execute()

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
                self._subscribed = set()
                self._confirmed = set()
                self._confirm_changed.set()
                # A broken connection may not close cleanly; it is discarded either way.
                with contextlib.suppress(aioredis.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_SECS)

    async def _listen(self, pubsub: PubSub) -> None:
        """Subscribe to everything needed, then read, re-sync and self-check until one fails."""
        channels = set(self._wanted)
        self._subscribed = set(channels)
        await pubsub.subscribe(*channels)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._read(pubsub), name="redis-mirror-read"),
            loop.create_task(self._sync(pubsub), name="redis-mirror-sync"),
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
                channel = message["channel"]
                name = channel.decode() if isinstance(channel, bytes) else str(channel)
                if kind == "subscribe":
                    self._confirmed.add(name)
                else:
                    self._confirmed.discard(name)
                self._confirm_changed.set()

    async def wait_subscribed(self, kind: str, key: str) -> bool:
        """Wait until Redis confirmed the subscription for a local interest.

        A join calls this between subscribing and reading history, so a message
        another node commits after the history query is published to a channel
        this node already hears. Returns False when Redis is down (local
        delivery only) or the confirmation did not come in time.
        """
        channel = f"{self.prefix}:{_INTEREST_CHANNEL[kind]}:{key}"
        try:
            async with asyncio.timeout(SUBSCRIBE_WAIT_SECS):
                while channel not in self._confirmed:
                    if not self._up or channel not in self._wanted:
                        return False
                    self._confirm_changed.clear()
                    await self._confirm_changed.wait()
        except TimeoutError:
            log.warning("redis mirror: no confirmation for %s within %.1f s", channel,
                        SUBSCRIBE_WAIT_SECS)  # fmt: skip
            return False
        return True

    async def _sync(self, pubsub: PubSub) -> None:
        """Bring the Redis subscriptions in line with local interest, in batches."""
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            add = self._wanted - self._subscribed
            drop = self._subscribed - self._wanted
            if add:
                self._subscribed |= add
                await pubsub.subscribe(*add)
            if drop:
                self._subscribed -= drop
                await pubsub.unsubscribe(*drop)

    async def _self_check(self) -> None:
        """Ping the own node channel; not hearing it back means the subscription is deaf.

        The first ping also confirms the fresh subscription: the mirror is
        reported up only once its own message made the round trip.
        """
        while True:
            token = uuid.uuid4().hex
            self._ping_token = token
            self._ping_heard.clear()
            ping = {"n": self.node_id, "t": "ping", "k": token, "ts": time.time()}
            await self._redis.publish(self.node_channel, orjson.dumps(ping))
            try:
                async with asyncio.timeout(self.self_check_timeout_secs):  # see _publisher
                    await self._ping_heard.wait()
            except TimeoutError:
                raise _Deaf(
                    f"subscription deaf: own ping not heard within "
                    f"{self.self_check_timeout_secs:g} s"
                ) from None
            self._set_up()
            await asyncio.sleep(self.self_check_interval_secs)

    def _on_message(self, data: bytes) -> None:
        try:
            envelope = orjson.loads(data)
            kind = envelope["t"]
            origin = envelope["n"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("redis mirror: ignoring a malformed message (%d bytes)", len(data))
            return
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
                self._on_control(envelope)
            else:
                self._deliver_remote(envelope)
        except Exception:
            # One bad message must not take the node's mirror down with it.
            log.exception("redis mirror: failed to handle a %s message from %s", kind, origin)

    def _deliver_remote(self, envelope: dict[str, Any]) -> None:
        frame = protocol.frame(envelope["p"].encode())
        mid = envelope.get("m")
        if mid is None:
            target = Target(envelope["t"], envelope["k"], envelope.get("ns"))
            self.deliver(target, frame, exclude=envelope.get("x"), seq=envelope.get("s"))
            return
        if mid in self._seen:
            return
        self._seen[mid] = None
        if len(self._seen) > SEEN_IDS_MAX:
            self._seen.popitem(last=False)
        conns: set[Connection] = set()
        for kind, key, namespace in envelope["g"]:
            conns.update(self._local(Target(kind, key, namespace)))
        self._write(conns, frame, None)

    def _on_control(self, envelope: dict[str, Any]) -> None:
        action = envelope.get("k")
        handler = self._control.get(action) if isinstance(action, str) else None
        if handler is None:
            log.warning("redis mirror: no handler for control action %r", action)
            return
        handler(envelope.get("d") or {})


def _error_class(code: str) -> type[errors.GatewayError]:
    """The GatewayError subclass with ``code`` (the root class if none)."""
    pending: list[type[errors.GatewayError]] = [errors.GatewayError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return errors.GatewayError


def relay_disconnects(hub: RedisHub, moderation: Moderation) -> None:
    """Make kick and ban close the user's connections on every node.

    ``Moderation.disconnect_user`` acts locally and calls the relay, which
    sends control ``disconnect_user`` on the user's channel (so only nodes
    with a connection of that user get it); each of them runs
    ``disconnect_user`` there with the same notice and error.
    """

    def send(
        user_id: str,
        notice_event: str | None,
        notice: dict[str, Any] | None,
        error: errors.GatewayError,
    ) -> None:
        data = {
            "userId": user_id,
            "code": error.close_code or 4403,
            "errorCode": error.code,
            "message": error.message,
            "details": error.details,
            "noticeEvent": notice_event,
            "notice": notice,
        }
        hub.send_control("disconnect_user", data, target=Target.user(user_id))

    def receive(data: dict[str, Any]) -> None:
        error = _error_class(data["errorCode"])(data["message"], data.get("details"))
        closed = moderation.disconnect_user(
            data["userId"], data.get("noticeEvent"), data.get("notice"), error, relay=False
        )
        log.info("disconnect_user from another node: %s (%s): %d connection(s)",
                 data["userId"], data["errorCode"], closed)  # fmt: skip

    moderation.cluster_relay = send
    hub.on_control("disconnect_user", receive)
