"""The Redis connection the cluster-state classes share, with its circuit breaker.

With ``SWITCHBOARD_REDIS_URL`` set, presence (``server/cluster/redis_presence.py``),
rate and connection limits (``server/cluster/redis_limits.py``) and the node
registry (``server/cluster/node_registry.py``) keep cluster-wide state in one
Redis. They reach it through one :class:`ClusterLink`: the client, the key
prefix, this node's id, the Lua scripts they run (``server/cluster/lua/*.lua``) and
a circuit breaker. When Redis is unreachable each class answers from this
node's own share and the link skips Redis until the registry's next
heartbeat reaches it again; the registry then rewrites this node's records
(a Redis restart loses them; a long outage may have got this node reaped),
so the cluster view heals within one tick.

Keys live in one Redis (no Redis Cluster hash tags): the reaper's Lua script
touches keys it computes.

Example::

    link = ClusterLink(redis_client, "sb", "node-a")
    connect = link.script("hash_total", "presence_connect")
    first = await link.run("presence.connect", connect(keys, args))
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

log = logging.getLogger("switchboard.cluster")

T = TypeVar("T")

#: A Redis call slower than this counts as Redis being unreachable.
REDIS_OP_TIMEOUT_SECS = 1.0

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)

#: The Lua scripts, one per file, next to this module (package data when installed).
LUA_DIR = Path(__file__).with_name("lua")


def lua_source(*names: str) -> str:
    """The text of ``lua/<name>.lua`` for each name, in order.

    Redis runs each script on its own (sharing functions needs Redis 7's
    ``FUNCTION LOAD``), so a script that calls a helper such as
    ``hash_total`` is loaded with the helper's file first.
    """
    return "\n".join((LUA_DIR / f"{name}.lua").read_text(encoding="utf-8") for name in names)


def as_text(value: Any) -> str:
    """A Redis reply item as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisUnavailable(Exception):
    """Redis did not answer (or is known to be down); use the local answer."""


class ClusterLink:
    """The Redis client, key prefix, node id and Lua scripts the cluster classes share.

    It is also the circuit breaker: after a failed call, :meth:`run` raises
    :class:`RedisUnavailable` at once (no waiting on a dead server on every
    connect) until :class:`~server.cluster.node_registry.NodeRegistry`'s heartbeat
    gets through again, and ``dirty`` tells the registry that this node's
    records need rewriting.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        node_id: str,
        timeout_secs: float = REDIS_OP_TIMEOUT_SECS,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.node_id = node_id
        self.timeout_secs = timeout_secs
        #: The last call failed; calls are skipped until the heartbeat succeeds.
        self.down = False
        #: Something happened locally only; this node's records must be rewritten.
        self.dirty = False
        #: The scripts registered through :meth:`script`, by script name.
        self.scripts: dict[str, AsyncScript] = {}

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def script(self, *names: str) -> AsyncScript:
        """Register the script made of ``lua/<name>.lua`` files (helpers first, the
        script last); it is known by its last name in :attr:`scripts`."""
        script = self.redis.register_script(lua_source(*names))
        self.scripts[names[-1]] = script
        return script

    async def run(self, what: str, call: Awaitable[T], *, probe: bool = False) -> T:
        """Await a Redis call; raise :class:`RedisUnavailable` if it fails.

        Only a ``probe`` (the registry's heartbeat) is attempted while down.
        """
        if self.down and not probe:
            if asyncio.iscoroutine(call):
                call.close()
            self.dirty = True
            raise RedisUnavailable(what)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that arrives as the call completes (stop would hang).
            async with asyncio.timeout(self.timeout_secs):
                return await call
        except _REDIS_ERRORS as exc:
            self.dirty = True
            if not self.down:
                self.down = True
                log.warning(
                    "Redis unreachable (%s: %s: %s): presence and limits fall back to this "
                    "node's own figures until it answers again",
                    what, type(exc).__name__, exc,
                )  # fmt: skip
            raise RedisUnavailable(what) from exc

    def mark_up(self) -> None:
        if self.down:
            self.down = False
            log.warning("Redis reachable again: cluster presence and limits resume")
