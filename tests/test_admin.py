"""The ``/ws/admin`` namespace end to end: roles, moderation, figures, the live feed.

A real node and real WebSocket clients throughout; what is asserted is what
an admin, a moderated user or an operator reading the audit log would see.
``alice`` owns rooms, ``mallory`` gets moderated, ``root`` is an admin and
``mod`` a moderator.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import pytest

from handlers.admin import AdminHandler
from models import AuditLog, Ban, Notification, RoomMute
from switchboard_client import Client, ClientError, HandshakeError
from tests.support.client_checks import assert_no_event, background_done
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

ADMIN = ("admin",)
MODERATOR = ("moderator",)
METRICS_KEYS = {
    "connections", "messages", "performance", "rooms", "nodes", "memoryBytes", "timestamp",
}  # fmt: skip


# -- helpers ------------------------------------------------------------------


async def admin(gw: Any, user: str = "root", roles: tuple[str, ...] = ADMIN) -> Client:
    client: Client = await gw.connect(user, "admin", roles)
    return client


async def refused(client: Client) -> ClientError:
    with pytest.raises(ClientError) as info:
        await client.connect()
    assert not isinstance(info.value, HandshakeError)
    return info.value


async def error(client: Client, event: str, data: dict[str, Any], code: str) -> ClientError:
    with pytest.raises(ClientError) as info:
        await client.emit(event, data)
    assert info.value.code == code, info.value
    return info.value


async def room_with(gw: Any, room_id: str, *members: Client) -> None:
    """``members[0]`` creates the room; everyone joins."""
    await members[0].emit("room:create", {"roomId": room_id, "name": room_id})
    for client in members:
        await client.emit("room:join", {"roomId": room_id})


async def send(client: Client, room_id: str, content: str = "hi") -> dict[str, Any]:
    ack = await client.emit("message:send", {"roomId": room_id, "content": content})
    message: dict[str, Any] = ack["message"]
    return message


async def audit_rows(gw: Any, action: str) -> list[dict[str, Any]]:
    def query() -> list[dict[str, Any]]:
        rows = AuditLog.select().where(AuditLog.action == action).order_by(AuditLog.id)
        return [
            {"actor": r.actor_id, "target": r.target, "reason": r.reason, "details": r.details}
            for r in rows
        ]

    rows: list[dict[str, Any]] = await gw.node.db.run("test.audit", query)
    return rows


# -- roles ----------------------------------------------------------------------


async def test_plain_user_is_refused_with_forbidden(gateway):
    exc = await refused(gateway.client("eve", "admin", roles=("user",)))
    assert (exc.code, exc.close_code) == ("FORBIDDEN", 4403)
    exc = await refused(gateway.client("svc", "admin", roles=("service",)))
    assert (exc.code, exc.close_code) == ("FORBIDDEN", 4403)
    assert gateway.node.hub.count_by_namespace().get("admin") is None


async def test_admin_and_moderator_are_welcome(gateway):
    for user, roles in (("root", ADMIN), ("mod", MODERATOR)):
        client = await admin(gateway, user, roles)
        assert client.welcome["namespace"] == "admin"
        assert client.welcome["user"]["roles"] == list(roles)


async def test_moderator_may_not_ban_unban_or_delete_rooms(gateway):
    alice = await gateway.connect("alice")
    await room_with(gateway, "general", alice)
    mod = await admin(gateway, "mod", MODERATOR)
    for event, data in (
        ("admin:ban", {"userId": "alice", "reason": "x"}),
        ("admin:unban", {"userId": "alice"}),
        ("admin:delete_room", {"roomId": "general"}),
    ):
        exc = await error(mod, event, data, "FORBIDDEN")
        assert "admin" in exc.message
    # Nothing happened: alice is connected, the room lives, nobody is banned.
    assert alice.connected
    assert (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert await gateway.node.db.run("test", lambda: Ban.select().count()) == 0
    assert await audit_rows(gateway, "ban") == []
    # The connection stays usable after a refusal.
    assert (await mod.emit("admin:stats"))["node"] == "test-node"


async def test_moderator_may_kick_mute_and_delete_messages(gateway):
    alice, mallory = await gateway.connect("alice"), await gateway.connect("mallory")
    await room_with(gateway, "general", alice, mallory)
    message = await send(mallory, "general", "spam")
    mod = await admin(gateway, "mod", MODERATOR)
    await mod.emit("admin:mute", {"userId": "mallory", "roomId": "general", "durationSeconds": 60})
    await mod.emit("admin:delete_message", {"messageId": message["id"], "reason": "spam"})
    await mod.emit("admin:kick", {"userId": "mallory", "reason": "cool off"})
    assert await mallory.wait_closed() == (4403, "forbidden")


async def test_actions_validate_their_data(gateway):
    root = await admin(gateway)
    exc = await error(root, "admin:ban", {"reason": "x"}, "VALIDATION_ERROR")
    assert "userId" in exc.details
    exc = await error(root, "admin:mute", {"userId": "a", "roomId": "r"}, "VALIDATION_ERROR")
    assert "durationSeconds" in exc.details
    exc = await error(
        root, "admin:broadcast", {"message": "hi", "namespaces": ["nope"]}, "VALIDATION_ERROR"
    )
    assert any(key.startswith("namespaces") for key in exc.details)
    exc = await error(root, "admin:ban", {"userId": "a", "durationSeconds": 0}, "VALIDATION_ERROR")
    assert "durationSeconds" in exc.details


@pytest.mark.parametrize(
    ("event", "data", "field"),
    [
        # Regression (issue 12): NUL cannot be stored by PostgreSQL (INTERNAL_ERROR there).
        ("admin:ban", {"userId": "v\x00"}, "userId"),
        ("admin:kick", {"userId": "v\x00"}, "userId"),
        # Regression (issue 12): past int64, the database overflowed (INTERNAL_ERROR).
        ("admin:delete_message", {"messageId": "9223372036854775808"}, "messageId"),
        ("admin:ban", {"userId": "a", "durationSeconds": 2**64 - 1}, "durationSeconds"),
        ("admin:ban", {"userId": "a", "durationSeconds": 60.5}, "durationSeconds"),
        ("admin:rooms", {"offset": 2**63}, "offset"),
    ],
)
async def test_actions_bound_their_numbers_and_ids(gateway, event, data, field):
    root = await admin(gateway)
    exc = await error(root, event, data, "VALIDATION_ERROR")
    assert list(exc.details) == [field]


# -- kick and ban -------------------------------------------------------------------


async def test_kick_closes_every_connection_of_the_user_in_every_namespace(gateway):
    chat1, chat2 = await gateway.connect("mallory"), await gateway.connect("mallory")
    staff_conn = await gateway.connect("mallory", "admin", MODERATOR)
    bystander = await gateway.connect("alice")
    root = await admin(gateway)
    ack = await root.emit("admin:kick", {"userId": "mallory", "reason": "flooding"})
    assert ack == {"userId": "mallory", "reason": "flooding", "connectionsClosed": 3}
    for client in (chat1, chat2, staff_conn):
        kicked = await client.next_event("system:kicked")
        assert kicked["data"] == {"reason": "flooding", "kickedBy": "root"}
        err = await client.next_event("system:error")
        assert err["data"]["code"] == "FORBIDDEN"
        assert err["data"]["details"] == {"reason": "flooding", "kicked": True}
        code, _ = await client.wait_closed()
        assert code == 4403
    assert bystander.connected
    await eventually(lambda: gateway.node.hub.user_connections("mallory") == [])
    # A kick is not a ban: mallory may come straight back.
    assert (await gateway.connect("mallory")).welcome["userId"] == "mallory"
    assert await audit_rows(gateway, "kick") == [
        {"actor": "root", "target": "user:mallory", "reason": "flooding", "details": {}}
    ]


async def test_ban_closes_live_connections_and_refuses_reconnects(gateway):
    chat = await gateway.connect("mallory")
    notes = await gateway.connect("mallory", "admin", MODERATOR)
    root = await admin(gateway)
    ack = await root.emit("admin:ban", {"userId": "mallory", "reason": "spam"})
    assert ack["connectionsClosed"] == 2
    assert ack["ban"]["userId"] == "mallory"
    assert ack["ban"]["bannedBy"] == "root"
    assert ack["ban"]["expiresAt"] is None
    for client in (chat, notes):
        err = await client.next_event("system:error")
        assert err["data"]["code"] == "BANNED"
        assert err["data"]["details"]["reason"] == "spam"
        assert (await client.wait_closed())[0] == 4403
    exc = await refused(gateway.client("mallory"))
    assert (exc.code, exc.close_code) == ("BANNED", 4403)
    assert exc.details["reason"] == "spam"
    ban = await gateway.node.db.run("test", lambda: Ban.get(Ban.user_id == "mallory"))
    assert (ban.reason, ban.banned_by, ban.expires_at) == ("spam", "root", None)
    rows = await audit_rows(gateway, "ban")
    assert rows == [
        {"actor": "root", "target": "user:mallory", "reason": "spam",
         "details": {"durationSeconds": None}},
    ]  # fmt: skip


async def test_temporary_ban_expires_on_time(gateway):
    root = await admin(gateway)
    ack = await root.emit(
        "admin:ban", {"userId": "mallory", "reason": "cool off", "durationSeconds": 1}
    )
    assert ack["ban"]["expiresAt"] is not None
    started = time.monotonic()
    exc = await refused(gateway.client("mallory"))
    assert exc.code == "BANNED"
    assert exc.details["expiresAt"] == ack["ban"]["expiresAt"]
    # Retry until admitted: that must happen about one second after the ban.
    while True:
        try:
            client = await gateway.connect("mallory")
            break
        except ClientError as exc:
            assert exc.code == "BANNED"
            assert time.monotonic() - started < 3.0, "ban outlived its duration"
            await asyncio.sleep(0.1)  # real clock: the ban ends with time, no event says so
    assert client.welcome["userId"] == "mallory"
    assert time.monotonic() - started >= 0.5


async def test_unban_lets_the_user_back(gateway):
    root = await admin(gateway)
    await root.emit("admin:ban", {"userId": "mallory", "reason": "spam"})
    assert (await refused(gateway.client("mallory"))).code == "BANNED"
    assert await root.emit("admin:unban", {"userId": "mallory"}) == {
        "userId": "mallory", "wasBanned": True,
    }  # fmt: skip
    assert (await gateway.connect("mallory")).welcome["userId"] == "mallory"
    assert (await root.emit("admin:unban", {"userId": "mallory"}))["wasBanned"] is False
    assert [r["actor"] for r in await audit_rows(gateway, "unban")] == ["root", "root"]


async def test_admin_cannot_ban_themselves(gateway):
    root = await admin(gateway)
    await error(root, "admin:ban", {"userId": "root", "reason": "oops"}, "FORBIDDEN")
    assert root.connected


# -- mute -------------------------------------------------------------------------------


async def test_mute_blocks_messages_until_it_expires(gateway):
    alice, mallory = await gateway.connect("alice"), await gateway.connect("mallory")
    await room_with(gateway, "general", alice, mallory)
    mod = await admin(gateway, "mod", MODERATOR)
    ack = await mod.emit(
        "admin:mute",
        {"userId": "mallory", "roomId": "general", "durationSeconds": 1, "reason": "calm"},
    )
    assert ack["userId"] == "mallory" and ack["roomId"] == "general"
    started = time.monotonic()
    for client in (alice, mallory):
        muted = await client.next_event("room:user_muted")
        assert muted["data"]["mutedUntil"] == ack["mutedUntil"]
        assert muted["data"]["mutedBy"] == "mod"
    exc = await error(mallory, "message:send", {"roomId": "general", "content": "hey"}, "MUTED")
    assert exc.details["until"] == ack["mutedUntil"]
    # Only mallory, only in this room.
    await send(alice, "general", "still here")
    while True:
        try:
            await send(mallory, "general", "back")
            break
        except ClientError as exc:
            assert exc.code == "MUTED"
            assert time.monotonic() - started < 3.0, "mute outlived its duration"
            await asyncio.sleep(0.1)  # real clock: the mute ends with time, no event says so
    assert time.monotonic() - started >= 0.5
    mute = await gateway.node.db.run("test", lambda: RoomMute.get(RoomMute.user_id == "mallory"))
    assert (mute.room_id, mute.muted_by, mute.reason) == ("general", "mod", "calm")
    rows = await audit_rows(gateway, "mute")
    assert rows == [
        {"actor": "mod", "target": "user:mallory", "reason": "calm",
         "details": {"roomId": "general", "durationSeconds": 1}},
    ]  # fmt: skip


async def test_mute_needs_a_live_room_not_a_member(gateway):
    # A moderator may mute someone before they join a room (see
    # tests/test_chat.py::test_a_mute_before_joining_applies_on_join); the room must exist.
    alice = await gateway.connect("alice")
    await room_with(gateway, "general", alice)
    root = await admin(gateway)
    data = {"userId": "mallory", "roomId": "general", "durationSeconds": 5}
    await error(root, "admin:mute", {**data, "roomId": "nowhere"}, "ROOM_NOT_FOUND")
    await alice.emit("room:delete", {"roomId": "general"})
    await error(root, "admin:mute", data, "ROOM_NOT_FOUND")
    assert await audit_rows(gateway, "mute") == []
    await room_with(gateway, "lobby", alice)
    ack = await root.emit("admin:mute", {**data, "roomId": "lobby"})
    assert (ack["userId"], ack["roomId"]) == ("mallory", "lobby")
    assert [r["target"] for r in await audit_rows(gateway, "mute")] == ["user:mallory"]


# -- rooms and messages ---------------------------------------------------------------


async def test_delete_room_tells_every_member(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await room_with(gateway, "general", alice, bob)
    away = await gateway.connect("carol")
    await alice.emit("room:create", {"roomId": "other", "name": "other", "members": ["carol"]})
    await alice.emit("room:join", {"roomId": "other"})
    root = await admin(gateway)
    ack = await root.emit("admin:delete_room", {"roomId": "general"})
    assert ack == {"roomId": "general", "members": 2}
    for client in (alice, bob):
        deleted = await client.next_event("room:deleted")
        assert deleted["data"] == {"roomId": "general", "deletedBy": "root"}
    await background_done(gateway.node)
    await assert_no_event(away, "room:deleted")
    await error(alice, "room:join", {"roomId": "general"}, "ROOM_NOT_FOUND")
    await error(root, "admin:delete_room", {"roomId": "general"}, "ROOM_NOT_FOUND")
    rooms = (await root.emit("admin:rooms"))["rooms"]
    assert [r["roomId"] for r in rooms] == ["other"]
    assert [r["target"] for r in await audit_rows(gateway, "delete_room")] == ["room:general"]


async def test_room_deletion_is_one_operation_on_both_surfaces(gateway):
    """admin:delete_room and the owner's room:delete tell, notify and audit alike."""
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await room_with(gateway, "general", alice, bob)
    await room_with(gateway, "other", alice, bob)
    inbox = await gateway.connect("bob", "notifications")
    await inbox.next_event("notification:recent")
    root = await admin(gateway)
    await root.emit("admin:delete_room", {"roomId": "general"})
    await alice.emit("room:delete", {"roomId": "other"})
    notes = []
    for room_id, by in (("general", "root"), ("other", "alice")):
        deleted = await bob.next_event("room:deleted")
        assert deleted["data"] == {"roomId": room_id, "deletedBy": by}
        notes.append((await inbox.next_event("notification:created"))["data"]["notification"])
    # Notifications are stored in the background: in either order.
    assert sorted((n["title"], n["data"]["deletedBy"]) for n in notes) == [
        ("Room #general was deleted", "root"), ("Room #other was deleted", "alice"),
    ]  # fmt: skip
    assert [(r["actor"], r["target"]) for r in await audit_rows(gateway, "delete_room")] == [
        ("root", "room:general"), ("alice", "room:other"),
    ]  # fmt: skip


