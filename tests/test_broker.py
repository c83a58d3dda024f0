"""Two real nodes in one process, clustered by a shared :class:`server.realtime.broker.MemoryBus`.

The hub-level behaviour of :class:`~server.realtime.broker.MemoryBroker` (interest,
echo, multi-target, control) is in tests/test_hub.py; here the whole chat
path runs on two nodes with one SQLite database, as a benchmark would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from server.app import Node
from server.realtime.broker import MemoryBroker, MemoryBus
from tests.conftest import Gateway, make_config
from tests.support.client_checks import settle
from tests.test_presence import join, make_room

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def pair(tmp_path: Any) -> AsyncIterator[tuple[Gateway, Gateway]]:
    bus = MemoryBus()
    database_url = f"sqlite:///{tmp_path}/shared.db"
    gateways = []
    for node_id in ("a", "b"):
        home = tmp_path / node_id
        home.mkdir()
        config = make_config(home, node_id=node_id, database_url=database_url)
        node = Node(config, broker=MemoryBroker(node_id, bus))
        await node.start()
        gateways.append(Gateway(node))
    a, b = gateways
    yield a, b
    for gw in (a, b):
        await gw.close_clients()
        await gw.node.stop(grace_secs=1.0)


async def test_a_message_sent_on_one_node_reaches_members_on_the_other_once(pair):
    a, b = pair
    alice, bob = await a.connect("alice"), await b.connect("bob")
    await make_room(alice, "general")
    await join(bob, "general")
    await settle(alice, bob)
    ack = await alice.emit("message:send", {"roomId": "general", "content": "hello b"})
    frame = await bob.next_event("message:new")
    assert frame["data"]["message"]["id"] == ack["message"]["id"]
    assert frame["data"]["message"]["content"] == "hello b"
    await settle(bob)  # a barrier: no second copy came
    assert bob.drain_events("message:new") == []
    assert alice.drain_events("message:new") == []  # the sender gets the ack, not an echo


async def test_a_kick_on_one_node_closes_the_users_connections_on_the_other(pair):
    a, b = pair
    admin = await a.connect("root", roles=("admin",), namespace="admin")
    mallory = await b.connect("mallory")
    await admin.emit("admin:kick", {"userId": "mallory", "reason": "spam"})
    kicked = await mallory.next_event("system:kicked")
    assert kicked["data"]["reason"] == "spam"
    assert await mallory.wait_closed() == (4403, "forbidden")
