"""Sliding-window activity counters for health and the admin dashboard.

Prometheus counters are cumulative; health and ``metrics:update`` need
"per second over the last few seconds", which these keep in one-second slots.
"""

from __future__ import annotations

import time


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


class Stats:
    """The node's recent activity: events handled, errors answered, messages stored."""

    def __init__(self) -> None:
        self.events = EventRate()
        self.errors = EventRate()
        self.messages = EventRate()

    def error_ratio(self, secs: int = 60) -> float:
        events = self.events.count(secs)
        return self.errors.count(secs) / events if events else 0.0
