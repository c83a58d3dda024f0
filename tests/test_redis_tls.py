"""``SWITCHBOARD_REDIS_URL`` with TLS (``rediss://``) and a password.

Real parts: a redis-server started with ``requirepass`` and a TLS listener
(a throwaway self-signed certificate for 127.0.0.1, trusted through
``ssl_ca_certs`` in the URL), two gateway nodes sharing it and one
PostgreSQL database, real WebSocket clients.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.services import RedisServer, require_binary
from tests.test_health import until

pytestmark = pytest.mark.asyncio

DATABASE = "postgres"
PASSWORD = "s3cret-pa55"


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[RedisServer]:
    require_binary("redis-server", "redis-server is not installed")
    require_binary("openssl", "openssl is not installed (makes the test certificate)")
    with RedisServer(password=PASSWORD, tls=True) as server:
        yield server


async def wait_ready(gw: Any, want: str) -> dict[str, Any]:
    return await until(gw, "/health/ready", lambda status, body: body["status"] == want)


async def test_nodes_mirror_over_tls_with_a_password(
    gateway_factory: Callable[..., Any], postgres: Any, tls_redis: RedisServer
) -> None:
    assert tls_redis.tls_url.startswith(f"rediss://:{PASSWORD}@")
    db_url = postgres.create_database(f"t{os.urandom(6).hex()}")
    prefix = f"t{os.urandom(4).hex()}"
    a, b = [
        await gateway_factory(node_id=f"tls-{n}", database_url=db_url,
                              redis_url=tls_redis.tls_url, redis_prefix=prefix)
        for n in "ab"
    ]  # fmt: skip
    for gw in (a, b):
        body = await wait_ready(gw, "ready")
        assert body["checks"]["redis"] == "up"
    alice = await a.connect("alice")
    bob = await b.connect("bob")
    await alice.emit("room:create", {"roomId": "secure", "name": "secure"})
    for client in (alice, bob):
        await client.emit("room:join", {"roomId": "secure"})
    # Cluster state (presence) goes over the same TLS connection.
    statuses = await b.node.presence.statuses(["alice", "bob"])
    assert statuses == {"alice": "online", "bob": "online"}
    # Bob's join ack means node B's room subscription is confirmed: send now.
    sent = await alice.emit("message:send", {"roomId": "secure", "content": "over TLS"})
    frame = await bob.next_event("message:new", timeout=10)
    assert frame["data"]["message"]["seq"] == sent["message"]["seq"]
    assert frame["data"]["message"]["content"] == "over TLS"


async def test_a_wrong_password_degrades_the_node_without_breaking_it(
    gateway_factory: Callable[..., Any], tls_redis: RedisServer
) -> None:
    wrong = tls_redis.tls_url.replace(PASSWORD, "not-the-password")
    gw = await gateway_factory(node_id="tls-wrong", redis_url=wrong)
    body = await wait_ready(gw, "degraded")
    assert body["checks"] == {"database": "up", "redis": "down"}
    assert any(r.startswith("redis:") for r in body["reasons"]), body
    # Local delivery still works.
    alice = await gw.connect("alice")
    bob = await gw.connect("bob")
    await alice.emit("room:create", {"roomId": "local", "name": "local"})
    for client in (alice, bob):
        await client.emit("room:join", {"roomId": "local"})
    await alice.emit("message:send", {"roomId": "local", "content": "still here"})
    frame = await bob.next_event("message:new", timeout=10)
    assert frame["data"]["message"]["content"] == "still here"
