"""``server/services/connection_list.py``: listings gathered over the control bus.

Two nodes of one process (hubs whose memory brokers share a bus, as in
tests/test_broker.py) and a presence twin that names the live nodes. The
end-to-end listings (real handlers, real Redis) are in test_admin.py,
test_websocket_stats.py and test_cluster.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from server.realtime.broker import MemoryBroker, MemoryBus
from server.realtime.hub import Hub
from server.realtime.presence import Presence
from server.services.connection_list import ConnectionList, clean_user_agent
from tests.test_hub import FakeConn

pytestmark = pytest.mark.asyncio


class Conn(FakeConn):
    """A hub connection that describes itself, as the gateway handlers do."""

    def describe(self) -> dict[str, Any]:
        return {"connectionId": self.conn_id, "userId": self.user_id, "ip": "192.0.2.1"}


class LiveNodes(Presence):
    """Presence whose registry lists ``ids`` as the live nodes."""

    def __init__(self, node_id: str, ids: list[str]) -> None:
        super().__init__(node_id)
        self.ids = ids

    async def nodes(self) -> list[dict[str, Any]]:
        return [{"id": n, "self": n == self.node_id} for n in self.ids]


def two_nodes(live: list[str], timeout_secs: float = 5.0) -> tuple[ConnectionList, Hub, Hub]:
    bus = MemoryBus()
    a, b = Hub("a", broker=MemoryBroker("a", bus)), Hub("b", broker=MemoryBroker("b", bus))
    listing = ConnectionList(a, LiveNodes("a", live), timeout_secs=timeout_secs)
    ConnectionList(b, LiveNodes("b", live))
    for hub, ids in ((a, ["01", "04", "05"]), (b, ["02", "03"])):
        for conn_id in ids:
            hub.add(Conn(conn_id, f"user-{conn_id}"))
    return listing, a, b


async def test_pages_walk_both_nodes_in_connection_id_order() -> None:
    listing, _, _ = two_nodes(["a", "b"])
    seen, after = [], None
    while True:
        page = await listing.page(2, after)
        assert page.total == 5 and page.missing_nodes == []
        seen += [(c["connectionId"], c["node"]) for c in page.connections]
        if not page.more:
            break
        after = page.connections[-1]["connectionId"]
    assert seen == [("01", "a"), ("02", "b"), ("03", "b"), ("04", "a"), ("05", "a")]


async def test_of_users_asks_the_nodes_holding_them() -> None:
    listing, _, _ = two_nodes(["a", "b"])
    found = await listing.of_users(["user-03", "user-04", "nobody"], nodes={"a", "b"})
    assert [(c["userId"], c["node"], c["ip"]) for c in found.connections] == [
        ("user-03", "b", "192.0.2.1"), ("user-04", "a", "192.0.2.1"),
    ]  # fmt: skip


async def test_a_node_that_does_not_answer_is_named_after_the_timeout() -> None:
    listing, _, _ = two_nodes(["a", "b", "ghost"], timeout_secs=0.2)
    page = await listing.page(10, None)
    assert page.missing_nodes == ["ghost"]
    assert [c["connectionId"] for c in page.connections] == ["01", "02", "03", "04", "05"]
    assert listing.hub.broker._asking == {}  # nothing left waiting


async def test_user_agents_are_printable_and_bounded() -> None:
    assert clean_user_agent(None) == ""
    assert clean_user_agent("a\tb\x00c\x85d\x7f") == "abcd"
    assert clean_user_agent("\x01" * 10_000 + "ok") == ""  # bounded before cleaning
    assert len(clean_user_agent("é" * 1000)) == 256