async def test_admin_delete_room_tells_members_and_drops_missed_notices(gateway):
    """Like the owner's room:delete: room:deleted, and no missed-messages notice is left."""
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await room_with(gateway, "general", alice, bob)
    carol = await gateway.connect("carol")
    await carol.emit("room:join", {"roomId": "general"})
    await carol.aclose()  # a member away from chat: her messages are missed
    inbox = await gateway.connect("carol", "notifications")
    await inbox.next_event("notification:recent")
    await send(alice, "general")
    missed = (await inbox.next_event("notification:created"))["data"]["notification"]
    assert missed["data"]["roomId"] == "general"
    root = await admin(gateway)
    await root.emit("admin:delete_room", {"roomId": "general"})
    deleted = await bob.next_event("room:deleted")
    assert deleted["data"] == {"roomId": "general", "deletedBy": "root"}
    gone = await inbox.next_event("notification:deleted")
    assert gone["data"] == {"notificationId": missed["id"]}
    notice = (await inbox.next_event("notification:created"))["data"]["notification"]
    assert notice["title"] == "Room #general was deleted"
    page = await gateway.node.notifications.page("carol", unread_only=False, limit=10, before=None)
    assert [n["title"] for n in page["notifications"]] == ["Room #general was deleted"]


async def test_admin_delete_room_stays_admin_only_even_for_the_owner(gateway):
    mod = await gateway.connect("mod", roles=MODERATOR)
    await room_with(gateway, "mine", mod)
    mod_admin = await admin(gateway, "mod", MODERATOR)
    exc = await error(mod_admin, "admin:delete_room", {"roomId": "mine"}, "FORBIDDEN")
    assert exc.details == {"action": "delete_room"}
    # Through /ws/chat the owner may.
    assert await mod.emit("room:delete", {"roomId": "mine"}) == {"roomId": "mine"}


