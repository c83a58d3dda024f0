"""``server/ops/stats.py``: sliding windows, the latency reservoir, per-room activity."""

from __future__ import annotations

import pytest

from server.core import errors
from server.ops.stats import EventRate, LatencyReservoir, RoomStats, Stats


def test_percentiles_are_nearest_rank_over_the_last_samples():
    latency = LatencyReservoir(size=100)
    assert latency.percentiles(50, 95) == [0.0, 0.0]
    for ms in range(1, 101):
        latency.add(ms / 1000)
    assert latency.percentiles(50, 95, 100) == pytest.approx([0.050, 0.095, 0.100])
    # Only the newest ``size`` samples count: older slow ones fall out.
    for _ in range(100):
        latency.add(0.001)
    assert latency.percentiles(50, 95) == [0.001, 0.001]
    assert len(latency) == 100


def test_room_stats_rates_peaks_and_forgetting():
    rooms = RoomStats()
    t0 = 1_000_000.0
    for i in range(5):
        rooms.message("general", t0 + i)
    rooms.message("quiet", t0)
    assert rooms.per_minute("general", t0 + 10) == 5
    assert rooms.busiest(1, t0 + 10) == [("general", 5)]
    # A minute later the window has moved on.
    assert rooms.per_minute("general", t0 + 70) == 0
    assert rooms.busiest(5, t0 + 70) == []
    rooms.users("general", 3)
    rooms.users("general", 2)
    activity = rooms.get("general")
    assert activity is not None
    assert (activity.peak_users, activity.last_activity) == (3, t0 + 4)
    rooms.forget("general")
    assert rooms.get("general") is None and rooms.per_minute("general") == 0
    assert len(rooms) == 1


def test_event_rate_window():
    rate = EventRate(60)
    rate.add(3, now=100.0)
    rate.add(2, now=130.5)
    assert rate.count(59, now=131.0) == 5
    assert rate.count(59, now=170.0) == 2
    assert rate.total == 5


def test_idle_rooms_drop_their_counters_but_keep_peaks():
    rooms = RoomStats()
    rooms.message("general", 1000.0)
    rooms.users("general", 4)
    assert rooms.busiest(5, 1030.0) == [("general", 1)]
    assert rooms.busiest(5, 1061.0) == []
    activity = rooms.get("general")
    assert activity is not None
    assert activity.messages is None and activity.peak_users == 4
    rooms.message("general", 1100.0)
    assert rooms.per_minute("general", 1100.5) == 1


def test_errors_split_into_server_failures_and_client_mistakes():
    stats = Stats()
    assert (stats.error_ratio(), stats.client_error_ratio()) == (0.0, 0.0)  # no events yet
    for _ in range(10):
        stats.events.add()
    for status in (400, 403, 404, 429):  # the client's doing: not the node's health
        stats.error(status)
    stats.error(errors.InternalError.status)
    stats.error(errors.DatabaseUnavailable.status)
    assert stats.error_ratio() == pytest.approx(0.2)
    assert stats.client_error_ratio() == pytest.approx(0.4)
