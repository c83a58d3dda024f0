"""The quick fault case of bench/faults.py, asserted: Redis dies under traffic and returns.

Real processes (tests/support/cluster.py: redis-server, PostgreSQL, nodes
a and b); senders on both nodes retry with their clientMsgId, receivers on
both nodes repair holes with the client's own hole repair. While Redis is
gone, cross-node broadcasts are lost; every receiver keeps getting its own
node's messages, sees the holes and fetches them. The bar of issue 15: 0
lost, 0 holes, 0 duplicates after the client's de-duplication. The long
scenarios (kill -9, PostgreSQL, SIGTERM, 10 s outages) are
``python -m bench.faults``.
"""

from __future__ import annotations

import pytest

from bench.faults import run_scenario
from tests.support.services import require_binary

REDIS_TRAFFIC_SECS = 14.0

pytestmark = [pytest.mark.asyncio, pytest.mark.faults, pytest.mark.timeout(90)]


async def test_redis_outage_loses_nothing_and_leaves_no_hole() -> None:
    require_binary("redis-server", "redis-server is not installed")
    require_binary("initdb", "PostgreSQL (initdb/pg_ctl) is not installed")
    # A hole is only visible once a later message of the room arrives: the
    # traffic goes on well past the mirror's return (its reconnect backoff is
    # capped at 5 s), so the last messages cross nodes live again.
    result = await run_scenario(
        "redis", seconds=REDIS_TRAFFIC_SECS, rate=100.0, rooms=2, fault_at=1.0, outage=1.0
    )
    assert result.stats.acked, "no send was acked"
    assert result.stats.unacked == 0
    assert set(result.stats.errors) <= {"CONNECTION_LOST", "TIMEOUT"}
    assert result.lost == 0
    assert result.stored >= len(result.stats.acked)
    for receiver in result.receivers:
        assert receiver["connected"], receiver
        assert receiver["holes"] == 0, receiver
        assert receiver["dups"] == 0, receiver
        assert receiver["delivered"] == receiver["window"], receiver
    # The outage did cost live deliveries: the client's repair is what closed them.
    assert sum(receiver["repaired"] for receiver in result.receivers) > 0
