"""bench/db: the asyncio drivers its pwasyncio approaches install on first use."""

from __future__ import annotations

from bench.db import missing_drivers


def test_only_the_pwasyncio_approaches_need_drivers_and_only_those_not_importable() -> None:
    nothing = {"aiosqlite": None, "asyncpg": None}
    assert missing_drivers(["pool"], ["sqlite", "postgres"], nothing.get) == []
    assert missing_drivers(["pool", "pwasyncio"], ["sqlite"], nothing.get) == ["aiosqlite>=0.20"]
    assert missing_drivers(["pwasyncio-1run"], ["sqlite", "postgres"], nothing.get) == [
        "aiosqlite>=0.20",
        "asyncpg>=0.29",
    ]
    installed = {"aiosqlite": object(), "asyncpg": None}
    assert missing_drivers(["pwasyncio"], ["sqlite", "postgres"], installed.get) == [
        "asyncpg>=0.29"
    ]