async def test_delete_message_reaches_the_room(gateway):
    alice, mallory = await gateway.connect("alice"), await gateway.connect("mallory")
    await room_with(gateway, "general", alice, mallory)
    message = await send(mallory, "general", "buy cheap watches")
    mod = await admin(gateway, "mod", MODERATOR)
    ack = await mod.emit("admin:delete_message", {"messageId": message["id"], "reason": "spam"})
    expected = {
        "messageId": message["id"], "roomId": "general", "deletedBy": "mod", "reason": "spam",
    }  # fmt: skip
    assert ack == expected
    for client in (alice, mallory):
        assert (await client.next_event("message:deleted"))["data"] == expected
    page = await alice.emit("room:get_messages", {"roomId": "general"})
    assert page["messages"][0]["deleted"] is True
    assert page["messages"][0]["content"] == ""
    await error(
        mod, "admin:delete_message", {"messageId": message["id"], "reason": "x"},
        "MESSAGE_NOT_FOUND",
    )  # fmt: skip
    rows = await audit_rows(gateway, "delete_message")
    assert rows == [
        {"actor": "mod", "target": f"message:{message['id']}", "reason": "spam",
         "details": {"roomId": "general", "senderId": "mallory"}},
    ]  # fmt: skip


# -- broadcast ---------------------------------------------------------------------------


