"""The tail of send->ack: SQLite's WAL checkpoints off the commit path, the startup heap frozen.

With WAL, a commit appends to the ``-wal`` file; the database file itself
changes only when a checkpoint copies those pages into it. The node's writer
connection never checkpoints (``wal_autocheckpoint`` 0: a commit crossing
the 1,000-page mark would otherwise pay for the copy and an fsync, the tail
of send->ack); the :class:`~server.store.db.Checkpointer` does, on its own
connection, so the database file grows while the node writes.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
from typing import Any

import pytest

from server.cli import freeze_startup_heap
from server.store.db import Checkpointer
from tests.support.waiting import eventually
from tests.test_chat import room, send


def size_of(path: str) -> int:
    """The database file's size (a stat: not worth a thread in a test)."""
    return os.stat(path).st_size


@pytest.mark.asyncio
async def test_the_writer_leaves_checkpoints_to_the_checkpointer_thread(gateway: Any) -> None:
    db = gateway.node.db
    path = db.db.database

    def autocheckpoint() -> int:
        value: int = db.db.execute_sql("PRAGMA wal_autocheckpoint").fetchone()[0]
        return value

    assert await db.run_bare("test.autocheckpoint", autocheckpoint) == 0
    owner = await gateway.connect("owner")
    await room(owner, "big")
    before = size_of(path)
    # ~100 pages of messages: well under the 1,000 pages at which a commit
    # would checkpoint, so only the checkpointer can move them into the file.
    await asyncio.gather(*(send(owner, "big", "x" * 4000) for _ in range(100)))
    await eventually(lambda: size_of(path) > before + 100 * 4000, timeout=15.0)
    # Counted just after the checkpoint returns: the file may grow first.
    await eventually(lambda: db.checkpointer.runs > 0)


@pytest.mark.asyncio
async def test_the_checkpointer_stops_with_the_database(gateway: Any) -> None:
    checkpointer = gateway.node.db.checkpointer
    assert checkpointer is not None and checkpointer.started
    await gateway.node.db.close()
    assert not checkpointer.alive


def test_the_startup_heap_is_frozen_out_of_the_collectors_sight() -> None:
    gc.unfreeze()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_wal_past_its_bound_is_truncated(tmp_path: Any) -> None:
    """Writes that never pause would keep the WAL from restarting: past the bound it is cut."""
    path = str(tmp_path / "wal.db")
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = wal")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (x BLOB)")
    with conn:
        conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 50)
    wal = path + "-wal"
    assert size_of(wal) > 50 * 4000
    truncated = threading.Event()

    def truncate() -> None:  # the writer's own thread, in the node
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        truncated.set()

    checkpointer = Checkpointer(path, truncate, interval_secs=0.01, truncate_pages=10)
    checkpointer.start()
    try:
        assert truncated.wait(5.0)
        assert size_of(wal) == 0
    finally:
        checkpointer.stop()
        conn.close()
