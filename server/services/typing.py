"""Typing indicators: who is typing where, with a server-side auto-stop.

A client that starts typing and then goes quiet (closed the tab, lost the
network) must not leave everyone else watching "alice is typing..." for
good: each ``typing:start`` arms a timer that announces the stop itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.realtime.hub import Hub, Target

# Typing indicators stop on their own this long after the last typing:start.
TYPING_TIMEOUT_SECS = 3.0


class TypingTracker:
    """Who is typing where, with a server-side auto-stop per (room, user).

    Example::

        typing = TypingTracker(hub)
        typing.start("general", user, conn_id)   # room gets user:typing once
    """

    def __init__(self, hub: Hub, timeout_secs: float = TYPING_TIMEOUT_SECS) -> None:
        self._hub = hub
        self._timeout = timeout_secs
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def start(self, room_id: str, user: dict[str, Any], conn_id: str) -> bool:
        key = (room_id, user["userId"])
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self._timeout, self._auto_stop, room_id, user, conn_id)
        if timer is None:
            self._hub.publish(Target.room(room_id), "user:typing", {"roomId": room_id, **user},
                              exclude=conn_id)  # fmt: skip
        return timer is None

    def stop(self, room_id: str, user: dict[str, Any], conn_id: str | None = None) -> bool:
        timer = self._timers.pop((room_id, user["userId"]), None)
        if timer is None:
            return False
        timer.cancel()
        self._hub.publish(
            Target.room(room_id), "user:stopped_typing", {"roomId": room_id, **user},
            exclude=conn_id,
        )  # fmt: skip
        return True

    def forget_room(self, room_id: str) -> None:
        """The room was deleted: drop its timers without announcing anything."""
        for key in [k for k in self._timers if k[0] == room_id]:
            self._timers.pop(key).cancel()

    def _auto_stop(self, room_id: str, user: dict[str, Any], conn_id: str | None = None) -> None:
        if self._timers.pop((room_id, user["userId"]), None) is not None:
            # Like typing:stop, it goes to the others, not to the typist's connection.
            self._hub.publish(
                Target.room(room_id), "user:stopped_typing", {"roomId": room_id, **user},
                exclude=conn_id,
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self._timers)