async def test_broadcast_reaches_every_namespace_by_default(gateway):
    chat = await gateway.connect("alice")
    other_admin = await admin(gateway, "mod", MODERATOR)
    root = await admin(gateway)
    ack = await root.emit("admin:broadcast", {"message": "Restart at noon", "type": "warning"})
    assert ack["delivered"] == 3
    assert ack["namespaces"] == ["chat", "notifications", "admin", "logs"]
    for client in (chat, other_admin, root):
        frame = await client.next_event("admin:broadcast")
        data = frame["data"]
        assert data["message"] == "Restart at noon"
        assert (data["type"], data["from"]) == ("warning", "root")
        assert data["sentAt"].endswith("Z")
    rows = await audit_rows(gateway, "broadcast")
    assert rows[0]["actor"] == "root" and rows[0]["details"]["type"] == "warning"


async def test_broadcast_to_chosen_namespaces_only(gateway):
    chat = await gateway.connect("alice")
    root = await admin(gateway)
    ack = await root.emit("admin:broadcast", {"message": "chat only", "namespaces": ["chat"]})
    assert ack["delivered"] == 1 and ack["type"] == "info"
    assert (await chat.next_event("admin:broadcast"))["data"]["message"] == "chat only"
    await assert_no_event(root, "admin:broadcast")


