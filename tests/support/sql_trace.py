"""What SQL a node's SQLite writer runs: :func:`writer_statements`.

For checks about the statements a job costs (how many, which), seen through
sqlite3's own trace callback on the writer's connection: the node's code
runs unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


@asynccontextmanager
async def writer_statements(gw: Any) -> AsyncIterator[list[str]]:
    """Every statement the node's writer (SQLite) runs inside the block, in order.

    The trace is set and cleared by jobs on the writer itself, so the list
    holds exactly the jobs queued in between; a job the block started must
    be awaited (or queued) before the block ends.
    """
    statements: list[str] = []
    db = gw.node.db

    def trace(on: bool) -> None:  # the writer's connection, on its thread
        db.db.connection().set_trace_callback(statements.append if on else None)

    await db.run_bare("test.trace", trace, True)
    try:
        yield statements
    finally:
        await db.run_bare("test.trace", trace, False)
