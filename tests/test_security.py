"""Security alerts (``server/services/security.py``) end to end, plus the counter's bounds.

Real nodes and real clients: refused handshakes and refused REST requests
for a user id, and a user rate-limited over and over, must leave a
``security`` notification for that user and for every admin — once per
window. ``bob`` is the user under attack, ``root`` an admin.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jwt
import pytest
from tornado.httpclient import AsyncHTTPClient

from models import Notification
from server.services.security import (
    AUTH_FAILURE_THRESHOLD,
    AUTH_FAILURE_WINDOW_SECS,
    MAX_ALERTS_PER_WINDOW,
    RATE_LIMIT_THRESHOLD,
    SlidingCounter,
    unverified_subject,
)
from switchboard_client import Client, ClientError
from tests.conftest import ROOMY_RATE_LIMITS
from tests.support.client_checks import assert_no_event, background_done

pytestmark = pytest.mark.asyncio

WRONG_SECRET = "not-the-gateway-secret-but-long-enough-for-hs256"


# -- helpers ------------------------------------------------------------------


async def inbox(gw: Any, user: str, roles: tuple[str, ...] = ("user",)) -> Client:
    """A notifications connection (registers the user and roles), on-connect frames consumed."""
    client: Client = await gw.connect(user, "notifications", roles)
    await client.next_event("notification:recent")
    return client


def forged(user: str) -> str:
    """A well-formed token for ``user`` signed with the wrong key."""
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, WRONG_SECRET, "HS256")


async def refused_connect(gw: Any, token: str) -> ClientError:
    with pytest.raises(ClientError) as info:
        await gw.client("ignored", token=token).connect()
    return info.value


async def rest_status(gw: Any, token: str) -> int:
    response = await AsyncHTTPClient().fetch(
        f"{gw.http}/api/v1/notifications/unread/count",
        headers={"Authorization": f"Bearer {token}"},
        raise_error=False,
    )
    return response.code


def is_security(frame: dict[str, Any]) -> bool:
    return bool(frame["data"]["notification"]["category"] == "security")


async def security_note(client: Client) -> dict[str, Any]:
    frame = await client.next_event("notification:created", predicate=is_security)
    note: dict[str, Any] = frame["data"]["notification"]
    return note


async def no_security_note(gw: Any, *inboxes: Client) -> None:
    """Fail if a security notice reached any of ``inboxes``, proved with a barrier.

    Alerts are sent from background tasks: wait for those, then push a
    sentinel notice to each inbox's user; a security notice sent before it
    would have arrived first. (Not a ping: a rate-limit test allows one
    request a minute, and a ping would be refused and counted.)
    """
    await background_done(gw.node)
    for client in inboxes:
        title = f"sentinel {os.urandom(4).hex()}"
        await gw.node.notifications.notify([client.welcome["userId"]], title=title)
        await client.next_event(
            "notification:created",
            predicate=lambda f, title=title: f["data"]["notification"]["title"] == title,
        )
        await assert_no_event(client, "notification:created", is_security, ping=False)


def alerts(gw: Any, kind: str) -> float:
    value = gw.node.registry.get_sample_value("switchboard_security_alerts_total", {"kind": kind})
    return float(value or 0)


async def stored_security_notes(gw: Any, user: str) -> list[str]:
    def query() -> list[str]:
        rows = Notification.select().where(
            (Notification.user_id == user) & (Notification.category == "security")
        )
        return [r.title for r in rows]

    notes: list[str] = await gw.node.db.run("test.security_notes", query)
    return notes


# -- authentication failures ---------------------------------------------------------


async def test_repeated_bad_tokens_alert_the_user_and_admins_once(gateway: Any) -> None:
    bob = await inbox(gateway, "bob")
    root = await inbox(gateway, "root", ("admin",))
    for _ in range(AUTH_FAILURE_THRESHOLD - 1):
        exc = await refused_connect(gateway, forged("bob"))
        assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)
    # One short of the threshold: nobody is told yet.
    await no_security_note(gateway, bob, root)

    await refused_connect(gateway, forged("bob"))
    note = await security_note(bob)
    assert (note["type"], note["category"], note["priority"]) == ("warning", "security", "high")
    assert note["data"] == {
        "kind": "auth_failures", "userId": "bob", "failures": AUTH_FAILURE_THRESHOLD,
        "windowSeconds": int(AUTH_FAILURE_WINDOW_SECS), "lastError": "UNAUTHORIZED",
    }  # fmt: skip
    admin_note = await security_note(root)
    assert "bob" in admin_note["title"]
    assert admin_note["data"]["userId"] == "bob"
    assert alerts(gateway, "auth_failures") == 1

    # More failures in the same window: no second alert.
    for _ in range(AUTH_FAILURE_THRESHOLD):
        await refused_connect(gateway, forged("bob"))
    await no_security_note(gateway, bob, root)
    assert alerts(gateway, "auth_failures") == 1
    assert await stored_security_notes(gateway, "bob") == [note["title"]]
    # Bob's own connections were never affected.
    assert bob.connected


async def test_expired_tokens_on_rest_count_too(gateway: Any) -> None:
    bob = await inbox(gateway, "bob")
    expired = gateway.token("bob", ttl_secs=-60)
    for _ in range(AUTH_FAILURE_THRESHOLD):
        assert await rest_status(gateway, expired) == 401
    note = await security_note(bob)
    assert note["data"]["lastError"] == "TOKEN_EXPIRED"
    assert note["data"]["failures"] == AUTH_FAILURE_THRESHOLD


async def test_failures_mix_sockets_rest_and_log_endpoints(gateway: Any) -> None:
    bob = await inbox(gateway, "bob")
    await refused_connect(gateway, forged("bob"))
    await refused_connect(gateway, gateway.token("bob", ttl_secs=-60))
    assert await rest_status(gateway, forged("bob")) == 401
    response = await AsyncHTTPClient().fetch(
        f"{gateway.http}/api/v1/logs/stats",
        headers={"Authorization": f"Bearer {forged('bob')}"},
        raise_error=False,
    )
    assert response.code == 401
    await no_security_note(gateway, bob)
    assert await rest_status(gateway, forged("bob")) == 401
    assert (await security_note(bob))["data"]["userId"] == "bob"


async def test_unknown_user_ids_alert_admins_only(gateway: Any) -> None:
    root = await inbox(gateway, "root", ("admin",))
    for _ in range(AUTH_FAILURE_THRESHOLD):
        await refused_connect(gateway, forged("ghost"))
    note = await security_note(root)
    assert note["data"]["userId"] == "ghost"
    # Nobody called ghost has ever connected: no row is stored for a made-up id.
    await background_done(gateway.node)
    assert await stored_security_notes(gateway, "ghost") == []


async def test_tokens_without_a_readable_subject_are_not_counted(gateway: Any) -> None:
    root = await inbox(gateway, "root", ("admin",))
    for token in ("garbage", jwt.encode({"exp": 1}, WRONG_SECRET, "HS256")):
        for _ in range(AUTH_FAILURE_THRESHOLD):
            await refused_connect(gateway, token)
    with pytest.raises(ClientError) as info:
        await Client(gateway.url("chat"), "").connect()
    assert info.value.code == "UNAUTHORIZED"
    await no_security_note(gateway, root)
    assert len(gateway.node.security.auth_failures) == 0


# -- rate-limit abuse ------------------------------------------------------------------


async def test_persistent_rate_limiting_alerts_the_user_and_admins_once(
    gateway_factory: Any,
) -> None:
    gateway = await gateway_factory(rate_limits=ROOMY_RATE_LIMITS.replace("other=5000", "other=1"))
    bob_inbox = await inbox(gateway, "bob")
    root = await inbox(gateway, "root", ("admin",))
    bob = await gateway.connect("bob")
    await bob.emit("system:ping")  # the one allowed
    for _ in range(RATE_LIMIT_THRESHOLD - 1):
        with pytest.raises(ClientError) as info:
            await bob.emit("system:ping")
        assert info.value.code == "RATE_LIMITED"
    await no_security_note(gateway, bob_inbox)

    with pytest.raises(ClientError):
        await bob.emit("system:ping")
    note = await security_note(bob_inbox)
    assert (note["type"], note["priority"]) == ("warning", "high")
    assert note["data"]["kind"] == "rate_limit_abuse"
    assert note["data"]["bucket"] == "other"
    assert note["data"]["refusals"] == RATE_LIMIT_THRESHOLD
    assert (await security_note(root))["data"]["userId"] == "bob"
    assert alerts(gateway, "rate_limit_abuse") == 1

    for _ in range(RATE_LIMIT_THRESHOLD):
        with pytest.raises(ClientError):
            await bob.emit("system:ping")
    await no_security_note(gateway, bob_inbox)
    assert alerts(gateway, "rate_limit_abuse") == 1
    # Refused, not disconnected.
    assert bob.connected


async def test_rate_limited_rest_requests_count(gateway_factory: Any) -> None:
    gateway = await gateway_factory(rate_limits=ROOMY_RATE_LIMITS.replace("other=5000", "other=1"))
    bob = await inbox(gateway, "bob")
    token = gateway.token("bob")
    statuses = [await rest_status(gateway, token) for _ in range(RATE_LIMIT_THRESHOLD + 1)]
    assert statuses[0] == 200 and set(statuses[1:]) == {429}
    assert (await security_note(bob))["data"]["kind"] == "rate_limit_abuse"


# -- the counter ------------------------------------------------------------------


async def test_counter_alerts_once_per_window_and_slides() -> None:
    counter = SlidingCounter(threshold=3, window_secs=10.0)
    assert [counter.hit("bob", t) for t in (0.0, 1.0)] == [False, False]
    assert counter.hit("bob", 2.0) is True
    assert counter.hit("bob", 3.0) is False  # already reported this window
    # Failures spread wider than the window never add up to an alert.
    assert [counter.hit("eve", t) for t in (0.0, 6.0, 12.0, 18.0)] == [False] * 4
    # A window after the alert, a fresh burst alerts again.
    assert [counter.hit("bob", t) for t in (13.0, 13.5, 14.0)] == [False, False, True]
    assert counter.count("bob", 14.0) == 3


async def test_counter_memory_is_bounded() -> None:
    counter = SlidingCounter(threshold=3, window_secs=10.0, max_keys=100)
    for i in range(10_000):
        counter.hit(f"user-{i}", float(i))
    assert len(counter) == 100
    for _ in range(1000):
        counter.hit("user-9999", 10_000.0)
    assert counter.count("user-9999", 10_000.0) == 3  # at most ``threshold`` times kept
    # The least recently seen were forgotten; the newest are kept.
    assert counter.count("user-0", 10_000.0) == 0
    assert counter.count("user-9998", 10_000.0) == 1


async def test_unverified_subject() -> None:
    assert unverified_subject(forged("bob")) == "bob"
    assert unverified_subject(None) is None
    assert unverified_subject("not.a.jwt") is None
    assert unverified_subject(jwt.encode({"sub": "x" * 129}, WRONG_SECRET, "HS256")) is None
    assert unverified_subject(jwt.encode({"sub": 42}, WRONG_SECRET, "HS256")) is None


async def test_alerts_per_window_are_capped_node_wide(gateway: Any) -> None:
    # Forged tokens for ever-new ids must not flood the admins.
    for i in range(MAX_ALERTS_PER_WINDOW + 2):
        for _ in range(AUTH_FAILURE_THRESHOLD):
            await refused_connect(gateway, forged(f"ghost-{i}"))
    assert alerts(gateway, "auth_failures") == MAX_ALERTS_PER_WINDOW
    suppressed = gateway.node.registry.get_sample_value(
        "switchboard_security_alerts_suppressed_total", {"kind": "auth_failures"}
    )
    assert suppressed == 2
