"""Presence: whether a user is online, and their chosen status.

A user is online while any of their connections is open, in any namespace;
``connect``/``disconnect`` report the first and last so callers announce
only real changes. Async methods leave room for the cluster-wide Redis
version behind the same interface.

Example::

    if await presence.connect(user_id):
        announce(user_id, "online")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

STATUSES = ("online", "away", "busy", "offline")


class Presence:
    """Single-node presence table."""

    def __init__(self) -> None:
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

    async def joined(self, user: Mapping[str, Any], room_id: str) -> None:
        """Hook: ``user`` (``userId``, ``username``, ``displayName``) is now in
        ``room_id`` on this node. The cluster version records it so the users of
        a dead node can be announced as having left; here it is a no-op."""

    async def left(self, user_id: str, room_id: str) -> None:
        """Hook: ``user_id`` has no connection in ``room_id`` on this node any more."""
