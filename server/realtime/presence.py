"""Presence: whether a user is online, and their chosen status.

A user is online while any of their connections is open, in any namespace;
``connect``/``disconnect`` report the first and last so callers announce
only real changes. Async methods leave room for the cluster-wide Redis
version (``server/cluster/redis_presence.py``) behind the same interface; callers
such as ``admin:online_users`` use only this interface, so a single node
answers the per-node questions with its own node alone.

Example::

    if await presence.connect(user_id):
        announce(user_id, "online")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

STATUSES = ("online", "away", "busy", "offline")


class Presence:
    """Single-node presence table of the node ``node_id``."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._connections: dict[str, int] = {}
        self._status: dict[str, str] = {}

    async def connect(self, user_id: str) -> bool:
        count = self._connections.get(user_id, 0)
        self._connections[user_id] = count + 1
        if count == 0:
            self._status[user_id] = "online"
        return count == 0

    async def disconnect(self, user_id: str) -> bool:
        count = self._connections.get(user_id, 0) - 1
        if count > 0:
            self._connections[user_id] = count
            return False
        self._connections.pop(user_id, None)
        self._status.pop(user_id, None)
        return True

    async def set_status(self, user_id: str, status: str) -> None:
        if user_id in self._connections:
            self._status[user_id] = status

    async def statuses(self, user_ids: Iterable[str]) -> dict[str, str]:
        return {uid: self._status.get(uid, "offline") for uid in user_ids}

    async def online_users(self) -> list[str]:
        return sorted(self._connections)

    async def connections_by_node(self, user_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Each user's open connections per node id (``{}`` for a user offline)."""
        counts = {u: self._connections.get(u, 0) for u in user_ids}
        return {u: {self.node_id: n} if n else {} for u, n in counts.items()}

    async def user_connections(self, user_id: str) -> int:
        """The user's open connections on every node, all namespaces."""
        by_node = await self.connections_by_node([user_id])
        return sum(by_node[user_id].values())

    async def nodes(self) -> list[dict[str, Any]]:
        """The live nodes, each ``{id, self, ...}`` (``self``: this node). One node
        here; its figures (uptime, connections) are the caller's to add."""
        return [{"id": self.node_id, "self": True}]

    async def joined(self, user: Mapping[str, Any], room_id: str) -> None:
        """Hook: ``user`` (``userId``, ``username``, ``displayName``) is now in
        ``room_id`` on this node. The cluster version records it so the users of
        a dead node can be announced as having left; here it is a no-op."""

    async def left(self, user_id: str, room_id: str) -> None:
        """Hook: ``user_id`` has no connection in ``room_id`` on this node any more."""
