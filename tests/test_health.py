"""Health endpoints follow the real database and Redis: down, then back.

Each test starts its own PostgreSQL or Redis server (not the session's
shared one, which other tests keep using), points a node at it, stops the
server and watches ``/health/ready`` and ``/health/websocket`` flip, then
starts it again and watches them recover.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from server.ops.health import RedisPing
from tests.support.services import PostgresServer, RedisServer, require_binary
from tests.support.waiting import eventually
from tests.test_chat import error

pytestmark = pytest.mark.asyncio

#: A restarted PostgreSQL or Redis plus the node's reconnect backoff fit in this.
HEALTH_CHANGE_SECS = 20.0


async def get(gw: Any, path: str) -> tuple[int, dict[str, Any]]:
    resp = await AsyncHTTPClient().fetch(f"{gw.http}{path}", raise_error=False, request_timeout=10)
    return resp.code, orjson.loads(resp.body)


async def until(gw: Any, path: str, want: Callable[[int, dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll ``path`` until ``want(status, body)``; return the body."""

    async def check() -> dict[str, Any] | None:
        status, body = await get(gw, path)
        return body if want(status, body) else None

    body: dict[str, Any] = await eventually(
        check, timeout=HEALTH_CHANGE_SECS, interval=0.1, what=f"{path} as wanted"
    )
    return body


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    require_binary("redis-server", "redis-server is not installed")
    with RedisServer() as server:
        yield server


async def test_liveness_answers(gateway: Any) -> None:
    status, body = await get(gateway, "/health")
    assert status == 200 and body == {"status": "ok", "node": gateway.config.node_id}


async def test_ready_and_healthy_on_sqlite_without_redis(gateway: Any) -> None:
    status, body = await get(gateway, "/health/ready")
    assert status == 200
    assert body["checks"] == {"database": "up", "redis": "disabled"}
    status, body = await get(gateway, "/health/websocket")
    assert status == 200 and body["status"] == "healthy"
    assert body["services"] == {"database": "up", "redis": "disabled", "websocket": "up"}


async def test_seed_path_answers_as_health_websocket(gateway: Any) -> None:
    # Seed 003 polls /websocket/health: the same document, not a 404.
    answers = [await get(gateway, path) for path in ("/health/websocket", "/websocket/health")]
    for status, body in answers:
        assert status == 200 and body["status"] == "healthy" and body["reasons"] == []
    (_, ours), (_, seeds) = answers
    assert set(seeds) == set(ours) and set(seeds["metrics"]) == set(ours["metrics"])
    assert seeds["services"] == ours["services"]


async def test_client_errors_leave_health_healthy(gateway: Any) -> None:
    noisy = await gateway.connect("noisy")
    for _ in range(10):
        await error(noisy, "no:such", {}, "UNKNOWN_EVENT")
        await error(noisy, "room:get_messages", {"roomId": "bad id"}, "VALIDATION_ERROR")
    for path in ("/health/websocket", "/websocket/health"):
        status, body = await get(gateway, path)
        assert status == 200 and body["status"] == "healthy" and body["reasons"] == []
        assert body["metrics"]["errorRate"] == 0
        assert body["metrics"]["clientErrorRate"] > 0.9  # 20 of the 20 events


async def test_database_down_then_back(
    gateway_factory: Callable[..., Any], own_postgres: PostgresServer
) -> None:
    url = await asyncio.to_thread(own_postgres.create_database, "health")
    gw = await gateway_factory(database_url=url)
    await gw.connect("alice")
    status, body = await get(gw, "/health/ready")
    assert status == 200 and body["checks"]["database"] == "up"

    await asyncio.to_thread(own_postgres.kill)
    body = await until(gw, "/health/ready", lambda s, b: s == 503)
    assert body["status"] == "not_ready"
    assert body["checks"]["database"] == "down"
    assert "database unreachable" in body["reasons"]
    status, health = await get(gw, "/health/websocket")
    assert status == 503 and health["status"] == "unhealthy"
    assert (await get(gw, "/websocket/health"))[0] == 503
    assert health["services"]["database"] == "down"
    assert health["metrics"]["activeConnections"] == 1
    # Liveness is about the process, not its dependencies.
    assert (await get(gw, "/health"))[0] == 200

    await asyncio.to_thread(own_postgres.restart)
    body = await until(gw, "/health/ready", lambda s, b: s == 200)
    assert body["checks"]["database"] == "up" and body["reasons"] == []
    await until(gw, "/health/websocket", lambda s, b: b["status"] == "healthy")


async def test_redis_down_then_back(
    gateway_factory: Callable[..., Any], own_redis: RedisServer
) -> None:
    gw = await gateway_factory(redis_url=own_redis.url)
    status, body = await get(gw, "/health/ready")
    assert status == 200 and body["checks"] == {"database": "up", "redis": "up"}

    await asyncio.to_thread(own_redis.kill)
    # Still serving its own clients: stays in service, degraded with the reason.
    body = await until(gw, "/health/ready", lambda s, b: b["status"] == "degraded")
    status, _ = await get(gw, "/health/ready")
    assert status == 200
    assert body["checks"]["redis"] == "down"
    assert any(r.startswith("redis:") for r in body["reasons"])
    # Without Redis a node still serves its own clients: degraded, not unhealthy.
    status, health = await get(gw, "/health/websocket")
    assert status == 200 and health["status"] == "degraded"
    assert health["services"]["redis"] == "down"

    await asyncio.to_thread(own_redis.start)
    body = await until(gw, "/health/ready", lambda s, b: b["status"] == "ready")
    assert body["checks"]["redis"] == "up"
    await until(gw, "/health/websocket", lambda s, b: b["status"] == "healthy")


async def test_redis_ping_reports_why(own_redis: RedisServer) -> None:
    ping = RedisPing(own_redis.url, timeout_secs=1.0)
    try:
        assert await ping() == (True, None)
        await asyncio.to_thread(own_redis.kill)
        ok, why = await ping()
        assert not ok and why
    finally:
        await ping.close()
