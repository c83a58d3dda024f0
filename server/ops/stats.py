"""Sliding-window activity counters for health and the admin dashboard.

Prometheus counters are cumulative; health and ``metrics:update`` need
"per second over the last few seconds", which these keep in one-second slots.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

# How many recent event-handling durations p50/p95 are computed from: enough
# for stable percentiles, small enough to sort on every metrics tick.
LATENCY_SAMPLES = 2048


class EventRate:
    """Counts events in one-second slots over the last ``window_secs`` seconds."""

    def __init__(self, window_secs: int = 60) -> None:
        self._window = window_secs
        self._slots = [0] * window_secs
        self._slot_second = [0] * window_secs
        self.total = 0

    def add(self, n: int = 1, now: float | None = None) -> None:
        second = int(now if now is not None else time.time())
        i = second % self._window
        if self._slot_second[i] != second:
            self._slot_second[i] = second
            self._slots[i] = 0
        self._slots[i] += n
        self.total += n

    def count(self, secs: int, now: float | None = None) -> int:
        """Events in the last ``secs`` complete seconds plus the current one."""
        second = int(now if now is not None else time.time())
        low = second - min(secs, self._window - 1)
        return sum(
            n for n, s in zip(self._slots, self._slot_second, strict=True) if low <= s <= second
        )

    def per_second(self, now: float | None = None) -> float:
        """Average rate over the last 10 seconds."""
        return self.count(10, now) / 10.0


class LatencyReservoir:
    """The last ``size`` durations (seconds), for cheap percentiles.

    Example::

        latency.add(0.002)
        latency.percentile(95)  # seconds, or 0.0 before any sample
    """

    def __init__(self, size: int = LATENCY_SAMPLES) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, secs: float) -> None:
        self._samples.append(secs)

    def __len__(self) -> int:
        return len(self._samples)

    def percentiles(self, *ps: float) -> list[float]:
        """Nearest-rank percentiles (0-100) of the samples held, in seconds."""
        ordered = sorted(self._samples)
        if not ordered:
            return [0.0 for _ in ps]
        last = len(ordered) - 1
        return [ordered[min(last, max(0, math.ceil(p / 100 * len(ordered)) - 1))] for p in ps]


# The per-room message rate is over this window; a room idle for longer
# drops its counter slots (its peak and last activity stay).
ROOM_RATE_WINDOW_SECS = 60


@dataclass
class RoomActivity:
    """One room's activity as seen by this node."""

    messages: EventRate | None = None
    peak_users: int = 0
    last_activity: float = 0.0

    def per_minute(self, now: float) -> int:
        if self.messages is None:
            return 0
        if now - self.last_activity >= ROOM_RATE_WINDOW_SECS:
            self.messages = None  # idle: free the slots
            return 0
        return self.messages.count(ROOM_RATE_WINDOW_SECS - 1, now)


class RoomStats:
    """Per-room message rate, peak local users and last activity (this node).

    Chat calls :meth:`message` per stored message and :meth:`users` when a
    room's local user count may have grown; both are O(1). Reading the
    busiest rooms costs a window sum only for rooms active in the last minute.
    """

    def __init__(self) -> None:
        self._rooms: dict[str, RoomActivity] = {}

    def _room(self, room_id: str) -> RoomActivity:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = RoomActivity()
        return room

    def message(self, room_id: str, now: float | None = None) -> None:
        now = now if now is not None else time.time()
        room = self._room(room_id)
        if room.messages is None:
            room.messages = EventRate(ROOM_RATE_WINDOW_SECS)
        room.messages.add(1, now)
        room.last_activity = now

    def users(self, room_id: str, count: int) -> None:
        room = self._room(room_id)
        if count > room.peak_users:
            room.peak_users = count

    def get(self, room_id: str) -> RoomActivity | None:
        return self._rooms.get(room_id)

    def per_minute(self, room_id: str, now: float | None = None) -> int:
        room = self._rooms.get(room_id)
        return room.per_minute(now if now is not None else time.time()) if room else 0

    def busiest(self, n: int, now: float | None = None) -> list[tuple[str, int]]:
        """The ``n`` rooms with the most messages in the last minute (rate > 0)."""
        now = now if now is not None else time.time()
        rates = [
            (room_id, room.per_minute(now))
            for room_id, room in self._rooms.items()
            if room.messages is not None
        ]
        return sorted((x for x in rates if x[1] > 0), key=lambda x: (-x[1], x[0]))[:n]

    def forget(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)

    def __len__(self) -> int:
        return len(self._rooms)


class Stats:
    """The node's recent activity: events handled, errors answered, messages stored.

    Errors are kept apart by whose fault they are. A server failure (status
    500 and up: an internal error, the database or Redis unavailable, a
    timeout) is what health acts on; a client's mistake (an unknown event,
    invalid data, a refusal: status 4xx) says nothing about the node, so it
    only gets its own figure, lest one noisy client mark the node degraded.

    Example::

        stats.events.add()
        stats.error(errors.ValidationFailed.status)  # a client error
        stats.error_ratio()  # server failures per event, 0.0 here
    """

    def __init__(self) -> None:
        self.events = EventRate()
        self.server_errors = EventRate()
        self.client_errors = EventRate()
        self.messages = EventRate()
        self.latency = LatencyReservoir()
        self.rooms = RoomStats()

    def error(self, status: int) -> None:
        """Count one error answered with HTTP-style ``status`` (500+: the server's)."""
        (self.server_errors if status >= 500 else self.client_errors).add()

    def error_ratio(self, secs: int = 60) -> float:
        """Server failures per event handled over the last ``secs`` seconds."""
        return self._ratio(self.server_errors, secs)

    def client_error_ratio(self, secs: int = 60) -> float:
        """Client errors per event handled over the last ``secs`` seconds."""
        return self._ratio(self.client_errors, secs)

    def _ratio(self, errors: EventRate, secs: int) -> float:
        events = self.events.count(secs)
        return errors.count(secs) / events if events else 0.0
