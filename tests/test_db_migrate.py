"""Migrations on a shared PostgreSQL database when several nodes start at once.

Real parts: the suite's throwaway PostgreSQL cluster, :class:`server.db.Database`
objects as the nodes build them, each with its own connection pool.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from server.db import Database

pytestmark = pytest.mark.asyncio


async def test_nodes_starting_together_migrate_a_fresh_database_once(postgres: Any) -> None:
    for attempt in range(3):
        url = postgres.create_database(f"t{os.urandom(6).hex()}")
        nodes = [Database(url, workers=2) for _ in range(4)]
        try:
            # Every node migrates at the same moment; none may fail.
            await asyncio.gather(*(node.start() for node in nodes))
            rows = await nodes[0].run_bare("check", applied_migrations, nodes[0])
            assert rows == ["0001_initial"], attempt
        finally:
            for node in nodes:
                await node.close()


def applied_migrations(node: Database) -> list[str]:
    cursor = node.db.execute_sql("SELECT name FROM schema_migration")  # type: ignore[no-untyped-call]
    return [name for (name,) in cursor.fetchall()]
