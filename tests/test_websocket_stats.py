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


async def get_page(gw: Any, query: str = "") -> tuple[int, dict[str, Any]]:
    status, body, _, _ = await get_stats_at(gw, gw.token("root", ("admin",)), query)
    return status, body


async def get_stats_at(gw: Any, token: str, query: str) -> tuple[int, dict[str, Any], str, Any]:
    resp = await AsyncHTTPClient().fetch(
        f"{gw.http}/websocket/stats{query}",
        headers={"Authorization": f"Bearer {token}"},
        raise_error=False,
        request_timeout=10,
    )
    text = resp.body.decode()
    return resp.code, orjson.loads(text), text, resp.headers


async def test_admin_pages_through_every_connection_with_its_details(
    gateway_factory: Any,
) -> None:
    gw = await gateway_factory(jwt_secret=SECRET, trusted_proxies="127.0.0.1/32")
    alice = await gw.connect(
        "alice", headers={"X-Forwarded-For": "198.51.100.23", "User-Agent": "alice-phone/1.0"}
    )
    await gw.connect("bob")
    await gw.connect("carol", "notifications")
    ids = {c.conn_id for c in gw.node.hub.connections.values()}

    seen: list[dict[str, Any]] = []
    query = "?limit=2"
    while True:
        status, body = await get_page(gw, query)
        assert status == 200, body
        page = body["connections"]["list"]
        assert page["total"] == 3 and page["missingNodes"] == []
        assert len(page["items"]) <= 2
        seen += page["items"]
        if page["next"] is None:
            break
        query = f"?limit=2&after={page['next']}"
    assert [c["connectionId"] for c in seen] == sorted(ids)
    (mine,) = [c for c in seen if c["connectionId"] == alice.welcome["connectionId"]]
    assert (mine["userId"], mine["namespace"], mine["node"]) == ("alice", "chat", gw.config.node_id)
    assert (mine["ip"], mine["userAgent"]) == ("198.51.100.23", "alice-phone/1.0")
    assert {c["namespace"] for c in seen} == {"chat", "notifications"}

    # Counters follow the traffic.
    await alice.emit("system:ping", {})
    await alice.emit("system:ping", {})
    _, body = await get_page(gw)
    (now,) = [
        c for c in body["connections"]["list"]["items"] if c["connectionId"] == mine["connectionId"]
    ]
    assert now["framesIn"] == mine["framesIn"] + 2
    assert now["framesOut"] >= mine["framesOut"] + 2
    assert now["bytesIn"] > mine["bytesIn"] and now["bytesOut"] > mine["bytesOut"]


@pytest.mark.parametrize(
    ("query", "field"),
    [("?limit=0", "limit"), ("?limit=501", "limit"), ("?limit=x", "limit"),
     ("?after=" + "f" * 65, "after"), ("?offset=3", "offset")],
)  # fmt: skip
async def test_connection_page_is_bounded(gateway_factory: Any, query: str, field: str) -> None:
    gw = await gateway_factory(jwt_secret=SECRET)
    status, body = await get_page(gw, query)
    assert status == 400, body
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert list(body["error"]["details"]) == [field]


async def test_non_admin_sees_no_connection_details(gateway_factory: Any) -> None:
    gw = await gateway_factory(jwt_secret=SECRET, trusted_proxies="127.0.0.1/32")
    victim = await gw.connect(
        "victim", headers={"X-Forwarded-For": "192.0.2.99", "User-Agent": "victim-agent"}
    )
    for roles in (("user",), ("moderator",)):
        status, body, text, _ = await get_stats_at(gw, gw.token("mallory", roles), "?limit=5")
        assert (status, body["error"]["code"]) == (403, "FORBIDDEN")
        for secret in ("192.0.2.99", "victim-agent", victim.welcome["connectionId"]):
            assert secret not in text
