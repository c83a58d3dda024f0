"""``/ws/notifications`` and the notification sources, as clients see them.

Every test runs a real gateway node and real WebSocket clients; notifications
are created the way the gateway creates them: through the node's
:class:`~server.services.notify.NotificationService` (what moderation and the server
API call) or by chatting (mentions, missed messages).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from models import notifications as store
from server.core import errors
from server.services.notify import RECENT_ON_CONNECT
from switchboard_client import Client, ClientError
from tests.support.client_checks import assert_no_event, background_done, settle
from tests.support.waiting import eventually
from tests.test_batch import held_database, one_admission_batch

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
    await background_done(gateway.node)
    await assert_no_event(carol, "notification:created")
    await assert_no_event(bob_chat, "notification:created")


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
    await background_done(gateway.node)
    await assert_no_event(mod, "notification:created")


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
    await assert_no_event(bob2, "notification:read")


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
    await background_done(gateway.node)
    await assert_no_event(bob, "notification:created")
    await assert_no_event(dave, "notification:created")
    await assert_no_event(alice_inbox, "notification:created")
    assert len([n for n in await stored(gateway, "bob") if n["category"] == "mention"]) == 1


async def test_no_mention_in_plain_text_or_emails(gateway):
    alice = await chat_room(gateway, "alice", "general")
    bob_chat = await gateway.connect("bob")
    await bob_chat.emit("room:join", {"roomId": "general"})
    bob = await inbox(gateway, "bob")
    await send(alice, "general", "mail bob@example.com about bob")
    await background_done(gateway.node)
    await assert_no_event(bob, "notification:created")


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
    await background_done(gateway.node)
    await assert_no_event(bob, "notification:created")
    assert [x["id"] for x in await stored(gateway, "bob")] == [n["id"]]
    await assert_no_event(carol, "notification:created")
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
    await background_done(gateway.node)
    await assert_no_event(bob, "notification:created")
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
    await background_done(gateway.node)
    await assert_no_event(bob)


async def test_a_former_member_gets_no_missed_notices(gateway):
    alice = await chat_room(gateway, "alice", "general", "bob")
    bob = await inbox(gateway, "bob")
    bob_chat = await gateway.connect("bob")
    await bob_chat.emit("room:join", {"roomId": "general"})
    await bob_chat.emit("room:leave", {"roomId": "general"})
    await bob_chat.aclose()
    await settle(alice, bob)
    await send(alice, "general", "after bob left")
    await background_done(gateway.node)
    await assert_no_event(bob, "notification:created")
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
    await background_done(gateway.node)
    await assert_no_event(alice_inbox, "notification:created")


# -- batched: initial state and the chat sources --------------------------------


def db_jobs(gw: Any, op: str) -> float:
    """Database jobs of operation ``op`` run so far (the db_duration histogram's count)."""
    value = gw.node.registry.get_sample_value(
        "switchboard_db_query_duration_seconds_count", {"operation": op}
    )
    return value or 0.0


def initial_batches(gw: Any) -> tuple[float, float]:
    """(initial-state reads, connections they answered) so far."""
    registry = gw.node.registry
    count = registry.get_sample_value("switchboard_notification_initial_batch_size_count")
    total = registry.get_sample_value("switchboard_notification_initial_batch_size_sum")
    return count or 0.0, total or 0.0


async def test_connections_arriving_together_share_one_initial_read(gateway):
    """Each gets exactly what the one-user read gives; the same user twice, the same."""
    gw = gateway
    for i in range(25):
        await notify(gw, "bob", title=f"b{i}", data={"i": i, "nested": {"k": [i]}})
    bobs = await stored(gw, "bob")
    for n in (bobs[0], bobs[3], bobs[24]):
        await gw.node.notifications.mark_read("bob", int(n["id"]))
    for i in range(3):
        await notify(gw, "carol", "bob", title=f"c{i}", action_url=f"/c/{i}", priority="high")
    await gw.node.notifications.mark_all_read("carol")
    await notify(gw, "dave", title="d", category="security", type="warning")
    users = ["bob", "carol", "dave", "erin", "bob"]  # erin has none; bob twice
    before = initial_batches(gw)

    clients = [gw.client(user, namespace="notifications") for user in users]
    async with one_admission_batch(gw, len(users)):
        connects = [asyncio.ensure_future(c.connect()) for c in clients]
    for connect in connects:
        await connect

    # The five connections were admitted together and read together: one read.
    assert initial_batches(gw) == (before[0] + 1, before[1] + len(users))
    for user, client in zip(users, clients, strict=True):
        count = (await client.next_event("notification:unread_count"))["data"]
        recent = (await client.next_event("notification:recent"))["data"]
        one = await gw.node.db.run("test.initial", store.initial_state, user, RECENT_ON_CONNECT)
        # Byte for byte, key order included.
        assert json.dumps(count) == json.dumps({"count": one["count"]}), user
        assert json.dumps(recent) == json.dumps({"notifications": one["notifications"]}), user
    assert [len(one["notifications"]) for one in await asyncio.gather(*(
        gw.node.db.run("t", store.initial_state, u, RECENT_ON_CONNECT) for u in users
    ))] == [20, 3, 1, 0, 20]  # fmt: skip

    # Alone (a read of one, which takes a plain LIMIT instead of the window): the same.
    alone = await gw.connect("bob", namespace="notifications")
    count = (await alone.next_event("notification:unread_count"))["data"]
    recent = (await alone.next_event("notification:recent"))["data"]
    one = await gw.node.db.run("test.initial", store.initial_state, "bob", RECENT_ON_CONNECT)
    assert json.dumps(count) == json.dumps({"count": one["count"]})
    assert json.dumps(recent) == json.dumps({"notifications": one["notifications"]})
    assert initial_batches(gw) == (before[0] + 2, before[1] + len(users) + 1)


def send_batches(gw: Any) -> float:
    return gw.node.registry.get_sample_value("switchboard_write_batch_size_count") or 0.0


async def test_a_burst_notifies_as_one_message_at_a_time_did_in_a_few_jobs(gateway_factory):
    """Three rooms, each with nine sending connections of two members and two away members.

    The burst commits in a few send batches (a connection's sends are taken
    one at a time); the missed-message notices and mentions come out as the
    per-message code made them, in at most one round of two database jobs
    per send batch.
    """
    gw = await gateway_factory(max_connections_per_user=10)
    rooms = ["r0", "r1", "r2"]
    owners: dict[str, Client] = {}
    senders: dict[str, list[tuple[str, Client]]] = {}
    for room_id in rooms:
        owners[room_id] = await chat_room(gw, f"{room_id}a", room_id, f"{room_id}x", f"{room_id}y")
        senders[room_id] = []
        for n in range(9):
            user = f"{room_id}{'a' if n < 4 else 'b'}"
            client = await gw.connect(user)
            await client.emit("room:join", {"roomId": room_id})
            senders[room_id].append((user, client))
    inboxes = {room_id: await inbox(gw, f"{room_id}x") for room_id in rooms}
    await settle(*owners.values(), *(c for pairs in senders.values() for _, c in pairs))
    await gw.node.tasks.drain(5.0)  # the joins' room_seen work
    jobs_before = {op: db_jobs(gw, op) for op in ("notification.audience", "notification.chat")}
    batches_before = send_batches(gw)

    def content(room_id: str, sender: str, i: int) -> str:
        if i % 5 == 0:  # the away x, and b (online; b's own mentions of b: not notified)
            return f"@{room_id}x and @{room_id.upper()}B, see {i}"
        if i % 7 == 0:  # the sender mentions themselves: never notified
            return f"note to @{sender}"
        return f"message {i}"

    async def two_sends(room_id: str, n: int, sender: str, client: Client) -> list[Any]:
        sends = [client.emit("message:send", {"roomId": room_id,
                                              "content": content(room_id, sender, 2 * n + k)})
                 for k in range(2)]  # fmt: skip
        return list(await asyncio.gather(*sends))

    async with held_database(gw, "message"):
        primer = asyncio.ensure_future(owners["r0"].emit(
            "message:send", {"roomId": "r0", "content": "primer"}))  # fmt: skip
        await eventually(lambda: send_batches(gw) == batches_before + 1, timeout=10,
                         what="the primer's batch waiting for the database")  # fmt: skip
        requests = [asyncio.ensure_future(two_sends(room_id, n, sender, client))
                    for room_id in rooms for n, (sender, client) in enumerate(senders[room_id])]
        # One send per connection is read at a time: each connection's first.
        await eventually(lambda: gw.node.sends.waiting == len(requests), timeout=10,
                         what="the burst waiting for the database")  # fmt: skip
    acks = [await primer] + [a for r in requests for a in await r]
    messages = [a["message"] for a in acks]
    batches = send_batches(gw) - batches_before
    assert len(messages) == 1 + 3 * 18 and batches <= 8
    await eventually(lambda: gw.node.notifications.backlog == 0, timeout=10,
                     what="the notification work done")  # fmt: skip

    for room_id in rooms:
        sent = [m for m in messages if m["roomId"] == room_id]
        seqs = sorted(m["seq"] for m in sent)
        mentions = sorted((m["id"], m["seq"]) for m in sent if m["content"].startswith("@"))
        for away in (f"{room_id}x", f"{room_id}y"):
            got = await stored(gw, away)
            [missed] = [n for n in got if n["category"] == "chat"]
            assert missed["data"] == {"roomId": room_id, "firstUnreadSeq": seqs[0],
                                      "lastSeq": seqs[-1], "count": len(sent)}  # fmt: skip
            assert missed["title"] == f"{len(sent)} new messages in #{room_id.title()}"
            assert missed["read"] is False
            mentioned = [n for n in got if n["category"] == "mention"]
            if away.endswith("y"):
                assert mentioned == []
                continue
            assert sorted((n["data"]["messageId"], n["data"]["seq"]) for n in mentioned) == mentions
            sender_of = {m["id"]: m["senderId"] for m in sent}
            for n in mentioned:
                assert n["title"] == f"{sender_of[n['data']['messageId']]} mentioned you in " \
                                     f"#{room_id.title()}"  # fmt: skip
        # The online b is mentioned too (mentions reach members online or not),
        # but not by themselves; nobody is notified of their own mention.
        b_mentions = [n for n in await stored(gw, f"{room_id}b") if n["category"] == "mention"]
        assert sorted(n["data"]["messageId"] for n in b_mentions) == sorted(
            m["id"] for m in sent if m["content"].startswith("@") and m["senderId"] != f"{room_id}b"
        )  # fmt: skip
        assert [n for n in await stored(gw, f"{room_id}a") if n["category"] == "mention"] == []
        # What the away member's notifications connection was told adds up.
        client = inboxes[room_id]
        await settle(client)
        page = await client.emit("notifications:get", {"limit": 100})
        assert len(page["notifications"]) == 1 + len(mentions)
        assert (await client.emit("notifications:get", {"unreadOnly": True, "limit": 100})
                )["notifications"] == page["notifications"]  # fmt: skip

    # At most one round per send batch, each one job for the rooms' members
    # and one for every notice (the per-message code ran two or more per message).
    jobs = {op: db_jobs(gw, op) - n for op, n in jobs_before.items()}
    assert 1 <= jobs["notification.audience"] <= batches
    assert 1 <= jobs["notification.chat"] <= batches
    assert gw.node.registry.get_sample_value("switchboard_notification_backlog") == 0


async def test_a_burst_over_the_cap_tells_the_client_exactly_what_is_kept(gateway_factory):
    """Mentions and a missed notice past the cap in one round: the pushed events add up."""
    gw = await gateway_factory(max_notifications_per_user=3)
    alice = await chat_room(gw, "alice", "general", "bob")
    devices = [await gw.connect("alice") for _ in range(4)]
    for device in devices:
        await device.emit("room:join", {"roomId": "general"})
    await notify(gw, "bob", title="old 0")
    [read] = await notify(gw, "bob", title="old 1")
    await notify(gw, "bob", title="old 2")
    await gw.node.notifications.mark_read("bob", int(read["id"]))
    bob = await gw.connect("bob", namespace="notifications")
    await bob.next_event("notification:unread_count")
    known = {n["id"] for n in (await bob.next_event("notification:recent"))["data"][
        "notifications"]}  # fmt: skip
    batches_before = send_batches(gw)

    async with held_database(gw, "message"):
        primer = asyncio.ensure_future(alice.emit(
            "message:send", {"roomId": "general", "content": "primer"}))  # fmt: skip
        await eventually(lambda: send_batches(gw) == batches_before + 1, timeout=10,
                         what="the primer's batch waiting for the database")  # fmt: skip
        burst = [asyncio.ensure_future(d.emit(
            "message:send", {"roomId": "general", "content": f"@bob number {i}"}))
            for i, d in enumerate(devices)]  # fmt: skip
        await eventually(lambda: gw.node.sends.waiting == len(burst), timeout=10,
                         what="the burst waiting for the database")  # fmt: skip
    await primer
    for f in burst:
        await f
    await eventually(lambda: gw.node.notifications.backlog == 0, timeout=10, what="notified")

    kept = await stored(gw, "bob")
    assert len(kept) == 3
    assert [n["category"] for n in kept] == ["mention"] * 3
    # Replaying what bob's connection was told gives what is stored.
    await bob.emit("system:ping")  # a barrier: every push so far has arrived
    unread = None
    for frame in bob.drain_events():
        data = frame["data"]
        if frame["event"] == "notification:created":
            assert data["notification"]["id"] not in known
            known.add(data["notification"]["id"])
        elif frame["event"] == "notification:updated":
            assert data["notification"]["id"] in known
        elif frame["event"] == "notification:deleted":
            known.remove(data["notificationId"])
        elif frame["event"] == "notification:unread_count":
            unread = data["count"]
    assert known == {n["id"] for n in kept}
    assert unread == 3
