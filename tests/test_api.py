"""The REST API under ``/api/v1``, over real HTTP against a real node.

Requests go through tornado's ``AsyncHTTPClient``; live effects are watched
on real WebSocket clients, so REST and socket views are checked together.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from models import Ban, utcnow
from switchboard_client import Client
from tests.conftest import ROOMY_RATE_LIMITS
from tests.support.client_checks import assert_no_event

pytestmark = pytest.mark.asyncio


# -- helpers ------------------------------------------------------------------


async def call(
    gw: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    user: str = "bob",
    roles: tuple[str, ...] = ("user",),
    token: str | None = None,
    auth: bool = True,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], Any]:
    """One request; returns (status, JSON body, response)."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {token or gw.token(user, roles)}"
    payload = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    if payload is None and method in ("POST", "PUT"):
        payload = b""
    response = await AsyncHTTPClient().fetch(
        gw.http + path, method=method, headers=headers, body=payload, raise_error=False,
        allow_nonstandard_methods=True,
    )  # fmt: skip
    return response.code, orjson.loads(response.body), response


async def ok(gw: Any, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
    status, data, _ = await call(gw, method, path, body, **kw)
    assert status in (200, 201), (status, data)
    return data


async def fails(
    gw: Any, method: str, path: str, status: int, code: str, body: Any = None, **kw: Any
) -> dict[str, Any]:
    got, data, _ = await call(gw, method, path, body, **kw)
    assert (got, data["error"]["code"]) == (status, code), data
    assert set(data["error"]) == {"code", "message", "details"}
    details: dict[str, Any] = data["error"]["details"]
    return details


async def inbox(gw: Any, user: str) -> Client:
    client = await gw.connect(user, namespace="notifications")
    await client.next_event("notification:recent")
    client.drain_events()
    return client


async def notify(gw: Any, user: str, title: str = "Hello") -> dict[str, Any]:
    [made] = await gw.node.notifications.notify([user], title=title)
    return dict(made)


SERVICE = {"user": "billing", "roles": ("service",)}


# -- auth and errors ----------------------------------------------------------


async def test_missing_or_bad_token_is_401_json(gateway):
    _, _, response = await call(gateway, "GET", "/api/v1/notifications", auth=False)
    assert response.code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    await fails(gateway, "GET", "/api/v1/notifications", 401, "UNAUTHORIZED", auth=False)
    await fails(gateway, "GET", "/api/v1/notifications", 401, "UNAUTHORIZED", token="nope")
    expired = gateway.token("bob", ttl_secs=-10)
    await fails(gateway, "GET", "/api/v1/notifications/unread/count", 401, "TOKEN_EXPIRED",
                token=expired)  # fmt: skip


async def test_body_must_be_json_and_small(gateway_factory):
    gw = await gateway_factory(max_message_bytes=1024)
    await fails(gw, "POST", "/api/v1/publish", 400, "BAD_REQUEST", raw=b"{not json", **SERVICE)
    big = {"target": {"all": True}, "event": "x:y", "data": {"blob": "x" * 2000}}
    details = await fails(gw, "POST", "/api/v1/publish", 413, "PAYLOAD_TOO_LARGE", big, **SERVICE)
    assert details["limit"] == 1024


async def test_rate_limited_is_429_with_retry_after(gateway_factory):
    gw = await gateway_factory(rate_limits="other=2/1m")
    for _ in range(2):
        await ok(gw, "GET", "/api/v1/notifications/unread/count")
    status, data, response = await call(gw, "GET", "/api/v1/notifications/unread/count")
    assert (status, data["error"]["code"]) == (429, "RATE_LIMITED")
    assert data["error"]["details"]["limit"] == 2
    assert int(response.headers["Retry-After"]) >= 1
    await ok(gw, "GET", "/api/v1/notifications/unread/count", user="carol")


async def test_shutting_down_is_503(gateway):
    gateway.node.state.shutting_down = True
    try:
        await fails(gateway, "GET", "/api/v1/notifications", 503, "SERVICE_UNAVAILABLE")
    finally:
        gateway.node.state.shutting_down = False


# -- bans -----------------------------------------------------------------------


async def production(gateway_factory: Any) -> Any:
    return await gateway_factory(
        env="production", jwt_secret="x" * 40, allowed_origins="http://app.test",
        rate_limits=ROOMY_RATE_LIMITS,
    )  # fmt: skip


# One user id, every role an endpoint may ask for: the ban is the user's, not the token's.
MALLORY = {"user": "mallory", "roles": ("user", "admin", "logs", "service")}


def every_endpoint(notification_id: str) -> list[tuple[str, str, Any]]:
    """(method, path, body) of every HTTP endpoint that takes a user's bearer token."""
    return [
        ("GET", "/api/v1/rooms/hideout/messages", None),
        ("PATCH", "/api/v1/rooms/hideout", {"topic": "Quiet"}),
        ("GET", "/api/v1/notifications", None),
        ("GET", "/api/v1/notifications/unread/count", None),
        ("POST", f"/api/v1/notifications/{notification_id}/read", None),
        ("POST", "/api/v1/notifications/read-all", None),
        ("GET", "/api/v1/logs/recent", None),
        ("GET", "/api/v1/logs/stats", None),
        ("GET", "/websocket/stats", None),
        ("POST", "/api/v1/publish", {"target": {"userId": "mallory"}, "event": "x:y"}),
        ("POST", "/api/v1/notifications", {"userIds": ["mallory"], "title": "hi"}),
        ("POST", "/api/v1/logs", {"entries": [{"level": "info", "message": "hi"}]}),
        ("DELETE", f"/api/v1/notifications/{notification_id}", None),
    ]


async def test_banned_user_gets_403_banned_on_every_endpoint(gateway_factory):
    gw = await production(gateway_factory)
    chat = await gw.connect("mallory")
    await chat.emit("room:create", {"roomId": "hideout", "name": "Hideout"})
    note = await notify(gw, "mallory")
    root = await gw.connect("root", "admin", ("admin",))
    await root.emit("admin:ban", {"userId": "mallory", "reason": "spam", "durationSeconds": 600})
    # A ban still closes the user's sockets (kept as it was).
    assert (await chat.wait_closed())[0] == 4403
    for method, path, body in every_endpoint(note["id"]):
        details = await fails(gw, method, path, 403, "BANNED", body, **MALLORY)
        assert details["reason"] == "spam" and details["expiresAt"], (method, path)
    # Someone else is not affected; the ban is read per request, so unban counts at once.
    await ok(gw, "GET", "/api/v1/notifications/unread/count", user="bob")
    await root.emit("admin:unban", {"userId": "mallory"})
    for method, path, body in every_endpoint(note["id"]):
        await ok(gw, method, path, body, **MALLORY)


async def test_an_expired_ban_does_not_block_rest(gateway_factory):
    gw = await production(gateway_factory)
    chat = await gw.connect("mallory")
    await chat.emit("room:create", {"roomId": "hideout", "name": "Hideout"})
    note = await notify(gw, "mallory")

    def expired_ban() -> None:
        past = utcnow() - dt.timedelta(seconds=1)
        Ban.create(user_id="mallory", reason="old", banned_by="root", created_at=past,
                   expires_at=past)  # fmt: skip

    await gw.node.db.run("test.ban", expired_ban)
    for method, path, body in every_endpoint(note["id"]):
        await ok(gw, method, path, body, **MALLORY)


# -- notifications ------------------------------------------------------------


async def test_list_count_and_pages(gateway):
    made = [await notify(gateway, "bob", f"n{i}") for i in range(5)]
    await notify(gateway, "carol", "not bob's")
    page = await ok(gateway, "GET", "/api/v1/notifications?limit=2")
    assert [n["title"] for n in page["notifications"]] == ["n4", "n3"] and page["hasMore"] is True
    assert page["notifications"][0] == made[4]
    rest = await ok(gateway, "GET", f"/api/v1/notifications?before={made[3]['id']}")
    assert [n["title"] for n in rest["notifications"]] == ["n2", "n1", "n0"]
    assert rest["hasMore"] is False
    await ok(gateway, "POST", f"/api/v1/notifications/{made[0]['id']}/read")
    unread = await ok(gateway, "GET", "/api/v1/notifications?unreadOnly=true")
    assert [n["title"] for n in unread["notifications"]] == ["n4", "n3", "n2", "n1"]
    assert await ok(gateway, "GET", "/api/v1/notifications/unread/count") == {"count": 4}


async def test_list_validates_its_query(gateway):
    bad = [
        ("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"),
        ("before=abc", "before"), ("unreadOnly=perhaps", "unreadOnly"),
    ]  # fmt: skip
    for query, field in bad:
        details = await fails(
            gateway, "GET", f"/api/v1/notifications?{query}", 400, "VALIDATION_ERROR"
        )
        assert field in details


async def test_rest_read_read_all_and_delete_push_live(gateway):
    a, b, c = [await notify(gateway, "bob", t) for t in ("a", "b", "c")]
    bob = await inbox(gateway, "bob")
    body = await ok(gateway, "POST", f"/api/v1/notifications/{a['id']}/read")
    assert body == {"notificationId": a["id"], "unreadCount": 2}
    assert (await bob.next_event("notification:read"))["data"] == {"notificationId": a["id"]}
    assert (await bob.next_event("notification:unread_count"))["data"] == {"count": 2}

    body = await ok(gateway, "DELETE", f"/api/v1/notifications/{b['id']}")
    assert body == {"notificationId": b["id"], "unreadCount": 1}
    assert (await bob.next_event("notification:deleted"))["data"] == {"notificationId": b["id"]}
    assert (await bob.next_event("notification:unread_count"))["data"] == {"count": 1}

    assert await ok(gateway, "POST", "/api/v1/notifications/read-all") == {
        "updated": 1, "unreadCount": 0,
    }  # fmt: skip
    frame = await bob.next_event("notification:read")
    assert frame["data"] == {"all": True, "notificationIds": [c["id"]]}
    # The socket sees what REST did.
    page = await bob.emit("notifications:get")
    assert [(n["id"], n["read"]) for n in page["notifications"]] == [
        (c["id"], True),
        (a["id"], True),
    ]


async def test_socket_changes_show_in_rest(gateway):
    a = await notify(gateway, "bob")
    bob = await inbox(gateway, "bob")
    await bob.emit("notifications:read", {"notificationId": a["id"]})
    assert await ok(gateway, "GET", "/api/v1/notifications/unread/count") == {"count": 0}
    await bob.emit("notifications:delete", {"notificationId": a["id"]})
    assert (await ok(gateway, "GET", "/api/v1/notifications"))["notifications"] == []


async def test_unknown_foreign_or_malformed_ids(gateway):
    carols = await notify(gateway, "carol")
    for nid in ("424242", carols["id"]):
        await fails(gateway, "POST", f"/api/v1/notifications/{nid}/read", 404,
                    "NOTIFICATION_NOT_FOUND")  # fmt: skip
        await fails(gateway, "DELETE", f"/api/v1/notifications/{nid}", 404,
                    "NOTIFICATION_NOT_FOUND")  # fmt: skip
    await fails(gateway, "DELETE", "/api/v1/notifications/abc", 400, "VALIDATION_ERROR")
    await fails(gateway, "GET", "/api/v1/nowhere", 404, "NOT_FOUND")


async def test_service_creates_notifications(gateway):
    bob, carol = await inbox(gateway, "bob"), await inbox(gateway, "carol")
    body = {
        "userIds": ["bob", "carol"], "type": "action_required", "category": "reservation",
        "title": "Confirm your booking", "message": "Room 4, 10:00", "data": {"booking": 7},
        "actionUrl": "/bookings/7", "priority": "high",
    }  # fmt: skip
    status, data, _ = await call(gateway, "POST", "/api/v1/notifications", body, **SERVICE)
    assert status == 201 and data["count"] == 2
    for client, made in zip((bob, carol), data["notifications"], strict=True):
        live = (await client.next_event("notification:created"))["data"]["notification"]
        assert live == made
        assert (live["type"], live["category"], live["actionUrl"], live["data"]) == (
            "action_required", "reservation", "/bookings/7", {"booking": 7},
        )  # fmt: skip
        assert (await client.next_event("notification:unread_count"))["data"] == {"count": 1}


async def test_create_needs_the_service_role_and_valid_fields(gateway):
    body = {"userIds": ["bob"], "title": "hi"}
    await fails(gateway, "POST", "/api/v1/notifications", 403, "FORBIDDEN", body, user="carol")
    await fails(gateway, "POST", "/api/v1/notifications", 403, "FORBIDDEN", body,
                user="root", roles=("admin",))  # fmt: skip
    for bad, field in (({"category": "gossip"}, "category"), ({"type": "loud"}, "type"),
                       ({"priority": "asap"}, "priority"), ({"userIds": []}, "userIds"),
                       ({"title": ""}, "title")):  # fmt: skip
        details = await fails(gateway, "POST", "/api/v1/notifications", 400, "VALIDATION_ERROR",
                              {**body, **bad}, **SERVICE)  # fmt: skip
        assert field in details
    assert await ok(gateway, "GET", "/api/v1/notifications/unread/count") == {"count": 0}


# -- history ------------------------------------------------------------------


async def test_room_messages_for_members_only(gateway):
    alice = await gateway.connect("alice")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    await alice.emit("room:create", {"roomId": "secret", "name": "Secret", "type": "private"})
    await alice.emit("room:join", {"roomId": "general"})
    for i in range(3):
        await alice.emit("message:send", {"roomId": "general", "content": f"m{i}"})
    page = await ok(gateway, "GET", "/api/v1/rooms/general/messages?limit=2", user="alice")
    assert [m["content"] for m in page["messages"]] == ["m2", "m1"] and page["hasMore"] is True
    older = await ok(gateway, "GET", "/api/v1/rooms/general/messages?beforeSeq=2", user="alice")
    assert [m["seq"] for m in older["messages"]] == [1] and older["hasMore"] is False
    await fails(gateway, "GET", "/api/v1/rooms/general/messages", 403, "NOT_IN_ROOM")
    await fails(gateway, "GET", "/api/v1/rooms/secret/messages", 403, "ROOM_ACCESS_DENIED")
    await fails(gateway, "GET", "/api/v1/rooms/nope/messages", 404, "ROOM_NOT_FOUND")
    await fails(gateway, "GET", "/api/v1/rooms/general/messages?limit=500", 400,
                "VALIDATION_ERROR", user="alice")  # fmt: skip
    await fails(gateway, "GET", "/api/v1/rooms/bad%20id/messages", 400, "VALIDATION_ERROR")


async def test_room_messages_by_seq_and_date_bounds(gateway):
    alice = await gateway.connect("alice")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    await alice.emit("room:join", {"roomId": "general"})
    sent = [
        (await alice.emit("message:send", {"roomId": "general", "content": f"m{i}"}))["message"]
        for i in range(5)
    ]
    path = "/api/v1/rooms/general/messages"
    page = await ok(gateway, "GET", f"{path}?afterSeq=1&limit=2", user="alice")
    assert [m["seq"] for m in page["messages"]] == [3, 2] and page["hasMore"] is True
    page = await ok(gateway, "GET", f"{path}?afterSeq=1&beforeSeq=4", user="alice")
    assert [m["seq"] for m in page["messages"]] == [3, 2] and page["hasMore"] is False
    page = await ok(gateway, "GET", f"{path}?offset=3&limit=5", user="alice")
    assert [m["seq"] for m in page["messages"]] == [2, 1]
    last = sent[-1]["createdAt"]
    page = await ok(gateway, "GET", f"{path}?before={quote(last)}", user="alice")
    assert [m["seq"] for m in page["messages"]] == [
        m["seq"] for m in reversed(sent) if m["createdAt"] < last
    ]
    page = await ok(gateway, "GET", f"{path}?after={quote(last)}", user="alice")
    assert page == {"messages": [], "hasMore": False}
    page = await ok(gateway, "GET", f"{path}?after=2001-01-01T00:00%2B02:00&limit=1", user="alice")
    assert [m["seq"] for m in page["messages"]] == [1] and page["hasMore"] is True


async def test_unknown_repeated_or_bad_query_parameters_are_400_naming_them(gateway):
    alice = await gateway.connect("alice")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    history = "/api/v1/rooms/general/messages"
    for query, field in (
        ("befor=2026-01-01T00:00:00Z", "befor"),  # a typo must not read as "no filter"
        ("before=2026-01-01T00:00:00", "before"),  # naive: refused, not guessed
        ("after=tomorrow", "after"),
        ("afterSeq=-1", "afterSeq"),
        ("limit=1&limit=2", "limit"),
        ("roomId=other", "roomId"),  # the room is the path's
        ("beforeSeq=3&offset=1", "beforeSeq"),
        ("after=2026-01-01T00:00:00Z&offset=1", "after"),
    ):
        details = await fails(gateway, "GET", f"{history}?{query}", 400, "VALIDATION_ERROR",
                              user="alice")  # fmt: skip
        assert list(details) == [field], (query, details)
    # Every REST query string is strict, endpoints that take none included.
    admin = {"user": "root", "roles": ("admin",)}
    publish = {"target": {"all": True}, "event": "x:y"}
    entries = {"entries": [{"level": "info", "message": "m"}]}
    for method, path, field, body, who in (
        ("GET", "/api/v1/notifications?unread=true", "unread", None, {}),
        ("GET", "/api/v1/notifications/unread/count?since=1", "since", None, {}),
        ("POST", "/api/v1/notifications/read-all?all=1", "all", {}, {}),
        ("POST", "/api/v1/publish?dryRun=1", "dryRun", publish, SERVICE),
        ("GET", "/api/v1/logs/recent?lvl=error", "lvl", None, admin),
        ("GET", "/api/v1/logs/stats?since=1", "since", None, admin),
        ("POST", "/api/v1/logs?async=1", "async", entries, SERVICE),
    ):
        details = await fails(gateway, method, path, 400, "VALIDATION_ERROR", body, **who)
        assert list(details) == [field], (path, details)


async def test_out_of_range_numbers_and_ids_are_400_naming_the_field(gateway):
    # Regression (issue 12): ?beforeSeq=2^64, ids over 2^63-1 and ids of digits
    # other than 0-9 ("²") were 500s with a traceback in the log.
    bob = await gateway.connect("bob")
    await bob.emit("room:create", {"roomId": "general", "name": "General"})
    await bob.emit("room:join", {"roomId": "general"})
    path = "/api/v1/rooms/general/messages"
    for value in ("9223372036854775808", "18446744073709551616", "1e400", "5.5", "%C2%B2", "-1"):
        details = await fails(gateway, "GET", f"{path}?beforeSeq={value}", 400, "VALIDATION_ERROR")
        assert list(details) == ["beforeSeq"], value
    assert (await ok(gateway, "GET", f"{path}?beforeSeq=9223372036854775807"))["messages"] == []
    for value in ("9223372036854775808", "%C2%B2", "1%C2%B2", "%D9%A1%D9%A2"):
        details = await fails(gateway, "GET", f"/api/v1/notifications?before={value}", 400,
                              "VALIDATION_ERROR")  # fmt: skip
        assert list(details) == ["before"], value
        for method, suffix in (("POST", "/read"), ("DELETE", "")):
            details = await fails(gateway, method, f"/api/v1/notifications/{value}{suffix}", 400,
                                  "VALIDATION_ERROR")  # fmt: skip
            assert list(details) == ["id"], value


async def test_free_form_data_nests_at_most_32_levels(gateway):
    # Regression (issue 12): 300 levels made the JSON encoder give up: a 500.
    deep = '{"a":' * 300 + "{}" + "}" * 300
    bodies = {
        "/api/v1/publish": '{"target": {"all": true}, "event": "x:y", "data": %s}',
        "/api/v1/notifications": '{"userIds": ["bob"], "title": "t", "data": %s}',
    }
    for path, body in bodies.items():
        status, answer, _ = await call(gateway, "POST", path, raw=(body % deep).encode(), **SERVICE)
        assert status == 400, answer
        assert answer["error"]["code"] == "VALIDATION_ERROR"
        assert answer["error"]["details"] == {"data": ["Must nest at most 32 levels deep."]}
    shallow = '{"a":' * 31 + "{}" + "}" * 31
    for path, body in bodies.items():
        status, answer, _ = await call(gateway, "POST", path, raw=(body % shallow).encode(),
                                       **SERVICE)  # fmt: skip
        assert status in (200, 201), answer


# -- room updates ---------------------------------------------------------------


async def test_patch_room_updates_it_and_members_hear_it(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    await bob.emit("room:join", {"roomId": "general"})
    body = {"name": "Lobby", "topic": "Release day", "password": "s3cret!"}
    got = await ok(gateway, "PATCH", "/api/v1/rooms/general", body, user="alice")
    room = got["room"]
    assert (room["id"], room["name"], room["topic"], room["hasPassword"]) == (
        "general", "Lobby", "Release day", True,
    )  # fmt: skip
    assert "s3cret!" not in orjson.dumps(got).decode() and "pbkdf2" not in str(got)
    for client in (alice, bob):
        ev = await client.next_event("room:updated")
        assert ev["data"] == {
            "roomId": "general", "room": room, "changes": ["name", "topic", "password"],
            "by": "alice",
        }  # fmt: skip
    # The socket view agrees; a null password removes it.
    got = await ok(gateway, "PATCH", "/api/v1/rooms/general", {"password": None}, user="alice")
    assert got["room"]["hasPassword"] is False
    joined = await bob.emit("room:join", {"roomId": "general"})
    assert {**joined["room"], "memberCount": 2} == got["room"]
    # An admin may too, without being a member.
    got = await ok(gateway, "PATCH", "/api/v1/rooms/general", {"type": "private"},
                   user="root", roles=("admin",))  # fmt: skip
    assert got["room"]["type"] == "private"


async def test_patch_room_errors(gateway):
    alice = await gateway.connect("alice")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    path = "/api/v1/rooms/general"
    await fails(gateway, "PATCH", path, 403, "FORBIDDEN", {"name": "Mine"}, user="bob")
    await fails(gateway, "PATCH", path, 403, "FORBIDDEN", {"name": "Mine"}, user="mod",
                roles=("moderator",))  # fmt: skip
    await fails(gateway, "PATCH", "/api/v1/rooms/nope", 404, "ROOM_NOT_FOUND", {"name": "X"})
    await fails(gateway, "PATCH", path, 401, "UNAUTHORIZED", {"name": "X"}, auth=False)
    await fails(gateway, "PATCH", path, 400, "BAD_REQUEST", raw=b"{not json", user="alice")
    for body, field in [
        ({"name": "X", "nmae": "Y"}, "nmae"), ({"roomId": "other", "name": "X"}, "roomId"),
        ({"name": ""}, "name"), ({"name": "x" * 101}, "name"), ({"topic": "x" * 201}, "topic"),
        ({"type": "secret"}, "type"), ({"password": ""}, "password"), ({}, "_schema"),
        (["name"], "_schema"),
    ]:  # fmt: skip
        details = await fails(gateway, "PATCH", path, 400, "VALIDATION_ERROR", body, user="alice")
        assert list(details) == [field], (body, details)
    details = await fails(gateway, "PATCH", "/api/v1/rooms/bad%20id", 400, "VALIDATION_ERROR",
                          {"name": "X"}, user="alice")  # fmt: skip
    assert list(details) == ["roomId"]
    await assert_no_event(alice, "room:updated")
    assert (await alice.emit("room:join", {"roomId": "general"}))["room"]["name"] == "General"


# -- publish ------------------------------------------------------------------


async def publish(gw: Any, target: dict[str, Any], event: str = "deploy:done") -> int:
    body = await ok(gw, "POST", "/api/v1/publish",
                    {"target": target, "event": event, "data": {"v": 2}}, **SERVICE)  # fmt: skip
    delivered: int = body["delivered"]
    return delivered


async def who_got(clients: dict[str, Client], event: str = "deploy:done") -> set[str]:
    """Names of the clients that received ``event`` (after a ping barrier on each)."""
    got = set()
    for name, client in clients.items():
        await client.emit("system:ping")
        frames = client.drain_events(event)
        assert len(frames) <= 1, frames
        if frames:
            assert frames[0]["data"] == {"v": 2}
            got.add(name)
    return got


async def test_publish_reaches_exactly_the_targeted_connections(gateway):
    clients = {
        "alice_chat": await gateway.connect("alice"),
        "alice_notes": await gateway.connect("alice", namespace="notifications"),
        "bob_chat": await gateway.connect("bob"),
        "carol_notes": await gateway.connect("carol", namespace="notifications"),
        "root_admin": await gateway.connect("root", namespace="admin", roles=("admin",)),
    }
    await clients["alice_chat"].emit("room:create", {"roomId": "ops", "name": "Ops"})
    await clients["alice_chat"].emit("room:join", {"roomId": "ops"})
    await clients["bob_chat"].emit("room:join", {"roomId": "ops"})
    await who_got(clients, "")  # drain set-up noise

    cases = [
        ({"userId": "alice"}, {"alice_chat", "alice_notes"}),
        ({"userId": "alice", "namespace": "notifications"}, {"alice_notes"}),
        ({"roomId": "ops"}, {"alice_chat", "bob_chat"}),
        ({"namespace": "notifications"}, {"alice_notes", "carol_notes"}),
        ({"all": True, "namespace": "admin"}, {"root_admin"}),
        ({"all": True}, set(clients)),
        ({"userId": "nobody"}, set()),
    ]
    for target, expected in cases:
        delivered = await publish(gateway, target)
        assert await who_got(clients) == expected, target
        assert delivered == len(expected), target


async def test_publish_to_a_role_reaches_its_connections_in_every_namespace(gateway):
    clients = {
        "mia_chat": await gateway.connect("mia", roles=("user", "moderator")),
        "mia_admin": await gateway.connect("mia", namespace="admin", roles=("moderator",)),
        "root_admin": await gateway.connect("root", namespace="admin", roles=("admin",)),
        "bob_chat": await gateway.connect("bob"),
        "bob_notes": await gateway.connect("bob", namespace="notifications"),
    }
    await who_got(clients, "")  # drain set-up noise
    cases = [
        ({"role": "moderator"}, {"mia_chat", "mia_admin"}),
        ({"role": "moderator", "namespace": "admin"}, {"mia_admin"}),
        ({"role": "moderator", "namespace": "logs"}, set()),
        ({"role": "user"}, {"mia_chat", "bob_chat", "bob_notes"}),
        ({"role": "user", "namespace": "notifications"}, {"bob_notes"}),
        ({"role": "admin"}, {"root_admin"}),
        ({"role": "service"}, set()),  # the caller's own role: no connection has it
        ({"role": "wizard"}, set()),  # no token grants it: nobody, not an error
    ]
    for target, expected in cases:
        delivered = await publish(gateway, target)
        assert await who_got(clients) == expected, target
        assert delivered == len(expected), target


async def test_publish_to_a_role_follows_a_refreshed_token(gateway):
    mia, bob = await gateway.connect("mia"), await gateway.connect("bob")
    clients = {"mia": mia, "bob": bob}
    await who_got(clients, "")
    target = {"role": "moderator"}
    assert await publish(gateway, target) == 0
    assert await who_got(clients) == set()

    await mia.emit("auth:refresh", {"token": gateway.token("mia", ("user", "moderator"))})
    assert await publish(gateway, target) == 1
    assert await who_got(clients) == {"mia"}

    await mia.emit("auth:refresh", {"token": gateway.token("mia", ("user",))})
    assert await publish(gateway, target) == 0
    assert await who_got(clients) == set()
    assert await publish(gateway, {"role": "user"}) == 2
    assert await who_got(clients) == {"mia", "bob"}


async def test_publish_needs_service_and_a_valid_target(gateway):
    body = {"target": {"all": True}, "event": "deploy:done"}
    for who in ({"user": "bob"}, {"user": "root", "roles": ("admin",)}):
        await fails(gateway, "POST", "/api/v1/publish", 403, "FORBIDDEN", body, **who)
    for bad, field in (
        ({"target": {}}, "target"),
        ({"target": {"userId": "a", "roomId": "b"}}, "target"),
        ({"target": {"roomId": "b", "namespace": "chat"}}, "target.namespace"),
        ({"target": {"role": "moderator", "userId": "a"}}, "target"),
        ({"target": {"role": "moderator", "all": True}}, "target"),
        ({"target": {"role": ""}}, "target.role"),
        ({"target": {"role": "x" * 65}}, "target.role"),
        ({"target": {"role": "mod\u0000"}}, "target.role"),
        ({"target": {"role": ["moderator"]}}, "target.role"),
        ({"target": {"namespace": "nowhere"}}, "target.namespace"),
        ({"event": "system:welcome"}, "event"),
        ({"event": "auth:expiring"}, "event"),
        ({"event": "has space"}, "event"),
        ({"event": None}, "event"),
        ({"data": [1]}, "data"),
    ):
        details = await fails(gateway, "POST", "/api/v1/publish", 400, "VALIDATION_ERROR",
                              {**body, **bad}, **SERVICE)  # fmt: skip
        assert any(k == field or k.startswith(field + ".") for k in details), (bad, details)