async def test_broadcast_to_a_role_reaches_only_its_connections(gateway):
    mia_chat = await gateway.connect("mia", roles=("user", "moderator"))
    mia_notes = await gateway.connect("mia", "notifications", ("moderator",))
    bob = await gateway.connect("bob")
    mod = await admin(gateway, "mod", MODERATOR)
    root = await admin(gateway)
    ack = await root.emit("admin:broadcast", {"message": "mods: sync", "role": "moderator"})
    assert ack["delivered"] == 3 and ack["role"] == "moderator"
    assert ack["namespaces"] == ["chat", "notifications", "admin", "logs"]
    for client in (mia_chat, mia_notes, mod):
        frame = await client.next_event("admin:broadcast")
        assert (frame["data"]["message"], frame["data"]["role"]) == ("mods: sync", "moderator")
    for client in (bob, root):
        await assert_no_event(client, "admin:broadcast")
    rows = await audit_rows(gateway, "broadcast")
    assert rows[-1]["details"] == {"message": "mods: sync", "type": "info", "role": "moderator"}

    # Narrowed by namespaces; once per connection, whatever the namespaces chosen.
    ack = await root.emit(
        "admin:broadcast", {"message": "x", "role": "moderator", "namespaces": ["chat", "admin"]}
    )
    assert ack["delivered"] == 2
    await mia_chat.next_event("admin:broadcast")
    await mod.next_event("admin:broadcast")
    for client in (mia_chat, mia_notes, mod):
        await assert_no_event(client, "admin:broadcast")

    ack = await root.emit("admin:broadcast", {"message": "x", "role": "wizard"})
    assert ack["delivered"] == 0  # a role no token grants: nobody, not an error
    exc = await error(root, "admin:broadcast", {"message": "x", "role": ""}, "VALIDATION_ERROR")
    assert "role" in exc.details


# -- figures --------------------------------------------------------------------------


async def test_online_users_lists_connections_by_namespace(gateway):
    await gateway.connect("alice")
    await gateway.connect("alice")
    bob = await gateway.connect("bob")
    await bob.emit("user:status_update", {"status": "busy"})
    root = await admin(gateway)
    result = await root.emit("admin:online_users", {"limit": 10, "offset": 0})
    assert result["total"] == 3
    users = {u["userId"]: u for u in result["users"]}
    # The counts; an admin also gets each connection's details ("list", tested below).
    assert {k: v for k, v in users["alice"]["connections"].items() if k != "list"} == {
        "total": 2, "byNamespace": {"chat": 2}, "byNode": {"test-node": 2},
    }  # fmt: skip
    assert len(users["alice"]["connections"]["list"]) == 2
    assert users["alice"]["status"] == "online"
    assert users["bob"]["status"] == "busy"
    assert {k: v for k, v in users["root"]["connections"].items() if k != "list"} == {
        "total": 1, "byNamespace": {"admin": 1}, "byNode": {"test-node": 1},
    }  # fmt: skip
    page = await root.emit("admin:online_users", {"limit": 1, "offset": 1})
    assert [u["userId"] for u in page["users"]] == ["bob"] and page["total"] == 3


DETAIL_KEYS = {
    "connectionId", "userId", "node", "namespace", "ip", "userAgent", "connectedAt",
    "framesIn", "framesOut", "bytesIn", "bytesOut",
}  # fmt: skip


async def listed_connection(root: Client, user_id: str, conn_id: str) -> dict[str, Any]:
    result = await root.emit("admin:online_users", {"limit": 500})
    assert result["missingNodes"] == []
    (user,) = [u for u in result["users"] if u["userId"] == user_id]
    (conn,) = [c for c in user["connections"]["list"] if c["connectionId"] == conn_id]
    return conn


