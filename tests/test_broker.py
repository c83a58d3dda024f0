"""Two real nodes in one process, clustered by a shared :class:`server.realtime.broker.MemoryBus`.

The hub-level behaviour of :class:`~server.realtime.broker.MemoryBroker` (interest,
echo, multi-target, control) is in tests/test_hub.py; here the whole chat
path runs on two nodes with one SQLite database, as a benchmark would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
from tornado.httpclient import AsyncHTTPClient

from server.app import Node
from server.realtime.broker import MemoryBroker, MemoryBus
from switchboard_client import Client
from tests.conftest import Gateway, make_config
from tests.support.client_checks import barrier, settle
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


async def publish(gw: Gateway, target: dict[str, Any], event: str) -> int:
    """``POST /api/v1/publish`` on ``gw`` as a service; the local ``delivered`` count."""
    response = await AsyncHTTPClient().fetch(
        gw.http + "/api/v1/publish", method="POST",
        headers={"Authorization": f"Bearer {gw.token('billing', ('service',))}"},
        body=orjson.dumps({"target": target, "event": event}),
    )  # fmt: skip
    delivered: int = orjson.loads(response.body)["delivered"]
    return delivered


async def got(clients: dict[str, Client], event: str) -> set[str]:
    """Who received ``event`` (once each): the in-process bus delivers synchronously,
    so a ping round trip on each client is the barrier."""
    names = set()
    for name, client in clients.items():
        await barrier(client)
        frames = client.drain_events(event)
        assert len(frames) <= 1, (name, frames)
        if frames:
            names.add(name)
    return names


async def test_a_role_target_reaches_the_roles_connections_on_both_nodes_once(pair):
    a, b = pair
    clients = {
        "mia_a": await a.connect("mia", roles=("user", "moderator")),
        "max_b": await b.connect("max", namespace="admin", roles=("moderator",)),
        "bob_b": await b.connect("bob"),
    }
    await settle(*clients.values())
    assert "role:moderator" in b.node.hub.broker.subscribed_channels()
    assert await publish(a, {"role": "moderator"}, "x:mods") == 1  # local count, as today
    assert await got(clients, "x:mods") == {"mia_a", "max_b"}
    assert await publish(a, {"role": "moderator", "namespace": "admin"}, "x:admins") == 0
    assert await got(clients, "x:admins") == {"max_b"}

    # Token refresh moves bob in and out of the role, on his node's index.
    bob = clients["bob_b"]
    await bob.emit("auth:refresh", {"token": b.token("bob", ("user", "moderator"))})
    assert await publish(a, {"role": "moderator"}, "x:mods") == 1
    assert await got(clients, "x:mods") == {"mia_a", "max_b", "bob_b"}
    await bob.emit("auth:refresh", {"token": b.token("bob", ("user",))})
    assert await publish(a, {"role": "moderator"}, "x:mods") == 1
    assert await got(clients, "x:mods") == {"mia_a", "max_b"}


async def test_a_node_hears_a_role_channel_only_while_it_has_a_connection_with_the_role(pair):
    _, b = pair
    bob = await b.connect("bob")
    assert "role:moderator" not in b.node.hub.broker.subscribed_channels()
    await bob.emit("auth:refresh", {"token": b.token("bob", ("user", "moderator"))})
    assert "role:moderator" in b.node.hub.broker.subscribed_channels()
    await bob.emit("auth:refresh", {"token": b.token("bob", ("user",))})
    assert "role:moderator" not in b.node.hub.broker.subscribed_channels()
    assert "role:user" in b.node.hub.broker.subscribed_channels()
