"""server/store/db.py with PostgreSQL gone: every surface answers a retryable SERVICE_UNAVAILABLE.

``Database.run`` turns the driver's connection errors into
``errors.DatabaseUnavailable``, so a client can tell an outage (retry later)
from a bug (``INTERNAL_ERROR``), and the log holds WARNING lines, not
tracebacks. Once PostgreSQL is back the pool hands out fresh connections and
the same requests succeed, with no restart of the node.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from switchboard_client import ClientError
from tests.test_chat import join, room, send

pytestmark = pytest.mark.asyncio

UNAVAILABLE = ("SERVICE_UNAVAILABLE", {"retryable": True})


async def history(gw: Any, token: str) -> tuple[int, dict[str, Any]]:
    request = HTTPRequest(
        f"{gw.http}/api/v1/rooms/general/messages?limit=10",
        headers={"Authorization": f"Bearer {token}"},
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, orjson.loads(response.body)


async def failure(call: Any) -> tuple[str, dict[str, Any]]:
    with pytest.raises(ClientError) as info:
        await call
    return info.value.code, info.value.details


async def test_a_database_outage_is_service_unavailable_on_every_surface(
    gateway_factory,
    own_postgres,
    caplog,
):
    gw = await gateway_factory(database_url=own_postgres.create_database("outage"))
    alice, bob = await gw.connect("alice"), await gw.connect("bob")
    await room(alice, "general")
    await join(bob, "general")
    await send(alice, "general", "before")
    token = gw.token("alice")
    assert (await history(gw, token))[0] == 200

    caplog.set_level(logging.WARNING)
    caplog.clear()
    await asyncio.to_thread(own_postgres.kill)
    assert await failure(alice.emit("room:get_messages", {"roomId": "general"})) == UNAVAILABLE
    assert await failure(bob.emit("room:leave", {"roomId": "general"})) == UNAVAILABLE
    assert await failure(alice.emit("room:list", {})) == UNAVAILABLE
    assert await failure(
        alice.emit("message:send", {"roomId": "general", "content": "lost"})
    ) == UNAVAILABLE  # fmt: skip
    status, body = await history(gw, token)
    assert status == 503 and body["error"]["code"] == "SERVICE_UNAVAILABLE"
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors_logged == []
    assert any("the database is unavailable" in r.getMessage() for r in caplog.records)

    await asyncio.to_thread(own_postgres.start)
    page = await alice.emit("room:get_messages", {"roomId": "general"})
    assert [m["content"] for m in page["messages"]] == ["before"]
    assert (await send(alice, "general", "after"))["seq"] == 2
    assert (await history(gw, token))[0] == 200
    # The outage was the server's failure: it counts in health's error rate.
    response = await AsyncHTTPClient().fetch(f"{gw.http}/health/websocket")
    health = orjson.loads(response.body)
    assert health["metrics"]["errorRate"] > 0.05 and health["metrics"]["clientErrorRate"] == 0
    assert health["status"] == "degraded"
    assert any("error rate" in reason for reason in health["reasons"])
