"""``GET /websocket/stats``: admins see this node's real figures, secrets masked.

A real node, real WebSocket clients driving known traffic (connections in
two namespaces, a room, messages up to a rate limit, an unknown event, a
refused token), then the endpoint over real HTTP.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from switchboard_client import Client, ClientError, HandshakeError
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

SECRET = "stats-test-secret-0123456789abcdef-never-shown"
# Three messages a minute: the fourth is refused, a known rate-limit hit.
LIMITS = "messages=3/1m,joins=100/1m,typing=100/1m,other=1000/1m"


async def get_stats(gw: Any, token: str | None) -> tuple[int, dict[str, Any], str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    resp = await AsyncHTTPClient().fetch(
        f"{gw.http}/websocket/stats", headers=headers, raise_error=False, request_timeout=10
    )
    text = resp.body.decode()
    return resp.code, orjson.loads(text), text, resp.headers


async def test_admin_sees_figures_matching_real_activity(gateway_factory: Any) -> None:
    gw = await gateway_factory(jwt_secret=SECRET, rate_limits=LIMITS)
    alice = await gw.connect("alice")
    bob = await gw.connect("bob")
    await gw.connect("carol", "notifications")
    await alice.emit("room:create", {"roomId": "stats-a", "name": "Stats"})
    await alice.emit("room:join", {"roomId": "stats-a"})
    await bob.emit("room:join", {"roomId": "stats-a"})
    for i in range(3):
        await alice.emit("message:send", {"roomId": "stats-a", "content": f"m{i}"})
    with pytest.raises(ClientError) as info:
        await alice.emit("message:send", {"roomId": "stats-a", "content": "one too many"})
    assert info.value.code == "RATE_LIMITED"
    with pytest.raises(ClientError) as info:
        await bob.emit("nope:nothing", {})
    assert info.value.code == "UNKNOWN_EVENT"
    with pytest.raises((ClientError, HandshakeError)):
        await Client(gw.url("chat"), "not-a-token").connect()

    status, body, text, _ = await get_stats(gw, gw.token("root", ("admin",)))
    assert status == 200, body
    assert body["node"] == gw.config.node_id
    assert body["uptimeSeconds"] > 0
    connections = body["connections"]
    assert connections["total"] == 3
    assert connections["byNamespace"] == {"chat": 2, "notifications": 1}
    assert connections["uniqueUsers"] == 3
    assert connections["opened"] == {"chat": 2, "notifications": 1}
    assert connections["authFailuresByReason"] == {"unauthorized": 1}
    rooms = body["rooms"]
    assert (rooms["active"], rooms["subscriptions"]) == (1, 2)
    assert rooms["top"] == [{"roomId": "stats-a", "subscriptions": 2, "messagesPerMinute": 3}]
    assert body["messages"]["total"] == 3
    assert body["messages"]["perMinute"] == 3
    assert body["messages"]["perSecond"] == pytest.approx(0.3)
    assert body["rateLimitViolations"] == {"messages": 1, "joins": 0, "typing": 0, "other": 0}
    assert body["errorsByCode"] == {"RATE_LIMITED": 1, "UNKNOWN_EVENT": 1}
    assert body["slowConsumers"] == 0
    assert body["events"]["total"] >= 7
    # Both refusals were the clients' doing: no server failure to report.
    assert body["events"]["errorRate"] == 0
    assert body["events"]["clientErrorRate"] == pytest.approx(2 / body["events"]["total"], abs=1e-4)
    assert body["eventLoopLagMs"] >= 0
    assert body["memoryBytes"] > 10 * 1024 * 1024
    config = body["config"]
    assert config["jwt_secret"] == "***"
    assert config["rate_limits"]["messages"] == "3/60s"
    assert config["node_id"] == gw.config.node_id
    assert SECRET not in text

    # A connection closing shows up at once, with its reason.
    bob.close()
    await bob.wait_closed()
    async def two_left() -> dict[str, Any] | None:
        _, body, _, _ = await get_stats(gw, gw.token("root", ("admin",)))
        return body if body["connections"]["total"] == 2 else None

    body = await eventually(two_left, what="the close counted")
    assert body["connections"]["byNamespace"] == {"chat": 1, "notifications": 1}
    assert body["connections"]["closedByReason"] == {"client": 1}
    assert body["rooms"]["subscriptions"] == 1


async def test_non_admin_is_forbidden(gateway_factory: Any) -> None:
    gw = await gateway_factory(jwt_secret=SECRET)
    for roles in (("user",), ("moderator", "logs")):
        status, body, text, _ = await get_stats(gw, gw.token("mallory", roles))
        assert status == 403
        assert body["error"]["code"] == "FORBIDDEN"
        assert SECRET not in text


async def test_missing_or_bad_token_is_unauthorized(gateway_factory: Any) -> None:
    gw = await gateway_factory(jwt_secret=SECRET)
    for token in (None, "not-a-token", gw.token("root", ("admin",), ttl_secs=-10)):
        status, body, text, headers = await get_stats(gw, token)
        assert status == 401, token
        assert body["error"]["code"] in ("UNAUTHORIZED", "TOKEN_EXPIRED")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert SECRET not in text