async def test_online_users_show_admins_each_connection_with_address_and_counters(
    gateway_factory,
):
    gw = await gateway_factory(trusted_proxies="127.0.0.1/32")
    # Behind a trusted proxy: the forwarded address is the client's. The user
    # agent comes back printable (tab and NEL removed) and bounded.
    agent = "Mozilla/5.0\t(X11)\x85 " + "x" * 400
    headers = {"X-Forwarded-For": "10.9.9.9, 203.0.113.7", "User-Agent": agent}
    before = time.time()
    alice = await gw.connect("alice", headers=headers)
    await gw.connect("bob", "notifications", headers={"User-Agent": "bobs-app/2"})
    root = await admin(gw)

    conn = await listed_connection(root, "alice", alice.welcome["connectionId"])
    assert set(conn) == DETAIL_KEYS
    assert (conn["userId"], conn["namespace"], conn["node"]) == ("alice", "chat", "test-node")
    assert conn["ip"] == "203.0.113.7"
    assert conn["userAgent"] == ("Mozilla/5.0(X11) " + "x" * 400)[:256]
    connected = datetime.fromisoformat(conn["connectedAt"].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= connected <= time.time() + 1
    assert conn["framesIn"] == conn["bytesIn"] == 0
    assert conn["framesOut"] >= 1 and conn["bytesOut"] > 0  # the welcome

    for _ in range(3):
        await alice.emit("system:ping", {})
    later = await listed_connection(root, "alice", alice.welcome["connectionId"])
    assert later["framesIn"] == 3 and later["bytesIn"] > 0
    assert later["framesOut"] >= conn["framesOut"] + 3
    assert later["bytesOut"] > conn["bytesOut"]
    assert later["connectedAt"] == conn["connectedAt"]

    bob = await listed_connection(root, "bob", gw.node.hub.user_connections("bob")[0].conn_id)
    assert (bob["namespace"], bob["userAgent"], bob["ip"]) == ("notifications", "bobs-app/2",
                                                               "127.0.0.1")  # fmt: skip


async def test_moderators_get_counts_but_no_connection_details(gateway):
    alice = await gateway.connect("alice", headers={"User-Agent": "secret-agent"})
    mod = await admin(gateway, "mod", MODERATOR)
    result = await mod.emit("admin:online_users", {})
    assert "missingNodes" not in result
    for user in result["users"]:
        assert set(user["connections"]) == {"total", "byNamespace", "byNode"}
    assert "secret-agent" not in str(result) and alice.welcome["connectionId"] not in str(result)


@pytest.mark.parametrize(("data", "field"), [({"limit": 501}, "limit"), ({"limit": 0}, "limit"),
                                             ({"offset": 1_000_001}, "offset")])  # fmt: skip
async def test_online_users_pages_are_bounded(gateway, data, field):
    root = await admin(gateway)
    exc = await error(root, "admin:online_users", data, "VALIDATION_ERROR")
    assert list(exc.details) == [field]


async def test_stats_match_activity(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await room_with(gateway, "general", alice, bob)
    for i in range(3):
        await send(alice, "general", f"m{i}")
    root = await admin(gateway)
    stats = await root.emit("admin:stats")
    assert stats["node"] == "test-node"
    assert [n["id"] for n in stats["nodes"]] == ["test-node"]
    assert stats["uptimeSeconds"] > 0
    assert stats["connections"] == {"total": 3, "byNamespace": {"chat": 2, "admin": 1}}
    assert stats["users"] == {"online": 3, "total": 3}
    assert stats["rooms"] == {"active": 1, "total": 1}
    assert stats["messages"]["total"] == 3
    assert stats["messages"]["sinceStart"] == 3
    assert stats["messages"]["perMinute"] == 3
    assert stats["bans"] == {"active": 0}


async def test_rooms_report_users_peaks_rates_and_totals(gateway):
    alice, bob, carol = [await gateway.connect(u) for u in ("alice", "bob", "carol")]
    await room_with(gateway, "general", alice, bob, carol)
    await alice.emit("room:create", {"roomId": "quiet", "name": "quiet"})
    for i in range(4):
        await send(bob, "general", f"m{i}")
    await carol.emit("room:leave", {"roomId": "general"})
    await bob.aclose()
    root = await admin(gateway)
    await eventually(lambda: gateway.node.hub.user_connections("bob") == [])
    result = await root.emit("admin:rooms", {"limit": 10})
    assert result["total"] == 2
    rooms = {r["roomId"]: r for r in result["rooms"]}
    general = rooms["general"]
    assert general["activeUsers"] == 1
    assert general["peakUsers"] == 3
    assert general["messagesPerMinute"] == 4
    assert general["totalMessages"] == 4
    assert general["members"] == 2  # carol left; bob is still a member while offline
    assert general["lastActivity"].endswith("Z")
    assert rooms["quiet"] | {"lastActivity": None} == {
        "roomId": "quiet", "name": "quiet", "type": "public", "members": 1,
        "totalMessages": 0, "lastActivity": None, "activeUsers": 0, "peakUsers": 0,
        "messagesPerMinute": 0,
    }  # fmt: skip
    # Most recently active first.
    assert [r["roomId"] for r in result["rooms"]] == ["general", "quiet"]


# -- metrics:update and health:status --------------------------------------------------


async def test_metrics_update_on_connect_matches_activity(gateway):
    alice, bob = await gateway.connect("alice"), await gateway.connect("bob")
    await room_with(gateway, "general", alice, bob)
    for i in range(5):
        await send(alice, "general", f"m{i}")
    root = await admin(gateway)
    frame = await root.next_event("metrics:update", timeout=2.0)
    data = frame["data"]
    assert set(data) == METRICS_KEYS
    assert data["connections"] == {"total": 3, "byNamespace": {"chat": 2, "admin": 1}}
    assert data["messages"]["total"] == 5
    assert data["messages"]["perMinute"] == 5
    assert data["messages"]["perSecond"] == pytest.approx(0.5)
    perf = data["performance"]
    assert perf["samples"] >= 5 + 1 + 2  # sends, create, joins
    assert 0 < perf["p50Ms"] <= perf["p95Ms"] < 5000
    assert perf["errorRate"] == 0 and perf["clientErrorRate"] == 0
    assert perf["eventLoopLagMs"] >= 0
    assert data["rooms"] == {
        "active": 1, "top": [{"roomId": "general", "activeUsers": 2, "messagesPerMinute": 5}],
    }  # fmt: skip
    assert data["nodes"][0]["id"] == "test-node" and data["nodes"][0]["connections"] == 3
    assert data["memoryBytes"] > 10_000_000


async def test_metrics_update_is_pushed_periodically_to_every_admin(gateway_factory):
    gw = await gateway_factory(metrics_interval=0.2)
    root, mod = await admin(gw), await admin(gw, "mod", MODERATOR)
    await root.next_event("metrics:update")  # the one sent on connect
    await mod.next_event("metrics:update")
    alice = await gw.connect("alice")
    await room_with(gw, "general", alice)
    await send(alice, "general")
    # A later tick sees the new connection and message, identically on both.
    match = lambda f: f["data"]["messages"]["total"] == 1  # noqa: E731
    seen = [(await c.next_event("metrics:update", predicate=match))["data"] for c in (root, mod)]
    for data in seen:
        assert data["connections"]["byNamespace"] == {"admin": 2, "chat": 1}
        assert data["rooms"]["top"][0]["roomId"] == "general"
    # Several more ticks arrive at about the configured interval.
    started = time.monotonic()
    for _ in range(3):
        await root.next_event("metrics:update", timeout=2.0)
    assert time.monotonic() - started < 2.0
    # One node-wide timer, not one per connection.
    assert [t.get_name() for t in asyncio.all_tasks()].count("admin-feed") == 1


async def feed_ticks(root: Client, count: int) -> None:
    """Barrier for the admin feed's timer: ``count`` more ``metrics:update`` ticks arrived.

    A tick pushes ``metrics:update`` and then, if health changed, ``health:status``:
    every tick but the last is then fully here.
    """
    root.drain_events("metrics:update")
    for _ in range(count):
        await root.next_event("metrics:update", timeout=2.0)


async def test_health_status_is_pushed_when_it_changes(gateway_factory, own_postgres):
    url = await asyncio.to_thread(own_postgres.create_database, "feed")
    gw = await gateway_factory(metrics_interval=0.2, database_url=url)
    root = await admin(gw)
    # The current health comes with the welcome; changes follow.
    first = await root.next_event("health:status", timeout=1.0)
    assert first["data"]["status"] == "healthy" and first["data"]["previous"] is None
    assert first["data"]["services"]["database"] == "up"
    await feed_ticks(root, 3)
    await assert_no_event(root, "health:status", ping=False)
    # A client's mistakes are not the node's failures: they show apart, health stays.
    noisy = await gw.connect("noisy")
    for _ in range(10):
        await error(noisy, "no:such", {}, "UNKNOWN_EVENT")
    root.drain_events("metrics:update")
    perf = (await root.next_event("metrics:update", timeout=2.0))["data"]["performance"]
    assert perf["clientErrorRate"] > 0.05 and perf["errorRate"] == 0
    # Barrier: a tick reads health after each snapshot, so one more snapshot
    # means health was read after the errors.
    await root.next_event("metrics:update", timeout=2.0)
    await assert_no_event(root, "health:status", ping=False)
    # Server-side failures do count: the database goes, events fail with it.
    await asyncio.to_thread(own_postgres.kill)
    for _ in range(5):
        await error(noisy, "room:list", {}, "SERVICE_UNAVAILABLE")
    down = await root.next_event("health:status", timeout=5.0)
    assert (down["data"]["status"], down["data"]["previous"]) == ("unhealthy", "healthy")
    # Back, but the failures of the last minute keep it degraded (beyond 5 %).
    await asyncio.to_thread(own_postgres.start)
    changed = await root.next_event("health:status", timeout=10.0)
    assert changed["data"]["status"] == "degraded"
    assert changed["data"]["previous"] == "unhealthy"
    assert any("error rate" in r for r in changed["data"]["reasons"])
    # Ticks after the errors report the same error rate health acted on.
    root.drain_events("metrics:update")
    metrics = await root.next_event("metrics:update", timeout=2.0)
    assert metrics["data"]["performance"]["errorRate"] > 0.05
    # Unchanged status: no repeat.
    await feed_ticks(root, 3)
    await assert_no_event(root, "health:status", ping=False)
    # A later admin is told the current status at once.
    late = await admin(gw, "mod", MODERATOR)
    assert (await late.next_event("health:status", timeout=1.0))["data"]["status"] == "degraded"


async def test_admin_namespace_is_served_by_admin_handler(gateway):
    # The route exists and refuses before upgrading nothing: a plain sanity check
    # that /ws/admin is wired to the admin handler with its role set.
    assert AdminHandler.allowed_roles == frozenset({"admin", "moderator"})
    root = await admin(gateway)
    assert (await root.emit("system:ping"))["serverTime"].endswith("Z")


# -- moderation notifications ------------------------------------------------------------


async def test_moderated_users_are_notified(gateway):
    alice, mallory = await gateway.connect("alice"), await gateway.connect("mallory")
    inbox = await gateway.connect("mallory", "notifications")
    await room_with(gateway, "general", alice, mallory)
    message = await send(mallory, "general", "spam")
    mod = await admin(gateway, "mod", MODERATOR)
    created = lambda title: lambda f: f["data"]["notification"]["title"] == title  # noqa: E731

    await mod.emit(
        "admin:mute",
        {"userId": "mallory", "roomId": "general", "durationSeconds": 60, "reason": "calm"},
    )
    muted = await inbox.next_event("notification:created", predicate=created("You were muted"))
    note = muted["data"]["notification"]
    assert (note["category"], note["type"]) == ("moderation", "warning")
    assert note["data"]["roomId"] == "general" and note["data"]["reason"] == "calm"

    await mod.emit("admin:delete_message", {"messageId": message["id"], "reason": "spam"})
    removed = await inbox.next_event("notification:created", predicate=created("Message removed"))
    note = removed["data"]["notification"]
    assert note["message"] == "Your message was removed: spam"
    assert note["data"] == {"roomId": "general", "messageId": message["id"], "reason": "spam"}

    root = await admin(gateway)
    await root.emit("admin:ban", {"userId": "mallory", "reason": "again", "durationSeconds": 60})

    def banned_notes() -> list[Any]:
        rows = Notification.select().where(
            (Notification.user_id == "mallory") & (Notification.title == "You were banned")
        )
        return [(r.category, r.priority, r.data["reason"]) for r in rows]

    found = await eventually(
        lambda: gateway.node.db.run("test", banned_notes), what="ban notification stored"
    )
    assert found == [("system", "high", "again")]


# -- moderators and admins ---------------------------------------------------------------


async def test_moderator_may_not_kick_or_mute_an_admin(gateway):
    alice = await gateway.connect("alice")
    boss = await gateway.connect("boss", roles=ADMIN)
    await room_with(gateway, "general", alice, boss)
    mod = await admin(gateway, "mod", MODERATOR)
    exc = await error(mod, "admin:kick", {"userId": "boss", "reason": "x"}, "FORBIDDEN")
    assert exc.details == {"action": "kick", "userId": "boss"}
    mute = {"userId": "boss", "roomId": "general", "durationSeconds": 60}
    exc = await error(mod, "admin:mute", mute, "FORBIDDEN")
    assert exc.details == {"action": "mute", "userId": "boss"}
    assert boss.connected
    assert await audit_rows(gateway, "kick") == [] and await audit_rows(gateway, "mute") == []
    # Offline, the admin is still known as one (roles stored at their last connect).
    await boss.aclose()
    await eventually(lambda: gateway.node.hub.user_connections("boss") == [])
    await error(mod, "admin:mute", mute, "FORBIDDEN")
    # Moderators still act on everyone else; the connection stays usable.
    await mod.emit("admin:mute", {**mute, "userId": "alice"})
    # An admin may mute and kick another admin.
    boss = await gateway.connect("boss", roles=ADMIN)
    root = await admin(gateway)
    await root.emit("admin:mute", mute)
    ack = await root.emit("admin:kick", {"userId": "boss", "reason": "ops"})
    assert ack["connectionsClosed"] == 1
    assert (await boss.wait_closed())[0] == 4403
    assert [r["actor"] for r in await audit_rows(gateway, "mute")] == ["mod", "root"]


async def test_kicked_and_banned_connections_are_counted_by_reason(gateway):
    registry = gateway.node.registry

    def closed(namespace: str, reason: str) -> float:
        labels = {"namespace": namespace, "reason": reason}
        return registry.get_sample_value("switchboard_connections_closed_total", labels) or 0.0

    chat, inbox = (
        await gateway.connect("mallory"),
        await gateway.connect("mallory", "notifications"),
    )
    root = await admin(gateway)
    await root.emit("admin:kick", {"userId": "mallory", "reason": "x"})
    await chat.wait_closed()
    await inbox.wait_closed()
    await eventually(
        lambda: closed("chat", "kicked") == 1 and closed("notifications", "kicked") == 1
    )
    chat = await gateway.connect("mallory")
    await root.emit("admin:ban", {"userId": "mallory", "reason": "y", "durationSeconds": 60})
    await chat.wait_closed()
    await eventually(lambda: closed("chat", "banned") == 1)
    # Neither was counted as a generic server close.
    assert closed("chat", "server") == 0


# -- audit log ---------------------------------------------------------------------------


async def test_admin_audit_pages_the_log_newest_first(gateway):
    alice, mallory = await gateway.connect("alice"), await gateway.connect("mallory")
    await room_with(gateway, "general", alice, mallory)
    root = await admin(gateway)
    mod = await admin(gateway, "mod", MODERATOR)
    mute = {"userId": "mallory", "roomId": "general", "durationSeconds": 60, "reason": "calm"}
    await mod.emit("admin:mute", mute)
    await root.emit("admin:broadcast", {"message": "maintenance at noon"})
    await root.emit("admin:kick", {"userId": "mallory", "reason": "flood"})
    await root.emit("admin:ban", {"userId": "mallory", "reason": "spam"})
    await root.emit("admin:unban", {"userId": "mallory"})

    page = await root.emit("admin:audit")
    assert page["total"] == 5
    assert [e["action"] for e in page["entries"]] == ["unban", "ban", "kick", "broadcast", "mute"]
    newest_mute = page["entries"][-1]
    assert set(newest_mute) == {"id", "actorId", "action", "target", "reason", "details",
                                "createdAt"}  # fmt: skip
    assert (newest_mute["actorId"], newest_mute["target"], newest_mute["reason"]) == (
        "mod", "user:mallory", "calm",
    )  # fmt: skip
    assert newest_mute["details"] == {"roomId": "general", "durationSeconds": 60}
    assert newest_mute["createdAt"].endswith("Z")

    page = await root.emit("admin:audit", {"limit": 2, "offset": 1})
    assert [e["action"] for e in page["entries"]] == ["ban", "kick"]
    assert page["total"] == 5
    page = await root.emit("admin:audit", {"action": "ban"})
    assert page["total"] == 1 and page["entries"][0]["reason"] == "spam"
    page = await root.emit("admin:audit", {"action": "delete_room"})
    assert page == {"entries": [], "total": 0}
    page = await root.emit("admin:audit", {"offset": 10})
    assert page == {"entries": [], "total": 5}


async def test_admin_audit_is_for_admins_and_validates(gateway):
    root = await admin(gateway)
    mod = await admin(gateway, "mod", MODERATOR)
    exc = await error(mod, "admin:audit", {}, "FORBIDDEN")
    assert exc.details == {"action": "read_audit"}
    for data, field in (
        ({"action": "explode"}, "action"), ({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
    ):  # fmt: skip
        exc = await error(root, "admin:audit", data, "VALIDATION_ERROR")
        assert field in exc.details
