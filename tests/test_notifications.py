"""``/ws/notifications`` and the notification sources, as clients see them.

Every test runs a real gateway node and real WebSocket clients; notifications
are created the way the gateway creates them: through the node's
:class:`~server.notify.NotificationService` (what moderation and the server
API call) or by chatting (mentions, missed messages).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from server import errors
from server.client import Client, ClientError

pytestmark = pytest.mark.asyncio

ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NOTIFICATION_KEYS = {
    "id", "type", "category", "title", "message", "data", "actionUrl", "priority", "read",
    "createdAt",
}  # fmt: skip


# -- helpers ------------------------------------------------------------------


async def inbox(gw: Any, user: str, **kw: Any) -> Client:
    """A notifications connection, its on-connect frames consumed."""
    client = await gw.connect(user, namespace="notifications", **kw)
    await client.next_event("notification:unread_count")
    await client.next_event("notification:recent")
    return client


async def notify(gw: Any, *users: str, **fields: Any) -> list[dict[str, Any]]:
    fields.setdefault("title", "Hello")
    created: list[dict[str, Any]] = await gw.node.notifications.notify(list(users), **fields)
    return created


async def created(client: Client) -> dict[str, Any]:
    frame = await client.next_event("notification:created")
    notification: dict[str, Any] = frame["data"]["notification"]
    return notification


async def count(client: Client) -> int:
    frame = await client.next_event("notification:unread_count")
    value: int = frame["data"]["count"]
    return value


async def error(client: Client, event: str, data: dict[str, Any], code: str) -> ClientError:
    with pytest.raises(ClientError) as info:
        await client.emit(event, data)
    assert info.value.code == code, info.value
    return info.value


async def settle(*clients: Client) -> None:
    """Barrier: everything sent to these clients so far has arrived; then forget it."""
    for client in clients:
        await client.emit("system:ping")
        client.drain_events()


async def chat_room(gw: Any, owner: str, room_id: str, *members: str) -> Client:
    """``owner`` creates and joins ``room_id``; ``members`` become members (no live socket)."""
    client = await gw.connect(owner)
    await client.emit("room:create", {"roomId": room_id, "name": room_id.title()})
    await client.emit("room:join", {"roomId": room_id})
    for name in members:
        other = await gw.connect(name)
        await other.emit("room:join", {"roomId": room_id})
        await other.aclose()
    return client


async def send(client: Client, room_id: str, content: str = "hi") -> dict[str, Any]:
    ack = await client.emit("message:send", {"roomId": room_id, "content": content})
    message: dict[str, Any] = ack["message"]
    return message


async def stored(gw: Any, user: str) -> list[dict[str, Any]]:
    page = await gw.node.notifications.page(user, unread_only=False, limit=100, before=None)
    notifications: list[dict[str, Any]] = page["notifications"]
    return notifications


# -- connect ------------------------------------------------------------------


async def test_connect_sends_unread_count_and_newest_twenty(gateway):
    for i in range(25):
        await notify(gateway, "bob", title=f"n{i}")
    await gateway.node.notifications.mark_read("bob", int((await stored(gateway, "bob"))[0]["id"]))
    bob = await gateway.connect("bob", namespace="notifications")
    assert (await bob.next_event("notification:unread_count"))["data"] == {"count": 24}
    recent = (await bob.next_event("notification:recent"))["data"]["notifications"]
    assert [n["title"] for n in recent] == [f"n{i}" for i in range(24, 4, -1)]
    assert recent[0]["read"] is True and recent[1]["read"] is False


async def test_connect_with_nothing_stored(gateway):
    bob = await gateway.connect("bob", namespace="notifications")
    assert (await bob.next_event("notification:unread_count"))["data"] == {"count": 0}
    assert (await bob.next_event("notification:recent"))["data"] == {"notifications": []}


async def test_any_role_may_connect_and_a_bad_token_may_not(gateway):
    await inbox(gateway, "svc", roles=("service",))
    client = gateway.client("bob", namespace="notifications", token="not-a-token", reconnect=False)
    with pytest.raises(ClientError) as info:
        await client.connect()
    assert info.value.code == "UNAUTHORIZED"


# -- notify -------------------------------------------------------------------


async def test_notify_pushes_to_every_connection_of_that_user_only(gateway):
    bob1, bob2, carol = (
        await inbox(gateway, "bob"),
        await inbox(gateway, "bob"),
        await inbox(gateway, "carol"),
    )
    bob_chat = await gateway.connect("bob")
    [made] = await notify(
        gateway, "bob", type="warning", category="moderation", title="Message removed",
        message="spam", data={"roomId": "general"}, action_url="/rooms/general",
        priority="high",
    )  # fmt: skip
    assert set(made) == NOTIFICATION_KEYS
    assert made["id"].isdigit() and ISO_RE.match(made["createdAt"])
    assert made == {
        **made, "type": "warning", "category": "moderation", "title": "Message removed",
        "message": "spam", "data": {"roomId": "general"}, "actionUrl": "/rooms/general",
        "priority": "high", "read": False,
    }  # fmt: skip
    for client in (bob1, bob2):
        assert await created(client) == made
        assert await count(client) == 1
    await carol.expect_no_event("notification:created", within=0.2)
    await bob_chat.expect_no_event("notification:created", within=0.01)


async def test_notify_defaults_and_many_users(gateway):
    bob, carol = await inbox(gateway, "bob"), await inbox(gateway, "carol")
    made = await notify(gateway, "bob", "carol", "bob", title="Maintenance at noon")
    assert len(made) == 2
    for client in (bob, carol):
        n = await created(client)
        assert (n["type"], n["category"], n["priority"], n["data"], n["actionUrl"]) == (
            "info", "system", "normal", {}, None,
        )  # fmt: skip
    assert await notify(gateway, title="nobody") == []


@pytest.mark.parametrize(
    "field,value", [("type", "shout"), ("category", "gossip"), ("priority", "urgent")]
)
async def test_notify_rejects_values_outside_the_enums(gateway, field, value):
    with pytest.raises(errors.ValidationFailed) as info:
        await notify(gateway, "bob", **{field: value})
    assert field in info.value.details
    assert await stored(gateway, "bob") == []


async def test_notify_admins_reaches_users_whose_stored_roles_include_admin(gateway):
    root = await inbox(gateway, "root", roles=("admin",))
    mod = await inbox(gateway, "mod", roles=("moderator", "user"))
    await inbox(gateway, "boss", roles=("admin", "user"))
    made = await gateway.node.notifications.notify_admins(
        title="Repeated auth failures", message="from 10.0.0.9"
    )
    expected = [n["id"] for u in ("root", "boss") for n in await stored(gateway, u)]
    assert sorted(n["id"] for n in made) == sorted(expected) and len(made) == 2
    n = await created(root)
    assert (n["type"], n["category"], n["priority"]) == ("warning", "security", "high")
    await mod.expect_no_event("notification:created", within=0.2)


# -- the per-user cap ---------------------------------------------------------


async def test_cap_evicts_oldest_read_first_then_oldest(gateway_factory):
    gw = await gateway_factory(max_notifications_per_user=3)
    bob = await inbox(gw, "bob")
    one, two, three = [(await notify(gw, "bob", title=t))[0] for t in ("one", "two", "three")]
    await bob.emit("notifications:read", {"notificationId": two["id"]})
    await settle(bob)
    await notify(gw, "bob", title="four")
    assert (await bob.next_event("notification:deleted"))["data"] == {"notificationId": two["id"]}
    assert [n["title"] for n in await stored(gw, "bob")] == ["four", "three", "one"]
    await notify(gw, "bob", title="five")
    assert (await bob.next_event("notification:deleted"))["data"] == {"notificationId": one["id"]}
    assert [n["title"] for n in await stored(gw, "bob")] == ["five", "four", "three"]
    assert three["id"] in {n["id"] for n in await stored(gw, "bob")}


# -- requests -----------------------------------------------------------------


async def test_get_pages_newest_first_with_a_cursor(gateway):
    for i in range(5):
        await notify(gateway, "bob", title=f"n{i}")
    bob = await inbox(gateway, "bob")
    first = await bob.emit("notifications:get", {"limit": 2})
    assert [n["title"] for n in first["notifications"]] == ["n4", "n3"]
    assert first["hasMore"] is True
    rest = await bob.emit(
        "notifications:get", {"limit": 10, "before": first["notifications"][-1]["id"]}
    )
    assert [n["title"] for n in rest["notifications"]] == ["n2", "n1", "n0"]
    assert rest["hasMore"] is False
    default = await bob.emit("notifications:get")
    assert len(default["notifications"]) == 5


async def test_get_unread_only(gateway):
    made = [(await notify(gateway, "bob", title=f"n{i}"))[0] for i in range(3)]
    bob = await inbox(gateway, "bob")
    await bob.emit("notifications:read", {"notificationId": made[1]["id"]})
    page = await bob.emit("notifications:get", {"unreadOnly": True})
    assert [n["title"] for n in page["notifications"]] == ["n2", "n0"]


async def test_get_validates(gateway):
    bob = await inbox(gateway, "bob")
    bad = [
        ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"before": "x1"}, "before"),
        ({"unreadOnly": "maybe"}, "unreadOnly"),
    ]  # fmt: skip
    for data, field in bad:
        exc = await error(bob, "notifications:get", data, "VALIDATION_ERROR")
        assert field in exc.details


async def test_read_pushes_to_all_the_users_connections(gateway):
    [n] = await notify(gateway, "bob")
    bob1, bob2 = await inbox(gateway, "bob"), await inbox(gateway, "bob")
    ack = await bob1.emit("notifications:read", {"notificationId": n["id"]})
    assert ack == {"notificationId": n["id"], "unreadCount": 0}
    for client in (bob1, bob2):
        assert (await client.next_event("notification:read"))["data"] == {"notificationId": n["id"]}
        assert await count(client) == 0
    # Reading again is harmless and quiet.
    await settle(bob1, bob2)
    assert (await bob1.emit("notifications:read", {"notificationId": n["id"]}))["unreadCount"] == 0
    await bob2.expect_no_event("notification:read", within=0.2)


async def test_read_and_delete_of_unknown_or_foreign_ids_are_not_found(gateway):
    [carols] = await notify(gateway, "carol")
    bob = await inbox(gateway, "bob")
    for event in ("notifications:read", "notifications:delete"):
        for nid in ("999999", carols["id"]):
            exc = await error(bob, event, {"notificationId": nid}, "NOTIFICATION_NOT_FOUND")
            assert exc.details == {"notificationId": nid}
        await error(bob, event, {}, "VALIDATION_ERROR")
        await error(bob, event, {"notificationId": "abc"}, "VALIDATION_ERROR")
    assert (await stored(gateway, "carol"))[0]["read"] is False


@pytest.mark.parametrize("bad_id", ["9223372036854775808", 2**63, "²", "1²", True])
async def test_ids_beyond_int64_or_not_ascii_digits_are_invalid(gateway, bad_id):
    # Regression (issue 12): "9223372036854775808" overflowed the database and
    # "²" passed str.isdigit() but not int(): both were INTERNAL_ERROR.
    bob = await inbox(gateway, "bob")
    for event in ("notifications:read", "notifications:delete"):
        exc = await error(bob, event, {"notificationId": bad_id}, "VALIDATION_ERROR")
        assert exc.details == {"notificationId": ["Not a valid notification id."]}
    exc = await error(bob, "notifications:get", {"before": bad_id}, "VALIDATION_ERROR")
    assert list(exc.details) == ["before"]
    page = await bob.emit("notifications:get", {"before": "9223372036854775807"})
    assert page == {"notifications": [], "hasMore": False}


async def test_read_all(gateway):
    for i in range(3):
        await notify(gateway, "bob", title=f"n{i}")
    bob1, bob2 = await inbox(gateway, "bob"), await inbox(gateway, "bob")
    assert await bob1.emit("notifications:read_all") == {"updated": 3, "unreadCount": 0}
    for client in (bob1, bob2):
        frame = await client.next_event("notification:read")
        assert frame["data"]["all"] is True and len(frame["data"]["notificationIds"]) == 3
        assert await count(client) == 0
    assert all(n["read"] for n in await stored(gateway, "bob"))


async def test_delete(gateway):
    [keep] = await notify(gateway, "bob", title="keep")
    [gone] = await notify(gateway, "bob", title="gone")
    bob1, bob2 = await inbox(gateway, "bob"), await inbox(gateway, "bob")
    ack = await bob1.emit("notifications:delete", {"notificationId": gone["id"]})
    assert ack == {"notificationId": gone["id"], "unreadCount": 1}
    for client in (bob1, bob2):
        frame = await client.next_event("notification:deleted")
        assert frame["data"] == {"notificationId": gone["id"]}
        assert await count(client) == 1
    assert [n["id"] for n in await stored(gateway, "bob")] == [keep["id"]]


# -- mentions -----------------------------------------------------------------


async def test_mentions_notify_each_mentioned_member_once_even_online(gateway):
    alice = await chat_room(gateway, "alice", "general", "carol")
    bob_chat = await gateway.connect("bob")
    await bob_chat.emit("room:join", {"roomId": "general"})
    await gateway.connect("dave")  # exists, but not a member
    bob, carol, dave, alice_inbox = (
        await inbox(gateway, "bob"), await inbox(gateway, "carol"), await inbox(gateway, "dave"),
        await inbox(gateway, "alice"),
    )  # fmt: skip
    message = await send(alice, "general", "hey @bob and @CAROL, @bob again; @dave @nobody @alice")
    mention = await created(bob)
    assert (mention["category"], mention["type"]) == ("mention", "info")
    assert mention["title"] == "alice mentioned you in #General"
    assert mention["message"] == message["content"]
    assert mention["data"] == {
        "roomId": "general", "messageId": message["id"], "seq": message["seq"],
        "senderId": "alice", "senderName": "alice",
    }  # fmt: skip
    # carol is away from chat: a missed-messages notice as well as the mention.
    got = [(await created(carol))["category"] for _ in range(2)]
    assert sorted(got) == ["chat", "mention"]
    await bob.expect_no_event("notification:created", within=0.2)
    await dave.expect_no_event("notification:created", within=0.01)
    await alice_inbox.expect_no_event("notification:created", within=0.01)
    assert len([n for n in await stored(gateway, "bob") if n["category"] == "mention"]) == 1


async def test_no_mention_in_plain_text_or_emails(gateway):
    alice = await chat_room(gateway, "alice", "general")
    bob_chat = await gateway.connect("bob")
    await bob_chat.emit("room:join", {"roomId": "general"})
    bob = await inbox(gateway, "bob")
    await send(alice, "general", "mail bob@example.com about bob")
    await bob.expect_no_event("notification:created", within=0.3)


# -- missed messages ----------------------------------------------------------


async def test_missed_messages_coalesce_into_one_notification_per_room(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    carol_chat = await gateway.connect("carol")  # online in chat: no missed notice
    await carol_chat.emit("room:join", {"roomId": "general"})
    bob, carol = await inbox(gateway, "bob"), await inbox(gateway, "carol")
    first = await send(alice, "general", "one")
    n = await created(bob)
    assert (n["type"], n["category"], n["title"]) == ("info", "chat", "1 new message in #General")
    assert n["data"] == {
        "roomId": "general", "firstUnreadSeq": first["seq"], "lastSeq": first["seq"], "count": 1,
    }  # fmt: skip
    assert await count(bob) == 1
    for i in range(4):
        await send(alice, "general", f"more {i}")
    # Bumps in a burst may fold together: fewer updates, never a wrong count.
    last = (await bob.next_event("notification:updated"))["data"]["notification"]
    while last["data"]["count"] < 5:
        last = (await bob.next_event("notification:updated"))["data"]["notification"]
    assert last["id"] == n["id"]
    assert last["title"] == "5 new messages in #General"
    assert last["data"]["count"] == 5 and last["data"]["firstUnreadSeq"] == first["seq"]
    await bob.expect_no_event("notification:created", within=0.2)
    assert [x["id"] for x in await stored(gateway, "bob")] == [n["id"]]
    await carol.expect_no_event("notification:created", within=0.01)
    assert await stored(gateway, "alice") == []


async def test_a_burst_from_two_senders_still_counts_every_message_once(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    carol = await gateway.connect("carol")
    await carol.emit("room:join", {"roomId": "general"})
    bob = await inbox(gateway, "bob")
    sends = [
        client.emit("message:send", {"roomId": "general", "content": f"m{i}"})
        for i in range(20) for client in (alice, carol)
    ]  # fmt: skip
    acks = await asyncio.gather(*sends)
    seqs = sorted(a["message"]["seq"] for a in acks)
    frame = await bob.next_event("notification:created")
    notice = frame["data"]["notification"]
    while notice["data"]["count"] < 40:
        notice = (await bob.next_event("notification:updated"))["data"]["notification"]
    assert notice["data"] == {
        "roomId": "general", "firstUnreadSeq": seqs[0], "lastSeq": seqs[-1], "count": 40,
    }  # fmt: skip
    assert notice["title"] == "40 new messages in #General"
    await bob.expect_no_event("notification:created", within=0.2)
    assert [n["data"]["count"] for n in await stored(gateway, "bob")] == [40]
    assert gateway.node.notifications._rooms == {}  # nothing left behind


async def test_room_read_clears_the_missed_notification(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    bob = await inbox(gateway, "bob")
    message = await send(alice, "general")
    n = await created(bob)
    bob_chat = await gateway.connect("bob")
    await bob_chat.emit("room:read", {"roomId": "general", "seq": message["seq"]})
    assert (await bob.next_event("notification:deleted"))["data"] == {"notificationId": n["id"]}
    assert await count(bob) == 1  # the created count, then...
    assert await count(bob) == 0
    assert await stored(gateway, "bob") == []


async def test_joining_clears_it_and_a_new_miss_starts_a_fresh_one(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    bob = await inbox(gateway, "bob")
    await send(alice, "general")
    n = await created(bob)
    bob_chat = await gateway.connect("bob")
    await bob_chat.emit("room:join", {"roomId": "general"})
    assert (await bob.next_event("notification:deleted"))["data"] == {"notificationId": n["id"]}
    await bob_chat.aclose()
    await settle(alice)
    third = await send(alice, "general", "again")
    fresh = await created(bob)
    # A created event, not an update: the cleared one is gone. (SQLite may reuse the id.)
    assert fresh["data"]["firstUnreadSeq"] == third["seq"]
    assert fresh["data"]["count"] == 1


async def test_a_read_missed_notification_is_replaced_not_revived(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    bob = await inbox(gateway, "bob")
    await send(alice, "general")
    n = await created(bob)
    await bob.emit("notifications:read", {"notificationId": n["id"]})
    await settle(bob)
    await send(alice, "general")
    assert (await bob.next_event("notification:deleted"))["data"] == {"notificationId": n["id"]}
    fresh = await created(bob)
    assert fresh["read"] is False and fresh["data"]["count"] == 1
    assert [x["id"] for x in await stored(gateway, "bob")] == [fresh["id"]]


async def test_duplicate_sends_notify_nothing_new(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    bob = await inbox(gateway, "bob")
    data = {"roomId": "general", "content": "hi @bob", "clientMsgId": "m1"}
    await alice.emit("message:send", data)
    await created(bob)
    await created(bob)
    await settle(bob)
    assert (await alice.emit("message:send", data))["duplicate"] is True
    await bob.expect_no_event(within=0.3)


async def test_a_former_member_gets_no_missed_notices(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    bob = await inbox(gateway, "bob")
    bob_chat = await gateway.connect("bob")
    await bob_chat.emit("room:join", {"roomId": "general"})
    await bob_chat.emit("room:leave", {"roomId": "general"})
    await bob_chat.aclose()
    await settle(alice, bob)
    await send(alice, "general", "after bob left")
    await bob.expect_no_event("notification:created", within=0.3)
    assert await stored(gateway, "bob") == []


async def test_room_deleted_tells_the_other_members_and_drops_missed_notices(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob", "carol")
    bob, alice_inbox = await inbox(gateway, "bob"), await inbox(gateway, "alice")
    await send(alice, "general")
    missed = await created(bob)
    await settle(bob)
    await alice.emit("room:delete", {"roomId": "general"})
    assert (await bob.next_event("notification:deleted"))["data"] == {
        "notificationId": missed["id"]
    }
    notice = await created(bob)
    assert (notice["type"], notice["category"], notice["title"]) == (
        "warning", "system", "Room #general was deleted",
    )  # fmt: skip
    assert notice["data"] == {"roomId": "general", "deletedBy": "alice"}
    assert [n["category"] for n in await stored(gateway, "carol")] == ["system"]
    await alice_inbox.expect_no_event("notification:created", within=0.2)
