"""The ``/ws/chat`` namespace, event by event, as clients see it.

Every test runs a real gateway node and real WebSocket clients. Nothing here
names a database: ``tests/test_chat_postgres.py`` re-runs this module with
``DATABASE = "postgres"`` (read by the ``gateway_factory`` fixture).

Conventions: ``alice`` usually owns the room; ``await settle(...)`` is a
barrier (a ping round trip per client, then the event buffers are emptied),
used after set-up so that join noise does not leak into the assertions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from typing import Any

import orjson
import peewee as pw
import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from models import RoomMute, sql_execute, sql_mark, sql_rows, utcnow
from models import chat as chat_db
from server.core.protocol import iso
from server.realtime.hub import Target
from switchboard_client import Client, ClientError
from tests.conftest import ROOMY_RATE_LIMITS
from tests.support.client_checks import (
    assert_no_event,
    background_done,
    barrier,
    nothing_arrived,
    settle,
)

pytestmark = pytest.mark.asyncio

ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ROOM_KEYS = {
    "id", "name", "type", "description", "topic", "ownerId", "hasPassword", "lastSeq",
    "epoch", "createdAt", "lastActivityAt",
}  # fmt: skip
MESSAGE_KEYS = {
    "id", "roomId", "seq", "senderId", "senderName", "content", "type", "parentMessageId",
    "attachments", "metadata", "reactions", "createdAt", "editedAt", "deleted",
}  # fmt: skip
MEMBER_KEYS = {"userId", "username", "displayName", "role", "lastReadSeq", "joinedAt", "status"}
USER_KEYS = {"userId", "username", "displayName"}


# -- helpers ------------------------------------------------------------------


async def production(gateway_factory: Any) -> Any:
    """A node in production mode, for the authorization rules."""
    return await gateway_factory(
        env="production", jwt_secret="x" * 40, allowed_origins="http://app.test",
        rate_limits=ROOMY_RATE_LIMITS,
    )  # fmt: skip


async def raw_acks(gw: Any, user: str, requests: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    """The answers to ``requests`` exactly as sent on the wire, ack numbers set to 0.

    A plain WebSocket connection, not :class:`Client`: the bytes are compared.
    """
    request = HTTPRequest(gw.url(), headers={"Authorization": f"Bearer {gw.token(user)}"})
    conn = await websocket_connect(request)
    try:
        welcome = orjson.loads(await conn.read_message())
        assert welcome["event"] == "system:welcome"
        answers = []
        for ack, (event, data) in enumerate(requests, 1):
            await conn.write_message(orjson.dumps({"event": event, "data": data, "ack": ack}))
            while True:
                raw = await conn.read_message()
                assert isinstance(raw, bytes | str), "connection closed"
                raw = raw.encode() if isinstance(raw, str) else raw
                if orjson.loads(raw).get("ack") == ack:
                    break
            prefix = b'{"ack":%d,' % ack
            assert raw.startswith(prefix), raw
            answers.append(b'{"ack":0,' + raw[len(prefix) :])
        return answers
    finally:
        conn.close()


async def users(gw: Any, *names: str, **kw: Any) -> list[Client]:
    """Connect one chat client per user name."""
    return [await gw.connect(name, **kw) for name in names]


async def room(owner: Client, room_id: str, *, join: bool = True, **fields: Any) -> dict[str, Any]:
    """Create a room owned by ``owner`` (and join it unless ``join=False``)."""
    data = {"roomId": room_id, "name": fields.pop("name", room_id.title()), **fields}
    created = (await owner.emit("room:create", data))["room"]
    if join:
        await owner.emit("room:join", {"roomId": room_id})
    return created


async def join(client: Client, room_id: str, **fields: Any) -> dict[str, Any]:
    return await client.emit("room:join", {"roomId": room_id, **fields})


async def room_with(
    gw: Any,
    room_id: str,
    owner: str,
    *members: str,
    outsiders: tuple[str, ...] = (),
    settled: bool = False,
    **fields: Any,
) -> list[Client]:
    """Connect ``owner``, ``members`` and ``outsiders`` (one client each, in that order);
    ``owner`` creates and joins ``room_id`` (``fields`` go to :func:`room`), then each
    member joins it. Returns the clients in the order named.

    With ``settled`` the owner and the members are settled, so the join noise does
    not reach the assertions; the outsiders never are (settle them yourself).
    """
    clients = await users(gw, owner, *members, *outsiders)
    in_the_room = clients[: 1 + len(members)]
    await room(in_the_room[0], room_id, **fields)
    for client in in_the_room[1:]:
        await join(client, room_id)
    if settled:
        await settle(*in_the_room)
    return clients


async def send(client: Client, room_id: str, content: str = "hi", **fields: Any) -> dict[str, Any]:
    """Send a message; return the stored message from the ack."""
    ack = await client.emit("message:send", {"roomId": room_id, "content": content, **fields})
    assert ack["duplicate"] is False
    return ack["message"]


async def error(client: Client, event: str, data: dict[str, Any], code: str) -> ClientError:
    """Emit ``event`` and assert it fails with ``code``; return the error."""
    with pytest.raises(ClientError) as info:
        await client.emit(event, data)
    assert info.value.code == code, info.value
    return info.value


async def invalid(client: Client, event: str, data: dict[str, Any], field: str) -> None:
    """Assert a VALIDATION_ERROR whose details name ``field`` (or ``field.N`` inside it)."""
    exc = await error(client, event, data, "VALIDATION_ERROR")
    assert any(key == field or key.startswith(field + ".") for key in exc.details), exc.details


async def history(client: Client, room_id: str, **fields: Any) -> dict[str, Any]:
    return await client.emit("room:get_messages", {"roomId": room_id, **fields})


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages]


def member(members: list[dict[str, Any]], user_id: str) -> dict[str, Any]:
    found = [m for m in members if m["userId"] == user_id]
    assert len(found) == 1, members
    return found[0]


def in_room(room_id: str) -> Any:
    return lambda frame: frame["data"].get("roomId") == room_id


def went_offline(user_id: str) -> Any:
    return lambda frame: frame["data"] == {"userId": user_id, "status": "offline"}


def new_in(room_id: str) -> Any:
    return lambda frame: frame["data"]["message"]["roomId"] == room_id


async def collect_new(
    client: Client, room_id: str, until_seq: int, already: list[int] = ()
) -> list[int]:
    """``message:new`` seqs of ``room_id`` until ``until_seq`` is known, then a quiet spell.

    ``already``: seqs the client has from elsewhere (a join's ``missed``).
    """
    got: list[int] = []
    while until_seq not in got and until_seq not in already:
        frame = await client.next_event("message:new", predicate=new_in(room_id))
        got.append(frame["data"]["message"]["seq"])
    # Anything already sent (a duplicate, say) is here after a ping round trip.
    await barrier(client)
    got += [f["data"]["message"]["seq"] for f in client.drain_events("message:new")]
    return got


def assert_message(message: dict[str, Any]) -> None:
    assert MESSAGE_KEYS <= set(message), message
    assert isinstance(message["id"], str) and message["id"].isdigit()
    assert ISO_RE.match(message["createdAt"])


async def test_plain_sql_raises_peewees_exceptions(gateway):
    """``models.sql_execute`` runs on the driver's cursor; its errors are still peewee's
    (``send_messages`` catches ``pw.IntegrityError``, the database layer peewee's
    connection errors). Here: a second (room, user) membership row."""
    alice = await gateway.connect("alice")
    await room(alice, "general")
    columns = '"room_id", "user_id", "role", "joined_at", "last_read_seq"'
    twice = f'INSERT INTO "room_member" ({columns}) SELECT {columns} FROM "room_member"'
    with pytest.raises(pw.IntegrityError):
        await gateway.node.db.run("test.twice", sql_execute, twice, [])
    members = await alice.emit("room:members", {"roomId": "general"})
    assert [m["userId"] for m in members["members"]] == ["alice"]



async def test_utcnow_is_the_naive_utc_now() -> None:
    """``models.utcnow`` (built from the clock's microseconds since the epoch): naive, UTC."""
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    now = utcnow()
    after = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert now.tzinfo is None and before <= now <= after

async def test_db_time_is_what_the_driver_stores(gateway):
    """``models.chat._db_time`` formats the send path's timestamps itself on SQLite:
    the text must be the driver's own for that datetime (with and without
    microseconds), or the send path's rows would sort apart from peewee's."""
    for value in (dt.datetime(2026, 11, 27, 18, 40, 41, 123456), dt.datetime(2026, 1, 2, 3, 4, 5)):
        ((stored,),) = await gateway.node.db.run(
            "test.time", sql_rows, f"SELECT {sql_mark()}", [value]
        )
        assert chat_db._db_time(value) == stored
        if isinstance(stored, str):  # SQLite: the wire's createdAt is cut from the text
            assert chat_db._iso_of_text(stored) == iso(value)

# -- room:create ----------------------------------------------------------------


async def test_create_public_room(gateway):
    alice = await gateway.connect("alice", token=gateway.token("alice", display_name="Alice L."))
    created = await alice.emit(
        "room:create",
        {"roomId": "general", "name": "General", "type": "public", "description": "Talk"},
    )
    r = created["room"]
    assert ROOM_KEYS <= set(r)
    assert r["id"] == "general" and r["name"] == "General" and r["type"] == "public"
    assert r["description"] == "Talk" and r["ownerId"] == "alice"
    assert r["hasPassword"] is False and r["lastSeq"] == 0 and r["memberCount"] == 1
    assert ISO_RE.match(r["createdAt"]) and ISO_RE.match(r["lastActivityAt"])
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert [(m["userId"], m["role"], m["displayName"]) for m in members] == [
        ("alice", "owner", "Alice L.")
    ]


async def test_create_room_defaults_generate_an_id(gateway):
    alice = await gateway.connect("alice")
    r = (await alice.emit("room:create", {"name": "Anything"}))["room"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", r["id"])
    assert r["type"] == "public" and r["description"] == "" and r["topic"] == ""
    other = (await alice.emit("room:create", {"name": "Anything"}))["room"]
    assert other["id"] != r["id"]


async def test_create_private_room_with_members(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    r = await room(alice, "secret", type="private", members=["bob", "carol", "bob", "alice"])
    assert r["type"] == "private" and r["memberCount"] == 3
    members = (await alice.emit("room:members", {"roomId": "secret"}))["members"]
    assert {m["userId"]: m["role"] for m in members} == {
        "alice": "owner", "bob": "member", "carol": "member",
    }  # fmt: skip
    # A listed member sees it in their list and may join without an invitation step.
    listed = (await bob.emit("room:list"))["rooms"]
    assert [x["id"] for x in listed] == ["secret"]
    assert (await join(bob, "secret"))["room"]["id"] == "secret"


async def test_create_room_with_password(gateway):
    alice = await gateway.connect("alice")
    r = await room(alice, "vault", password="s3cret!")
    assert r["hasPassword"] is True
    assert not {k for k in r if "password" in k.lower() and k != "hasPassword"}
    assert "s3cret!" not in orjson.dumps(r).decode()
    listed = (await alice.emit("room:list"))["rooms"]
    assert listed[0]["hasPassword"] is True


@pytest.mark.parametrize("bad_id", ["has space", "a/b", "x" * 65, "", "émoji", "a.b", "general\n"])
async def test_create_room_id_must_match_pattern(gateway, bad_id):
    alice = await gateway.connect("alice")
    await invalid(alice, "room:create", {"roomId": bad_id, "name": "X"}, "roomId")
    assert (await alice.emit("room:list"))["total"] == 0


async def test_create_room_validation(gateway):
    alice = await gateway.connect("alice")
    await invalid(alice, "room:create", {"roomId": "r"}, "name")
    await invalid(alice, "room:create", {"roomId": "r", "name": ""}, "name")
    await invalid(alice, "room:create", {"roomId": "r", "name": "x" * 101}, "name")
    await invalid(alice, "room:create", {"roomId": "r", "name": "R", "type": "secret"}, "type")
    await invalid(alice, "room:create", {"roomId": "r", "name": "R", "password": ""}, "password")
    await invalid(alice, "room:create", {"roomId": "r", "name": "R", "members": "bob"}, "members")
    ok = await alice.emit("room:create", {"roomId": "x" * 64, "name": "Longest id"})
    assert ok["room"]["id"] == "x" * 64


async def test_create_duplicate_room_id_conflicts(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general", name="First")
    exc = await error(bob, "room:create", {"roomId": "general", "name": "Second"}, "CONFLICT")
    assert exc.details.get("roomId") == "general"
    await error(alice, "room:create", {"roomId": "general", "name": "Again"}, "CONFLICT")
    listed = (await bob.emit("room:list"))["rooms"]
    assert [(x["id"], x["name"], x["ownerId"]) for x in listed] == [("general", "First", "alice")]


# -- room:list ------------------------------------------------------------------


async def test_list_shows_public_and_own_private_rooms(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "lobby", join=False)
    await room(alice, "alice-only", type="private", join=False)
    await room(bob, "bob-only", type="private", join=False)
    await room(bob, "bob-and-alice", type="private", members=["alice"], join=False)
    mine = await alice.emit("room:list")
    assert sorted(r["id"] for r in mine["rooms"]) == ["alice-only", "bob-and-alice", "lobby"]
    assert mine["total"] == 3
    theirs = await bob.emit("room:list")
    assert sorted(r["id"] for r in theirs["rooms"]) == ["bob-and-alice", "bob-only", "lobby"]
    assert theirs["total"] == 3
    counts = {r["id"]: r["memberCount"] for r in theirs["rooms"]}
    assert counts == {"bob-and-alice": 2, "bob-only": 1, "lobby": 1}
    carol = await gateway.connect("carol")
    assert [r["id"] for r in (await carol.emit("room:list"))["rooms"]] == ["lobby"]


async def test_list_filters_by_name(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "g1", name="General Chat", join=False)
    await room(alice, "g2", name="not-so-general", join=False)
    await room(alice, "r1", name="Random", join=False)
    found = await alice.emit("room:list", {"q": "GENERAL"})
    assert sorted(r["id"] for r in found["rooms"]) == ["g1", "g2"] and found["total"] == 2
    found = await alice.emit("room:list", {"q": "ndo"})
    assert [r["id"] for r in found["rooms"]] == ["r1"] and found["total"] == 1
    found = await alice.emit("room:list", {"q": "nothing like it"})
    assert found == {"rooms": [], "total": 0}


async def test_list_pages_with_limit_offset_and_total(gateway):
    alice = await gateway.connect("alice")
    for i in range(5):
        await room(alice, f"room{i}", join=i == 1)
    # Most recently active first: a message makes room1 the most recent.
    await send(alice, "room1")
    first = await alice.emit("room:list", {"limit": 2})
    assert [r["id"] for r in first["rooms"]] == ["room1", "room4"] and first["total"] == 5
    second = await alice.emit("room:list", {"limit": 2, "offset": 2})
    assert [r["id"] for r in second["rooms"]] == ["room3", "room2"] and second["total"] == 5
    last = await alice.emit("room:list", {"limit": 2, "offset": 4})
    assert [r["id"] for r in last["rooms"]] == ["room0"] and last["total"] == 5
    beyond = await alice.emit("room:list", {"limit": 2, "offset": 10})
    assert beyond == {"rooms": [], "total": 5}
    assert first["rooms"][0]["lastSeq"] == 1
    await invalid(alice, "room:list", {"limit": 101}, "limit")
    await invalid(alice, "room:list", {"limit": 0}, "limit")
    await invalid(alice, "room:list", {"offset": -1}, "offset")


# -- room:join --------------------------------------------------------------------


async def test_join_public_room(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    await settle(alice)
    joined = await join(bob, "general")
    assert joined["room"]["id"] == "general" and ROOM_KEYS <= set(joined["room"])
    assert joined["recovered"] is False and joined["missed"] == []
    assert [m["userId"] for m in joined["members"]] == ["alice", "bob"]
    assert all(MEMBER_KEYS <= set(m) for m in joined["members"])
    ev = await alice.next_event("room:user_joined")
    assert ev["data"] == {
        "roomId": "general", "user": {"userId": "bob", "username": "bob", "displayName": "bob"},
    }  # fmt: skip
    await assert_no_event(bob, "room:user_joined")
    # Joining is membership: bob now lists the room and is counted.
    listed = (await bob.emit("room:list"))["rooms"]
    assert listed[0]["memberCount"] == 2
    # A second join on the same connection is harmless and announces nothing.
    again = await join(bob, "general")
    assert [m["userId"] for m in again["members"]] == ["alice", "bob"]
    await assert_no_event(alice, "room:user_joined")


async def test_join_private_room(gateway):
    alice, bob, carol = await users(gateway, "alice", "bob", "carol")
    await room(alice, "secret", type="private", members=["bob"])
    exc = await error(carol, "room:join", {"roomId": "secret"}, "ROOM_ACCESS_DENIED")
    assert exc.details.get("roomId") == "secret"
    await assert_no_event(alice, "room:user_joined")
    assert (await join(bob, "secret"))["room"]["type"] == "private"
    ev = await alice.next_event("room:user_joined")
    assert ev["data"]["user"]["userId"] == "bob"
    # The outsider cannot send there either.
    await error(carol, "message:send", {"roomId": "secret", "content": "x"}, "NOT_IN_ROOM")


async def test_join_password_room(gateway):
    alice, bob, carol = await users(gateway, "alice", "bob", "carol")
    await room(alice, "vault", password="open sesame")
    await error(bob, "room:join", {"roomId": "vault"}, "ROOM_ACCESS_DENIED")
    await error(bob, "room:join", {"roomId": "vault", "password": "open says me"},
                "ROOM_ACCESS_DENIED")  # fmt: skip
    await assert_no_event(alice, "room:user_joined")
    await send(alice, "vault", "members only")
    joined = await join(bob, "vault", password="open sesame")
    assert joined["room"]["hasPassword"] is True
    await alice.next_event("room:user_joined")
    # Membership lasts: a new connection joins without the password...
    await bob.aclose()
    bob2 = await gateway.connect("bob")
    assert (await join(bob2, "vault"))["room"]["id"] == "vault"
    assert [m["content"] for m in (await history(bob2, "vault"))["messages"]] == ["members only"]
    # ...while non-members still need it.
    await error(carol, "room:join", {"roomId": "vault"}, "ROOM_ACCESS_DENIED")


async def test_join_unknown_room(gateway):
    alice = await gateway.connect("alice")
    exc = await error(alice, "room:join", {"roomId": "nowhere"}, "ROOM_NOT_FOUND")
    assert exc.details.get("roomId") == "nowhere"
    await invalid(alice, "room:join", {}, "roomId")
    await invalid(alice, "room:join", {"roomId": "bad id"}, "roomId")
    await invalid(alice, "room:join", {"roomId": "r", "sinceSeq": -1}, "sinceSeq")


async def test_members_carry_presence_status(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general", members=["carol"])
    await join(bob, "general")
    await bob.emit("user:status_update", {"status": "busy"})
    dave = await gateway.connect("dave")
    joined = await join(dave, "general")
    status = {m["userId"]: m["status"] for m in joined["members"]}
    assert status == {"alice": "online", "carol": "offline", "bob": "busy", "dave": "online"}
    assert member(joined["members"], "alice")["role"] == "owner"
    assert member(joined["members"], "carol")["role"] == "member"
    await bob.aclose()
    await alice.next_event("user:status_changed", predicate=went_offline("bob"))
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert member(members, "bob")["status"] == "offline"


# -- room:leave -------------------------------------------------------------------


async def test_leave_room(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True)
    assert await bob.emit("room:leave", {"roomId": "general"}) == {"roomId": "general"}
    ev = await alice.next_event("room:user_left")
    assert ev["data"]["roomId"] == "general" and ev["data"]["user"]["userId"] == "bob"
    assert ev["data"].get("reason") != "disconnect"
    await assert_no_event(bob, "room:user_left")
    # No more traffic for bob, no more membership, no more sending.
    await send(alice, "general", "after bob left")
    await assert_no_event(bob, "message:new")
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert [m["userId"] for m in members] == ["alice"]
    await error(bob, "message:send", {"roomId": "general", "content": "x"}, "NOT_IN_ROOM")
    await error(bob, "room:leave", {"roomId": "general"}, "NOT_IN_ROOM")


async def test_leave_requires_having_joined(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    exc = await error(bob, "room:leave", {"roomId": "general"}, "NOT_IN_ROOM")
    assert exc.details.get("roomId") == "general"
    await error(bob, "room:leave", {"roomId": "nowhere"}, "NOT_IN_ROOM")
    await assert_no_event(alice, "room:user_left")


async def test_owner_leaving_stays_a_member(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    await settle(bob)
    await alice.emit("room:leave", {"roomId": "general"})
    assert (await bob.next_event("room:user_left"))["data"]["user"]["userId"] == "alice"
    members = (await bob.emit("room:members", {"roomId": "general"}))["members"]
    assert member(members, "alice")["role"] == "owner"


async def test_disconnect_announces_user_left(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    bob_tab2 = await gateway.connect("bob")
    await room(alice, "general")
    await join(bob, "general")
    await join(bob_tab2, "general")
    await settle(alice)
    # Bob is still there on his other connection: nobody left.
    await bob.aclose()
    await background_done(gateway.node, bob)
    await assert_no_event(alice, "room:user_left")
    await bob_tab2.aclose()
    ev = await alice.next_event("room:user_left")
    assert ev["data"]["roomId"] == "general" and ev["data"]["reason"] == "disconnect"
    assert ev["data"]["user"]["userId"] == "bob"
    await alice.next_event("user:status_changed", predicate=went_offline("bob"))
    # Disconnecting is not leaving: bob is still a member.
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert member(members, "bob")["status"] == "offline"


# -- room:members -----------------------------------------------------------------


async def test_room_members(gateway):
    alice, _bob, carol = await room_with(gateway, "general", "alice", "bob", outsiders=("carol",))
    got = await carol.emit("room:members", {"roomId": "general"})
    assert got["roomId"] == "general"
    assert [(m["userId"], m["role"], m["status"]) for m in got["members"]] == [
        ("alice", "owner", "online"), ("bob", "member", "online"),
    ]  # fmt: skip
    for m in got["members"]:
        assert MEMBER_KEYS <= set(m) and ISO_RE.match(m["joinedAt"]) and m["lastReadSeq"] == 0
    await room(alice, "secret", type="private")
    await error(carol, "room:members", {"roomId": "secret"}, "ROOM_ACCESS_DENIED")
    await error(carol, "room:members", {"roomId": "nowhere"}, "ROOM_NOT_FOUND")
    await invalid(carol, "room:members", {}, "roomId")


# -- room:get_messages ----------------------------------------------------------------


async def test_history_pages_newest_first_with_before_seq(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    for i in range(1, 8):
        await send(alice if i % 2 else bob, "general", f"m{i}")
    page = await history(bob, "general", limit=3)
    assert seqs(page["messages"]) == [7, 6, 5] and page["hasMore"] is True
    assert [m["content"] for m in page["messages"]] == ["m7", "m6", "m5"]
    for m in page["messages"]:
        assert_message(m)
    page = await history(bob, "general", limit=3, beforeSeq=5)
    assert seqs(page["messages"]) == [4, 3, 2] and page["hasMore"] is True
    page = await history(bob, "general", limit=3, beforeSeq=2)
    assert seqs(page["messages"]) == [1] and page["hasMore"] is False
    page = await history(bob, "general", limit=3, beforeSeq=4)
    assert seqs(page["messages"]) == [3, 2, 1] and page["hasMore"] is False
    page = await history(bob, "general")  # default limit 50
    assert seqs(page["messages"]) == [7, 6, 5, 4, 3, 2, 1] and page["hasMore"] is False
    page = await history(bob, "general", limit=100, beforeSeq=1)
    assert page == {"messages": [], "hasMore": False}


async def test_history_pages_with_offset(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "general")
    for i in range(1, 8):
        await send(alice, "general", f"m{i}")
    page = await history(alice, "general", limit=3, offset=0)
    assert seqs(page["messages"]) == [7, 6, 5] and page["hasMore"] is True
    page = await history(alice, "general", limit=3, offset=3)
    assert seqs(page["messages"]) == [4, 3, 2] and page["hasMore"] is True
    page = await history(alice, "general", limit=3, offset=6)
    assert seqs(page["messages"]) == [1] and page["hasMore"] is False
    page = await history(alice, "general", limit=4, offset=3)
    assert seqs(page["messages"]) == [4, 3, 2, 1] and page["hasMore"] is False
    page = await history(alice, "general", limit=3, offset=7)
    assert page == {"messages": [], "hasMore": False}


async def test_history_errors(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    await room(alice, "secret", type="private")
    await send(alice, "secret", "private words")
    await invalid(alice, "room:get_messages", {"roomId": "general", "limit": 101}, "limit")
    await invalid(alice, "room:get_messages", {"roomId": "general", "limit": 0}, "limit")
    await invalid(alice, "room:get_messages", {"roomId": "general", "beforeSeq": 0}, "beforeSeq")
    exc = await error(
        alice, "room:get_messages", {"roomId": "general", "beforeSeq": 5, "offset": 1},
        "VALIDATION_ERROR",
    )  # fmt: skip
    assert exc.details
    exc = await error(bob, "room:get_messages", {"roomId": "secret"}, "ROOM_ACCESS_DENIED")
    assert exc.details.get("roomId") == "secret"
    await error(bob, "room:get_messages", {"roomId": "nowhere"}, "ROOM_NOT_FOUND")
    assert (await history(alice, "general", limit=100))["messages"] == []


async def test_history_pages_forward_from_a_lower_bound(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "general")
    for i in range(1, 8):
        await send(alice, "general", f"m{i}")
    for bounds, want, more in (
        # A lower bound alone: the oldest of the window, still newest first;
        # hasMore says newer ones remain.
        ({"limit": 3, "afterSeq": 2}, [5, 4, 3], True),
        ({"limit": 3, "afterSeq": 5}, [7, 6], False),
        ({"limit": 3, "afterSeq": 0}, [3, 2, 1], True),
        ({"afterSeq": 7}, [], False),
        # Both bounds: the newest of the window; hasMore says older ones remain in it.
        ({"limit": 2, "afterSeq": 2, "beforeSeq": 6}, [5, 4], True),
        ({"limit": 2, "afterSeq": 3, "beforeSeq": 6}, [5, 4], False),
        ({"afterSeq": 4, "beforeSeq": 5}, [], False),
    ):
        page = await history(alice, "general", **bounds)
        assert (seqs(page["messages"]), page["hasMore"]) == (want, more), bounds


def shifted(instant: str, **offset: int) -> str:
    """``instant`` (``...Z``) written in another timezone, or moved by ``microseconds``."""
    moment = dt.datetime.fromisoformat(instant.replace("Z", "+00:00"))
    moment += dt.timedelta(microseconds=offset.pop("microseconds", 0))
    return moment.astimezone(dt.timezone(dt.timedelta(**offset))).isoformat()


async def test_history_by_date(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "general")
    sent = [await send(alice, "general", "m")]
    # Until the messages span three distinct milliseconds (no sleeping: a send takes time).
    while len({m["createdAt"] for m in sent}) < 3:
        sent.append(await send(alice, "general", "m"))
    times = sorted({m["createdAt"] for m in sent})  # ISO-8601 Z strings sort by time

    def older(t: str) -> list[int]:
        return [m["seq"] for m in reversed(sent) if m["createdAt"] < t]

    def newer(t: str) -> list[int]:
        return [m["seq"] for m in sent if m["createdAt"] > t]

    for t in times:
        # A message's own createdAt excludes it, on either side.
        page = await history(alice, "general", before=t)
        assert seqs(page["messages"]) == older(t) and page["hasMore"] is False
        page = await history(alice, "general", after=t, limit=2)
        assert seqs(page["messages"]) == newer(t)[:2][::-1]
        assert page["hasMore"] is (len(newer(t)) > 2)
    middle = times[1]
    assert older(middle) and newer(middle)
    # The same instant in another timezone is the same bound.
    for offset in ({"hours": 5, "minutes": 30}, {"hours": -8}):
        page = await history(alice, "general", before=shifted(middle, **offset))
        assert seqs(page["messages"]) == older(middle)
    # Within the millisecond after createdAt the message is before the bound.
    page = await history(alice, "general", before=shifted(middle, microseconds=500))
    assert seqs(page["messages"]) == [m["seq"] for m in reversed(sent) if m["createdAt"] <= middle]
    # Dates and seqs bound together; the tightest bound wins.
    window = older(times[-1])
    page = await history(alice, "general", before=times[-1], afterSeq=window[-1], limit=1)
    assert seqs(page["messages"]) == window[:1] and page["hasMore"] is (len(window) > 2)
    page = await history(alice, "general", before=times[-1], beforeSeq=2)
    assert seqs(page["messages"]) == [1]
    # Dates beyond every message.
    all_seqs = [m["seq"] for m in reversed(sent)]
    assert await history(alice, "general", before="2000-01-01T00:00:00Z") == {
        "messages": [], "hasMore": False,
    }  # fmt: skip
    page = await history(alice, "general", before="9999-12-31T23:59:59.999999Z")
    assert seqs(page["messages"]) == all_seqs
    page = await history(alice, "general", after="2000-01-01T00:00:00+00:00", limit=2)
    assert seqs(page["messages"]) == [2, 1] and page["hasMore"] is True
    page = await history(alice, "general", after="9999-12-31T23:59:59.999999Z")
    assert page == {"messages": [], "hasMore": False}


async def test_history_refuses_bad_and_unknown_fields(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "general")
    await send(alice, "general")
    general = {"roomId": "general"}
    for bad, field in (
        ({"before": "2026-01-01T00:00:00"}, "before"),  # naive: whose midnight?
        ({"after": "2026-01-01 10:00"}, "after"),
        ({"before": "yesterday"}, "before"),
        ({"after": 1764000000}, "after"),
        ({"before": "1999-12-31T23:59:59Z"}, "before"),
        ({"afterSeq": -1}, "afterSeq"),
        ({"afterSeq": "3"}, None),  # digits in a string are a number: no error
        ({"befor": "2026-01-01T00:00:00Z"}, "befor"),
        ({"beforeSeq": 3, "sinceSeq": 1}, "sinceSeq"),
        ({"before": "2026-01-01T00:00:00Z", "offset": 1}, "before"),
        ({"afterSeq": 1, "offset": 1}, "afterSeq"),
        ({"after": "2026-01-01T00:00:00Z", "offset": 0}, "after"),
    ):
        if field is None:
            assert (await history(alice, "general", **bad))["messages"] == []
            continue
        exc = await error(alice, "room:get_messages", {**general, **bad}, "VALIDATION_ERROR")
        assert list(exc.details) == [field], (bad, exc.details)


# -- room:read ----------------------------------------------------------------------


async def test_read_marker(gateway):
    alice, bob, carol = await room_with(gateway, "general", "alice", "bob", outsiders=("carol",))
    for i in range(3):
        await send(alice, "general", f"m{i}")
    assert await bob.emit("room:read", {"roomId": "general", "seq": 2}) == {
        "roomId": "general", "lastReadSeq": 2, "unread": 1,
    }  # fmt: skip
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert member(members, "bob")["lastReadSeq"] == 2
    assert member(members, "alice")["lastReadSeq"] == 0
    # Clamped to the last seq...
    ack = await bob.emit("room:read", {"roomId": "general", "seq": 99})
    assert ack["lastReadSeq"] == 3 and ack["unread"] == 0
    # ...and it never moves back.
    ack = await bob.emit("room:read", {"roomId": "general", "seq": 1})
    assert ack["lastReadSeq"] == 3 and ack["unread"] == 0
    members = (await bob.emit("room:members", {"roomId": "general"}))["members"]
    assert member(members, "bob")["lastReadSeq"] == 3
    await send(alice, "general", "one more")
    ack = await bob.emit("room:read", {"roomId": "general", "seq": 0})
    assert ack["lastReadSeq"] == 3 and ack["unread"] == 1
    await invalid(bob, "room:read", {"roomId": "general"}, "seq")
    await invalid(bob, "room:read", {"roomId": "general", "seq": -1}, "seq")
    await room(alice, "secret", type="private")
    await error(carol, "room:read", {"roomId": "secret", "seq": 1}, "ROOM_ACCESS_DENIED")
    await error(carol, "room:read", {"roomId": "nowhere", "seq": 1}, "ROOM_NOT_FOUND")


# -- room:delete ----------------------------------------------------------------------


async def test_owner_deletes_room(gateway):
    alice, bob, carol = await room_with(gateway, "general", "alice", "bob", outsiders=("carol",))
    await send(bob, "general", "soon gone")
    await settle(alice, bob)
    assert await alice.emit("room:delete", {"roomId": "general"}) == {"roomId": "general"}
    for client in (alice, bob):
        ev = await client.next_event("room:deleted")
        assert ev["data"] == {"roomId": "general", "deletedBy": "alice"}
    await assert_no_event(carol, "room:deleted")
    for client in (alice, bob, carol):
        await error(client, "room:join", {"roomId": "general"}, "ROOM_NOT_FOUND")
    await error(bob, "message:send", {"roomId": "general", "content": "x"}, "NOT_IN_ROOM")
    await error(bob, "room:get_messages", {"roomId": "general"}, "ROOM_NOT_FOUND")
    await error(bob, "room:members", {"roomId": "general"}, "ROOM_NOT_FOUND")
    await error(alice, "room:delete", {"roomId": "general"}, "ROOM_NOT_FOUND")
    assert (await bob.emit("room:list"))["total"] == 0


async def test_room_deleted_reaches_members_without_the_room_open(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    bob_phone = await gateway.connect("bob")  # a second device that never joined
    await alice.emit("room:delete", {"roomId": "general"})
    ev = await bob_phone.next_event("room:deleted")
    assert ev["data"] == {"roomId": "general", "deletedBy": "alice"}
    # Member and in the room: still exactly one copy per connection.
    await bob.next_event("room:deleted")
    await assert_no_event(bob, "room:deleted")


async def test_only_owner_or_admin_delete_rooms(gateway_factory):
    gw = await production(gateway_factory)
    alice, bob = await users(gw, "alice", "bob")
    mod = await gw.connect("mod", roles=("moderator",))
    root = await gw.connect("root", roles=("admin",))
    await room(alice, "general")
    await join(bob, "general")
    await join(mod, "general")
    await settle(alice, bob, mod)
    # A member and a moderator (token role, even in the room) may not.
    for client in (bob, mod):
        exc = await error(client, "room:delete", {"roomId": "general"}, "FORBIDDEN")
        assert client.connected and "roomId" not in exc.details
    await nothing_arrived((alice, bob, mod), "room:deleted")
    assert (await send(bob, "general", "still here"))["seq"] == 1
    # An admin may, without being a member.
    assert await root.emit("room:delete", {"roomId": "general"}) == {"roomId": "general"}
    for client in (alice, bob, mod):
        ev = await client.next_event("room:deleted", predicate=in_room("general"))
        assert ev["data"] == {"roomId": "general", "deletedBy": "root"}
    # And the owner, of their own room.
    await room(bob, "bobs")
    assert await bob.emit("room:delete", {"roomId": "bobs"}) == {"roomId": "bobs"}
    await error(bob, "room:delete", {"roomId": "nowhere"}, "ROOM_NOT_FOUND")


# -- room:update ----------------------------------------------------------------------


def no_secret(value: Any, password: str) -> None:
    """Neither the password nor its hash (nor a key naming one) is in ``value``."""
    text = orjson.dumps(value).decode()
    assert password not in text and "pbkdf2" not in text and "passwordHash" not in text, text


async def test_owner_updates_room_and_every_member_hears_it_once(gateway):
    alice, bob, carol = await room_with(
        gateway, "general", "alice", "bob", outsiders=("carol",), description="Talk"
    )
    bob_phone = await gateway.connect("bob")  # a member's device that never joined
    await settle(alice, bob, carol)
    ack = await alice.emit(
        "room:update", {"roomId": "general", "name": "Lobby", "topic": "Release day"}
    )
    r = ack["room"]
    assert ROOM_KEYS <= set(r) and r["memberCount"] == 2
    assert (r["id"], r["name"], r["topic"], r["description"], r["type"]) == (
        "general", "Lobby", "Release day", "Talk", "public",
    )  # fmt: skip
    for client in (alice, bob, bob_phone):
        ev = await client.next_event("room:updated")
        assert ev["data"] == {
            "roomId": "general", "room": r, "changes": ["name", "topic"], "by": "alice",
        }  # fmt: skip
    # Once per connection (bob is a member and in the room); not to non-members.
    await nothing_arrived((alice, bob, bob_phone, carol), "room:updated")
    # Everyone reads the new state.
    joined = await join(carol, "general")
    assert (joined["room"]["name"], joined["room"]["topic"]) == ("Lobby", "Release day")
    [listed] = (await carol.emit("room:list"))["rooms"]
    assert listed["name"] == "Lobby"


async def test_room_create_takes_a_topic(gateway):
    alice = await gateway.connect("alice")
    r = await room(alice, "general", topic="Welcome")
    assert r["topic"] == "Welcome"
    await invalid(alice, "room:create", {"roomId": "r", "name": "R", "topic": "x" * 201}, "topic")


async def test_update_that_changes_nothing_tells_nobody(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True, name="General")
    ack = await alice.emit("room:update", {"roomId": "general", "name": "General", "topic": ""})
    assert ack["room"]["name"] == "General"
    await nothing_arrived((alice, bob), "room:updated")


async def test_password_set_and_removed_by_update(gateway):
    alice, bob, dave, erin = await room_with(
        gateway, "general", "alice", "bob", outsiders=("dave", "erin"), settled=True
    )
    ack = await alice.emit("room:update", {"roomId": "general", "password": "s3cret!"})
    assert ack["room"]["hasPassword"] is True
    ev = await bob.next_event("room:updated")
    assert ev["data"]["changes"] == ["password"] and ev["data"]["room"]["hasPassword"] is True
    no_secret(ack, "s3cret!")
    no_secret(ev, "s3cret!")
    # Members stay members; newcomers need the password now.
    await send(bob, "general", "still here")
    assert (await join(bob, "general"))["room"]["hasPassword"] is True
    await error(dave, "room:join", {"roomId": "general"}, "ROOM_ACCESS_DENIED")
    await error(dave, "room:join", {"roomId": "general", "password": "wrong"}, "ROOM_ACCESS_DENIED")
    await join(dave, "general", password="s3cret!")
    # A new password replaces the old one (a change even though one was set).
    await alice.emit("room:update", {"roomId": "general", "password": "n3w!"})
    old_password = {"roomId": "general", "password": "s3cret!"}
    await error(erin, "room:join", old_password, "ROOM_ACCESS_DENIED")
    await settle(alice, bob)
    # null removes it.
    ack = await alice.emit("room:update", {"roomId": "general", "password": None})
    assert ack["room"]["hasPassword"] is False
    assert (await bob.next_event("room:updated"))["data"]["changes"] == ["password"]
    await join(erin, "general")
    await settle(alice, bob)
    # Removing a password the room no longer has changes nothing.
    await alice.emit("room:update", {"roomId": "general", "password": None})
    await nothing_arrived((alice, bob), "room:updated")


async def test_making_a_room_private_keeps_its_members(gateway):
    alice, bob, carol = await room_with(
        gateway, "general", "alice", "bob", outsiders=("carol",), settled=True
    )
    ack = await alice.emit("room:update", {"roomId": "general", "type": "private"})
    assert ack["room"]["type"] == "private"
    assert (await bob.next_event("room:updated"))["data"]["changes"] == ["type"]
    heard = await send(bob, "general", "not kicked")
    assert (await alice.next_event("message:new"))["data"]["message"]["id"] == heard["id"]
    await error(carol, "room:join", {"roomId": "general"}, "ROOM_ACCESS_DENIED")
    assert (await carol.emit("room:list"))["total"] == 0


async def test_only_owner_or_admin_update_rooms(gateway_factory):
    gw = await production(gateway_factory)
    alice, bob = await users(gw, "alice", "bob")
    mod = await gw.connect("mod", roles=("moderator",))
    root = await gw.connect("root", roles=("admin",))
    auditor = await gw.connect("root", namespace="admin", roles=("admin",))
    await room(alice, "general")
    await join(bob, "general")
    await join(mod, "general")
    await settle(alice, bob, mod)
    # A member and a moderator (token role, even in the room) may not, as for deletion.
    for client in (bob, mod):
        exc = await error(client, "room:update", {"roomId": "general", "name": "Mine"}, "FORBIDDEN")
        assert client.connected and "roomId" not in exc.details
    await nothing_arrived((alice, bob, mod), "room:updated")
    # The owner may; that is not moderation, so it is not audited.
    await alice.emit("room:update", {"roomId": "general", "topic": "Owner's"})
    await settle(alice, bob, mod)
    assert (await auditor.emit("admin:audit", {"action": "update_room"}))["total"] == 0
    # An admin may, without being a member, and it is audited.
    ack = await root.emit("room:update", {"roomId": "general", "name": "Renamed"})
    for client in (alice, bob, mod):
        ev = await client.next_event("room:updated", predicate=in_room("general"))
        assert ev["data"] == {
            "roomId": "general", "room": ack["room"], "changes": ["name"], "by": "root",
        }  # fmt: skip
    await nothing_arrived((root,), "room:updated")
    page = await auditor.emit("admin:audit", {"action": "update_room"})
    assert [(e["actorId"], e["target"], e["details"]) for e in page["entries"]] == [
        ("root", "room:general", {"changes": ["name"]})
    ]
    await error(root, "room:update", {"roomId": "nowhere", "name": "X"}, "ROOM_NOT_FOUND")
    await alice.emit("room:delete", {"roomId": "general"})
    await error(alice, "room:update", {"roomId": "general", "name": "X"}, "ROOM_NOT_FOUND")


async def test_update_validation(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True)
    ref = {"roomId": "general"}
    await invalid(alice, "room:update", ref, "_schema")
    await invalid(alice, "room:update", {**ref, "unknown": 1}, "_schema")
    await invalid(alice, "room:update", {"name": "X"}, "roomId")
    await invalid(alice, "room:update", {"roomId": "a b", "name": "X"}, "roomId")
    for field, bad in [
        ("name", ""), ("name", "x" * 101), ("name", None), ("name", 7),
        ("topic", "x" * 201), ("topic", None), ("description", "x" * 501),
        ("type", "secret"), ("type", None), ("password", ""), ("password", "x" * 129),
    ]:  # fmt: skip
        await invalid(alice, "room:update", {**ref, "name": "Fine", field: bad}, field)
    await nothing_arrived((alice, bob), "room:updated")
    # The bounds are room:create's, inclusive.
    ack = await alice.emit("room:update", {
        **ref, "name": "x" * 100, "topic": "t" * 200, "description": "d" * 500,
        "password": "p" * 128,
    })  # fmt: skip
    assert (len(ack["room"]["name"]), len(ack["room"]["topic"])) == (100, 200)


# -- message:send --------------------------------------------------------------------


async def test_send_message(gateway):
    alice = await gateway.connect("alice", token=gateway.token("alice", display_name="Alice L."))
    bob, carol = await users(gateway, "bob", "carol")
    await room(alice, "general")
    await join(bob, "general")
    await settle(alice, bob)
    ack = await alice.emit("message:send", {"roomId": "general", "content": "hello"})
    m = ack["message"]
    assert ack["duplicate"] is False
    assert_message(m)
    assert m["roomId"] == "general" and m["seq"] == 1 and m["senderId"] == "alice"
    assert m["senderName"] == "Alice L." and m["content"] == "hello" and m["type"] == "text"
    assert m["parentMessageId"] is None and m["attachments"] == [] and m["metadata"] == {}
    assert m["reactions"] == {} and m["editedAt"] is None and m["deleted"] is False
    ev = await bob.next_event("message:new")
    assert ev["data"] == {"message": m}
    await assert_no_event(alice, "message:new")
    await assert_no_event(carol, "message:new")
    assert (await history(bob, "general"))["messages"] == [m]


async def test_a_lone_sends_ack_is_written_before_its_broadcast_is_queued(gateway):
    """The ack leaves once the commit is back; the publish (to the others) follows it,
    and the counting follows the publish's write."""
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True)
    hub = gateway.node.hub
    (sender,) = hub.user_connections("alice")
    written_at_publish: list[int] = []
    publish = hub.publish

    def spy(target: Target, event: str, data: dict[str, Any], **kw: Any) -> int:
        if event == "message:new":
            written_at_publish.append(sender.outbound.frames_out)
        return publish(target, event, data, **kw)

    hub.publish = spy
    registry = gateway.node.registry
    counted_at_flush: list[float | None] = []
    flush = hub.flush

    def flush_spy() -> int:
        written = flush()
        counted_at_flush.append(registry.get_sample_value("switchboard_messages_persisted_total"))
        return written

    hub.flush = flush_spy
    before = sender.outbound.frames_out
    m = await send(alice, "general")
    assert (await bob.next_event("message:new"))["data"]["message"] == m
    assert written_at_publish == [before + 1]  # the ack, already handed to the socket
    # The counting (and the notification work) follow the room's write: once the
    # ack is back they are done, but the flush that wrote bob's frame came first.
    assert counted_at_flush == [0.0]
    assert registry.get_sample_value("switchboard_messages_persisted_total") == 1.0
    await assert_no_event(alice, "message:new")


async def test_a_sends_ack_and_broadcast_leave_before_the_senders_task_resumes(gateway):
    """The ack is written in the loop iteration that learns of the commit (the batcher's
    on_result), not an iteration later when the handler's task wakes; the room's
    broadcast follows it there. The handler, once awake, does not ack again."""
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True)
    hub = gateway.node.hub
    (sender,) = hub.user_connections("alice")
    (member,) = hub.user_connections("bob")
    sends = gateway.node.sends
    submit = sends.submit
    at_resume: list[tuple[int, int]] = []

    async def spy(*args: Any) -> Any:
        sent = await submit(*args)
        at_resume.append((sender.outbound.frames_out, member.outbound.frames_out))
        return sent

    sends.submit = spy
    registry = gateway.node.registry
    labels = {"namespace": "chat", "event": "message:send"}
    latencies = len(gateway.node.stats.latency)
    before = (sender.outbound.frames_out, member.outbound.frames_out)
    m = await send(alice, "general")
    assert (await bob.next_event("message:new"))["data"]["message"] == m
    # The ack and bob's message:new were both handed to the sockets already.
    assert at_resume == [(before[0] + 1, before[1] + 1)]
    await barrier(alice)
    assert sender.outbound.frames_out == before[0] + 2  # the ack once, and the ping's
    # Counted once, at the ack (the stats' latencies: the send's and the ping's).
    assert registry.get_sample_value("switchboard_event_duration_seconds_count", labels) == 1
    assert len(gateway.node.stats.latency) == latencies + 2
    assert registry.get_sample_value("switchboard_messages_persisted_total") == 1


async def test_a_send_without_an_ack_id_is_stored_and_broadcast_unacked(gateway):
    alice, bob, muted = await room_with(gateway, "general", "alice", "bob", "muted")
    admin = await gateway.connect("mod", "admin", roles=("admin",))
    await admin.emit("admin:mute", {"userId": "muted", "roomId": "general",
                                    "durationSeconds": 600})  # fmt: skip
    await settle(alice, bob, muted)
    hub = gateway.node.hub
    (sender,) = hub.user_connections("alice")
    before = sender.outbound.frames_out
    await alice.send("message:send", {"roomId": "general", "content": "no ack"})
    ev = await bob.next_event("message:new")
    assert ev["data"]["message"]["content"] == "no ack"
    await barrier(alice)
    assert sender.outbound.frames_out == before + 1  # the ping's ack only
    await assert_no_event(alice, ping=False)
    # A send refused in its batch (MUTED) answers system:error naming the event.
    await muted.send("message:send", {"roomId": "general", "content": "shh"})
    err = await muted.next_event("system:error")
    assert err["data"]["code"] == "MUTED" and err["data"]["event"] == "message:send"
    assert [x["content"] for x in (await history(bob, "general"))["messages"]] == ["no ack"]


async def test_send_content_length(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "general")
    longest = "é" * 4000
    assert (await send(alice, "general", longest))["content"] == longest
    await invalid(alice, "message:send", {"roomId": "general", "content": "x" * 4001}, "content")
    await invalid(alice, "message:send", {"roomId": "general", "content": ""}, "content")
    await invalid(alice, "message:send", {"roomId": "general"}, "content")
    await invalid(alice, "message:send", {"roomId": "general", "content": 5}, "content")
    # Nothing left once control characters go: empty.
    await invalid(alice, "message:send", {"roomId": "general", "content": "\x00\x07"}, "content")
    assert seqs((await history(alice, "general"))["messages"]) == [1]


async def test_send_strips_control_characters_but_keeps_html(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    await settle(bob)
    m = await send(alice, "general", "a\x00b\x07c\td\ne\x1bf\x7fg\r")
    assert m["content"] == "abc\td\nefg"
    assert (await bob.next_event("message:new"))["data"]["message"]["content"] == "abc\td\nefg"
    html = "<script>alert('x')</script> &amp; <b>bold</b> \"quoted\""
    m = await send(alice, "general", html)
    assert m["content"] == html
    assert (await bob.next_event("message:new"))["data"]["message"]["content"] == html
    assert [x["content"] for x in (await history(bob, "general"))["messages"]] == [
        html, "abc\td\nefg",
    ]  # fmt: skip


async def test_send_types_attachments_and_metadata(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    await settle(bob)
    urls = [f"https://cdn.example.com/f/{i}.png" for i in range(10)]
    meta = {"width": 640, "tags": ["a", "b"], "nested": {"ok": True}}
    m = await send(alice, "general", "pics", type="image", attachments=urls, metadata=meta)
    assert m["type"] == "image" and m["attachments"] == urls and m["metadata"] == meta
    assert (await bob.next_event("message:new"))["data"]["message"] == m
    f = await send(alice, "general", "doc", type="file", attachments=["http://files.local/a.pdf"])
    assert f["type"] == "file" and f["attachments"] == ["http://files.local/a.pdf"]
    # Exactly 4096 bytes of JSON metadata is allowed.
    big = {"k": "x" * (4096 - len(b'{"k":""}'))}
    assert len(orjson.dumps(big)) == 4096
    assert (await send(alice, "general", "big", metadata=big))["metadata"] == big
    assert [x["type"] for x in (await history(alice, "general"))["messages"]] == [
        "text", "file", "image",
    ]  # fmt: skip


async def test_send_validation(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "general")

    async def bad(field: str, **data: Any) -> None:
        await invalid(alice, "message:send", {"roomId": "general", "content": "x", **data}, field)

    await bad("type", type="video")
    await bad("attachments", attachments=[f"https://cdn.example.com/{i}" for i in range(11)])
    await bad("attachments", attachments=["not a url"])
    await bad("attachments", attachments=["https://ok.example.com/a", "javascript:alert(1)"])
    await bad("attachments", attachments="https://example.com/a")
    await bad("metadata", metadata={"k": "x" * (4097 - len(b'{"k":""}'))})
    await bad("metadata", metadata=["not", "an", "object"])
    await bad("parentMessageId", parentMessageId="abc")
    await bad("clientMsgId", clientMsgId="x" * 65)
    await invalid(alice, "message:send", {"content": "x"}, "roomId")
    assert (await history(alice, "general"))["messages"] == []


async def test_numbers_past_int64_are_validation_errors(gateway):
    # Regression (issue 12): 2^63 and 2^64 (which JSON parsers read as a float)
    # reached the database and came back as INTERNAL_ERROR.
    alice = await gateway.connect("alice")
    await room(alice, "general")
    m = await send(alice, "general")
    for huge in (2**63, 2.0**64, 1e308):
        await invalid(alice, "room:join", {"roomId": "general", "sinceSeq": huge}, "sinceSeq")
        await invalid(alice, "room:read", {"roomId": "general", "seq": huge}, "seq")
        await invalid(
            alice, "room:get_messages", {"roomId": "general", "beforeSeq": huge}, "beforeSeq"
        )
    exc = await error(
        alice, "room:get_messages", {"roomId": "general", "beforeSeq": 2**63}, "VALIDATION_ERROR"
    )
    assert exc.details["beforeSeq"] == [
        "Must be greater than or equal to 1 and less than or equal to 9223372036854775807."
    ]
    # The largest int64 is in range: every message is before it.
    page = await history(alice, "general", beforeSeq=2**63 - 1)
    assert [x["id"] for x in page["messages"]] == [m["id"]]
    # Fractions and booleans are not integers (they were truncated or taken as 0/1).
    await invalid(alice, "room:get_messages", {"roomId": "general", "limit": 5.5}, "limit")
    await invalid(alice, "room:read", {"roomId": "general", "seq": True}, "seq")
    assert (await history(alice, "general", limit=5.0))["messages"][0]["id"] == m["id"]


@pytest.mark.parametrize("bad_id", ["9223372036854775808", "99999999999999999999", "²", "1²", "١٢"])
async def test_message_ids_beyond_int64_or_not_ascii_digits_are_invalid(gateway, bad_id):
    # Regression (issue 12): 19-digit ids over 2^63-1 overflowed the database and
    # "²" passed str.isdigit() but not int(): both were INTERNAL_ERROR.
    alice = await gateway.connect("alice")
    await room(alice, "general")
    await invalid(alice, "message:edit", {"messageId": bad_id, "content": "x"}, "messageId")
    await invalid(alice, "message:react", {"messageId": bad_id, "emoji": "👍"}, "messageId")
    await invalid(alice, "message:delete", {"messageId": bad_id}, "messageId")
    await invalid(
        alice, "message:send",
        {"roomId": "general", "content": "x", "parentMessageId": bad_id}, "parentMessageId",
    )  # fmt: skip
    await error(alice, "message:edit", {"messageId": "9223372036854775807", "content": "x"},
                "MESSAGE_NOT_FOUND")  # fmt: skip


async def test_metadata_nests_at_most_32_levels(gateway):
    # Regression (issue 12): 300 levels (well under 4 KB) made the JSON encoder
    # give up and the send answer INTERNAL_ERROR.
    alice = await gateway.connect("alice")
    await room(alice, "general")

    def nested(depth: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(depth - 1):
            value = {"a": value}
        return value

    assert (await send(alice, "general", metadata=nested(32)))["metadata"] == nested(32)
    exc = await error(
        alice, "message:send", {"roomId": "general", "content": "x", "metadata": nested(33)},
        "VALIDATION_ERROR",
    )  # fmt: skip
    assert exc.details == {"metadata": ["Must nest at most 32 levels deep."]}
    # 300 levels: past what orjson writes, so the frame is written by the stdlib.
    data = {"roomId": "general", "content": "x", "metadata": nested(300)}
    await alice.send_raw(json.dumps({"event": "message:send", "data": data}))
    frame = await alice.next_event("system:error", timeout=2.0)
    assert frame["data"]["code"] == "VALIDATION_ERROR"
    assert frame["data"]["details"] == {"metadata": ["Must nest at most 32 levels deep."]}
    # Lists count as levels too.
    deep_list: Any = "leaf"
    for _ in range(40):
        deep_list = [deep_list]
    await invalid(alice, "message:send",
                  {"roomId": "general", "content": "x", "metadata": {"l": deep_list}},
                  "metadata")  # fmt: skip


async def test_identifiers_refuse_control_characters(gateway):
    # Regression (issue 12): PostgreSQL cannot store NUL, so these were
    # INTERNAL_ERROR there (tests/test_chat_postgres.py runs this file on it).
    alice = await gateway.connect("alice")
    await room(alice, "general")
    m = await send(alice, "general")
    await invalid(alice, "message:react", {"messageId": m["id"], "emoji": "\x00"}, "emoji")
    await invalid(alice, "message:react", {"messageId": m["id"], "emoji": "a\x07"}, "emoji")
    await invalid(
        alice, "message:send", {"roomId": "general", "content": "x", "clientMsgId": "a\x00"},
        "clientMsgId",
    )  # fmt: skip
    await invalid(alice, "room:create", {"name": "n", "members": ["bob\x00"]}, "members")
    # Unicode that is not a control character is fine: RTL marks, ZWJ sequences.
    family = "👩\u200d👩\u200d👧"
    reacted = await alice.emit("message:react", {"messageId": m["id"], "emoji": family})
    assert reacted["reactions"] == {family: ["alice"]}
    await send(alice, "general", "x", clientMsgId="\u200fid")


async def test_send_requires_joining(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    await settle(alice)
    exc = await error(bob, "message:send", {"roomId": "general", "content": "x"}, "NOT_IN_ROOM")
    assert exc.details.get("roomId") == "general"
    await error(bob, "message:send", {"roomId": "nowhere", "content": "x"}, "NOT_IN_ROOM")
    await assert_no_event(alice, "message:new")
    # Without an ack the failure comes back as system:error naming the event.
    await bob.send("message:send", {"roomId": "general", "content": "x"})
    ev = await bob.next_event("system:error")
    assert ev["data"]["code"] == "NOT_IN_ROOM" and ev["data"]["event"] == "message:send"
    assert (await history(alice, "general"))["messages"] == []


async def test_threads(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    await room(alice, "other")
    await join(bob, "general")
    await settle(bob)
    parent = await send(alice, "general", "question?")
    await bob.next_event("message:new")
    reply = await send(bob, "general", "answer", parentMessageId=parent["id"])
    assert reply["parentMessageId"] == parent["id"]
    ev = await alice.next_event("message:new")
    assert ev["data"]["message"]["parentMessageId"] == parent["id"]
    # Integer ids are accepted too.
    again = await send(alice, "general", "more", parentMessageId=int(parent["id"]))
    assert again["parentMessageId"] == parent["id"]
    exc = await error(
        alice, "message:send",
        {"roomId": "general", "content": "x", "parentMessageId": str(int(again["id"]) + 1000)},
        "MESSAGE_NOT_FOUND",
    )  # fmt: skip
    assert exc.details
    # A parent in another room is not a parent here.
    elsewhere = await send(alice, "other", "elsewhere")
    await error(
        alice, "message:send",
        {"roomId": "general", "content": "x", "parentMessageId": elsewhere["id"]},
        "MESSAGE_NOT_FOUND",
    )  # fmt: skip
    assert seqs((await history(alice, "general"))["messages"]) == [3, 2, 1]


async def test_seq_has_no_gaps_across_senders(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    sends = [send(c, "general", f"{c is alice}-{i}") for i in range(15) for c in (alice, bob)]
    messages = await asyncio.gather(*sends)
    assert sorted(m["seq"] for m in messages) == list(range(1, 31))
    assert len({m["id"] for m in messages}) == 30
    page = await history(alice, "general", limit=100)
    assert seqs(page["messages"]) == list(range(30, 0, -1))
    assert (await join(alice, "general"))["room"]["lastSeq"] == 30
    # Seqs are per room.
    await room(bob, "other")
    assert (await send(bob, "other"))["seq"] == 1


async def test_concurrent_senders_reach_every_member_once(gateway):
    """Several senders at once, so the hub writes each member the broadcasts of a
    loop iteration together: every member still gets every message once
    (senders all but their own). The frame order of coalesced writes is
    covered in tests/test_hub.py."""
    clients = await room_with(
        gateway, "general", "alice", "bob", "carol", "dave", "erin", settled=True
    )
    senders = clients[:3]
    sends = [send(c, "general", f"{n}-{i}") for i in range(20) for n, c in enumerate(senders)]
    messages = await asyncio.gather(*sends)
    every = sorted(m["seq"] for m in messages)
    assert every == list(range(1, 61))
    for k, client in enumerate(clients):
        own = {m["seq"] for j, m in enumerate(messages) if j % 3 == k}
        await client.emit("system:ping")  # barrier: the broadcasts were written long before
        got = [f["data"]["message"]["seq"] for f in client.drain_events("message:new")]
        assert sorted(got) == [seq for seq in every if seq not in own], client
        assert len(got) == len(set(got)) and client.duplicates_dropped == 0


async def test_client_msg_id_makes_send_idempotent(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True)
    data = {"roomId": "general", "content": "once", "clientMsgId": "c-1"}
    first = await alice.emit("message:send", data)
    assert first["duplicate"] is False
    await bob.next_event("message:new")
    again = await alice.emit("message:send", data)
    assert again["duplicate"] is True and again["message"] == first["message"]
    await assert_no_event(bob, "message:new")
    assert bob.duplicates_dropped == 0  # nor a second frame the client dropped
    assert seqs((await history(bob, "general"))["messages"]) == [1]
    # Per sender: bob's clientMsgId "c-1" is a different message.
    theirs = await bob.emit("message:send", {**data, "content": "bob's"})
    assert theirs["duplicate"] is False and theirs["message"]["seq"] == 2
    # A retry over a new connection is still recognised.
    await alice.aclose()
    alice2 = await gateway.connect("alice")
    await join(alice2, "general")
    retry = await alice2.emit("message:send", data)
    assert retry["duplicate"] is True and retry["message"]["id"] == first["message"]["id"]
    await assert_no_event(bob, "message:new")
    assert seqs((await history(bob, "general"))["messages"]) == [2, 1]


async def test_client_msg_id_retry_racing_the_original(gateway):
    """A retry sent on a second connection while the first send is in flight."""
    alice1, alice2, bob = await room_with(gateway, "general", "alice", "alice", "bob")
    await settle(bob)
    for n in range(5):
        data = {"roomId": "general", "content": f"m{n}", "clientMsgId": f"race-{n}"}
        acks = await asyncio.gather(
            alice1.emit("message:send", data), alice2.emit("message:send", data)
        )
        assert acks[0]["message"] == acks[1]["message"]
        assert sorted(a["duplicate"] for a in acks) == [False, True]
    got = await collect_new(bob, "general", 5)
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert seqs((await history(bob, "general"))["messages"]) == [5, 4, 3, 2, 1]


async def test_send_rate_limited(gateway_factory):
    gw = await gateway_factory(rate_limits="messages=3/1m")
    alice = await gw.connect("alice")
    await room(alice, "general")
    for i in range(3):
        await send(alice, "general", f"m{i}")
    exc = await error(alice, "message:send", {"roomId": "general", "content": "x"}, "RATE_LIMITED")
    assert exc.details["limit"] == 3 and exc.details["window"] == 60_000
    assert exc.details["retryAfter"] > 0
    assert seqs((await history(alice, "general"))["messages"]) == [3, 2, 1]


# -- message:edit -------------------------------------------------------------------


async def test_edit_message(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    await settle(bob)
    m = await send(alice, "general", "frist")
    await bob.next_event("message:new")
    edited = await alice.emit("message:edit", {"messageId": m["id"], "content": "first\x00"})
    e = edited["message"]
    assert e["id"] == m["id"] and e["seq"] == m["seq"] and e["content"] == "first"
    assert ISO_RE.match(e["editedAt"]) and e["editedAt"] >= m["createdAt"]
    assert e["createdAt"] == m["createdAt"] and e["deleted"] is False
    ev = await bob.next_event("message:updated")
    assert ev["data"] == {"message": e}
    await assert_no_event(alice, "message:updated")
    assert (await history(bob, "general"))["messages"] == [e]


async def test_edit_errors(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    m = await send(alice, "general", "mine")
    await settle(alice, bob)
    await error(bob, "message:edit", {"messageId": m["id"], "content": "yours"}, "FORBIDDEN")
    await assert_no_event(alice, "message:updated")
    assert bob.connected
    exc = await error(
        alice, "message:edit", {"messageId": "987654321", "content": "x"}, "MESSAGE_NOT_FOUND"
    )
    assert exc.details.get("messageId") == "987654321"
    await invalid(alice, "message:edit", {"messageId": m["id"], "content": ""}, "content")
    await invalid(alice, "message:edit", {"messageId": m["id"], "content": "x" * 4001}, "content")
    await invalid(alice, "message:edit", {"messageId": "12a", "content": "x"}, "messageId")
    await invalid(alice, "message:edit", {"content": "x"}, "messageId")
    page = (await history(alice, "general"))["messages"]
    assert page[0]["content"] == "mine" and page[0]["editedAt"] is None


# -- message:delete -------------------------------------------------------------------


async def test_author_deletes_message(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    m = await send(bob, "general", "oops", attachments=["https://x.example.com/a"],
                   metadata={"k": 1})  # fmt: skip
    await alice.emit("message:react", {"messageId": m["id"], "emoji": "👍"})
    await send(bob, "general", "kept")
    await settle(alice, bob)
    ack = await bob.emit("message:delete", {"messageId": m["id"], "reason": "typo"})
    assert ack["messageId"] == m["id"] and ack["roomId"] == "general"
    ev = await alice.next_event("message:deleted")
    assert ev["data"]["messageId"] == m["id"] and ev["data"]["roomId"] == "general"
    await assert_no_event(bob, "message:deleted")
    tomb, kept = (await history(alice, "general"))["messages"][::-1]
    assert tomb["id"] == m["id"] and tomb["seq"] == 1 and tomb["deleted"] is True
    assert tomb["content"] == "" and tomb["attachments"] == [] and tomb["metadata"] == {}
    assert tomb["reactions"] == {} and kept["deleted"] is False and kept["content"] == "kept"
    for event, data in (
        ("message:edit", {"messageId": m["id"], "content": "again"}),
        ("message:delete", {"messageId": m["id"]}),
        ("message:react", {"messageId": m["id"], "emoji": "👍"}),
    ):
        await error(bob, event, data, "MESSAGE_NOT_FOUND")
    await error(bob, "message:send",
                {"roomId": "general", "content": "x", "parentMessageId": "99999"},
                "MESSAGE_NOT_FOUND")  # fmt: skip
    await assert_no_event(alice, "message:updated")


async def test_delete_message_permissions(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    mod = await gateway.connect("mod", roles=("moderator",))
    await room(alice, "general")
    await join(bob, "general")
    m = await send(alice, "general", "alice's")
    await settle(alice, bob)
    await error(bob, "message:delete", {"messageId": m["id"]}, "FORBIDDEN")
    await assert_no_event(alice, "message:deleted")
    assert (await history(alice, "general"))["messages"][0]["deleted"] is False
    # A moderator (token role) may delete anyone's message, without joining.
    ack = await mod.emit("message:delete", {"messageId": m["id"], "reason": "spam"})
    assert ack["messageId"] == m["id"] and ack["deletedBy"] == "mod"
    for client in (alice, bob):
        ev = await client.next_event("message:deleted")
        assert ev["data"]["messageId"] == m["id"] and ev["data"]["roomId"] == "general"
    assert (await history(alice, "general"))["messages"][0]["deleted"] is True
    await error(alice, "message:delete", {"messageId": "123456789"}, "MESSAGE_NOT_FOUND")
    await invalid(alice, "message:delete", {"messageId": "-1"}, "messageId")


# -- message:react ---------------------------------------------------------------------


async def test_reactions(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    m = await send(alice, "general", "react to me")
    await settle(alice, bob)

    async def react(client: Client, emoji: str, action: str | None = None) -> dict[str, Any]:
        data = {"messageId": m["id"], "emoji": emoji}
        if action is not None:
            data["action"] = action
        ack = await client.emit("message:react", data)
        other = bob if client is alice else alice
        ev = await other.next_event("message:reaction")
        assert ev["data"] == ack
        await assert_no_event(client, "message:reaction")
        return ack

    ack = await react(alice, "👍")  # action defaults to add
    assert ack == {
        "messageId": m["id"], "roomId": "general", "emoji": "👍", "userId": "alice",
        "action": "add", "reactions": {"👍": ["alice"]},
    }  # fmt: skip
    assert (await react(bob, "👍", "add"))["reactions"] == {"👍": ["alice", "bob"]}
    # Adding twice changes nothing.
    assert (await react(alice, "👍", "add"))["reactions"] == {"👍": ["alice", "bob"]}
    assert (await react(alice, ":tada:"))["reactions"] == {
        "👍": ["alice", "bob"], ":tada:": ["alice"],
    }  # fmt: skip
    ack = await react(alice, "👍", "remove")
    assert ack["action"] == "remove" and ack["userId"] == "alice"
    assert ack["reactions"] == {"👍": ["bob"], ":tada:": ["alice"]}
    # Removing what is not there is harmless too.
    assert (await react(alice, "👍", "remove"))["reactions"] == {"👍": ["bob"], ":tada:": ["alice"]}
    assert (await react(alice, ":tada:", "remove"))["reactions"] == {"👍": ["bob"]}
    stored = (await history(alice, "general"))["messages"][0]
    assert stored["reactions"] == {"👍": ["bob"]}


async def test_reaction_errors(gateway):
    alice, bob = await users(gateway, "alice", "bob")
    await room(alice, "general")
    m = await send(alice, "general", "x")

    async def bad(field: str, **data: Any) -> None:
        await invalid(alice, "message:react", {"messageId": m["id"], **data}, field)

    await bad("emoji", emoji="thumbs up")
    await bad("emoji", emoji=" 👍")
    await bad("emoji", emoji="👍\n")
    await bad("emoji", emoji="")
    await bad("emoji", emoji="x" * 33)
    await bad("emoji")
    await bad("action", emoji="👍", action="toggle")
    await error(alice, "message:react", {"messageId": "424242", "emoji": "👍"},
                "MESSAGE_NOT_FOUND")  # fmt: skip
    # Reacting is for members.
    await error(bob, "message:react", {"messageId": m["id"], "emoji": "👍"}, "NOT_IN_ROOM")
    assert (await history(alice, "general"))["messages"][0]["reactions"] == {}


# -- typing, status, ping, health ---------------------------------------------------------


async def test_typing_indicators(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True)
    assert await bob.emit("typing:start", {"roomId": "general"}) == {"roomId": "general"}
    ev = await alice.next_event("user:typing")
    assert ev["data"] == {"roomId": "general", "userId": "bob", "username": "bob",
                          "displayName": "bob"}  # fmt: skip
    await bob.emit("typing:start", {"roomId": "general"})  # still typing: no repeat
    await bob.emit("typing:stop", {"roomId": "general"})
    ev = await alice.next_event("user:stopped_typing")
    assert ev["data"]["userId"] == "bob"
    await assert_no_event(alice, "user:typing")
    await assert_no_event(bob, "user:typing")
    # Sending a message stops typing.
    await bob.emit("typing:start", {"roomId": "general"})
    await alice.next_event("user:typing")
    await send(bob, "general", "done typing")
    assert (await alice.next_event("user:stopped_typing"))["data"]["userId"] == "bob"
    await error(bob, "typing:start", {"roomId": "elsewhere"}, "NOT_IN_ROOM")
    await error(bob, "typing:stop", {"roomId": "elsewhere"}, "NOT_IN_ROOM")


async def test_typing_stops_by_itself(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob")
    await settle(alice)
    loop = asyncio.get_running_loop()
    await bob.emit("typing:start", {"roomId": "general"})
    started = loop.time()
    await alice.next_event("user:typing")
    ev = await alice.next_event("user:stopped_typing", timeout=5)
    assert ev["data"]["userId"] == "bob"
    assert 2.5 <= loop.time() - started <= 4.5


async def test_status_update(gateway):
    alice, bob, carol = await room_with(gateway, "general", "alice", "bob", outsiders=("carol",))
    await settle(alice, bob, carol)
    assert await bob.emit("user:status_update", {"status": "away"}) == {"status": "away"}
    ev = await alice.next_event("user:status_changed")
    assert ev["data"] == {"userId": "bob", "status": "away"}
    await assert_no_event(carol, "user:status_changed")
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert member(members, "bob")["status"] == "away"
    await invalid(bob, "user:status_update", {"status": "offline"}, "status")
    await invalid(bob, "user:status_update", {}, "status")


async def test_ping_and_health(gateway):
    alice = await gateway.connect("alice")
    pong = await alice.emit("system:ping", {"t": 0})
    assert ISO_RE.match(pong["serverTime"]) and pong["latencyMs"] > 0
    assert (await alice.emit("system:ping"))["latencyMs"] is None
    health = await alice.emit("system:get_health")
    assert health["status"] in ("healthy", "degraded", "unhealthy")
    assert {"database", "websocket"} <= set(health["services"])
    assert health["metrics"]["activeConnections"] >= 1


# -- mute: read-only in that room --------------------------------------------------------


async def mute(gw: Any, user: str, room_id: str) -> dict[str, Any]:
    """Mute ``user`` in ``room_id`` for ten minutes, as a moderator on /ws/admin."""
    mod = await gw.connect("mod", "admin", ("moderator",))
    ack: dict[str, Any] = await mod.emit(
        "admin:mute", {"userId": user, "roomId": room_id, "durationSeconds": 600}
    )
    return ack


async def expire_mutes(gw: Any, user: str) -> None:
    """Move ``user``'s mutes into the past (instead of waiting ten minutes)."""

    def expire() -> None:
        past = utcnow() - dt.timedelta(seconds=1)
        RoomMute.update(until=past).where(RoomMute.user_id == user).execute()

    await gw.node.db.run("test.expire_mute", expire)


async def assert_silenced(speaker: Client, listener: Client, until: str) -> None:
    """``speaker`` is MUTED in "general" on send and typing, and ``listener`` hears nothing."""
    for event, data in (
        ("message:send", {"roomId": "general", "content": "x"}),
        ("typing:start", {"roomId": "general"}),
    ):
        exc = await error(speaker, event, data, "MUTED")
        assert exc.details == {"roomId": "general", "until": until}, event
    await nothing_arrived((listener,), "message:new", "user:typing")


async def test_a_muted_member_reads_but_does_not_speak(gateway_factory):
    gw = await production(gateway_factory)
    alice, bob = await users(gw, "alice", "bob")
    await room(alice, "general")
    await room(alice, "other")
    for room_id in ("general", "other"):
        await join(bob, room_id)
    mine = await send(bob, "general", "before the mute")
    theirs = await send(alice, "general", "alice speaks")
    muted = await mute(gw, "bob", "general")
    await settle(alice, bob)
    refused = {"roomId": "general", "until": muted["mutedUntil"]}
    for event, data in (
        ("message:send", {"roomId": "general", "content": "x"}),
        ("message:edit", {"messageId": mine["id"], "content": "edited"}),
        ("message:react", {"messageId": theirs["id"], "emoji": "👍"}),
        ("message:react", {"messageId": mine["id"], "emoji": "👍", "action": "remove"}),
        ("typing:start", {"roomId": "general"}),
    ):
        exc = await error(bob, event, data, "MUTED")
        assert exc.details == refused, event
    await nothing_arrived(
        (alice,), "message:new", "message:updated", "message:reaction", "user:typing"
    )
    page = (await history(alice, "general"))["messages"]
    assert [(m["content"], m["editedAt"], m["reactions"]) for m in page] == [
        ("alice speaks", None, {}), ("before the mute", None, {}),
    ]  # fmt: skip
    # Reading is allowed: history, read markers, typing:stop.
    assert len((await history(bob, "general"))["messages"]) == 2
    assert (await bob.emit("room:read", {"roomId": "general", "seq": 2}))["unread"] == 0
    await bob.emit("typing:stop", {"roomId": "general"})
    # So is deleting one's own message (deleting is not speaking).
    await bob.emit("message:delete", {"messageId": mine["id"]})
    assert (await alice.next_event("message:deleted"))["data"]["messageId"] == mine["id"]
    # Only in that room.
    await bob.emit("typing:start", {"roomId": "other"})
    assert (await alice.next_event("user:typing"))["data"]["roomId"] == "other"
    await send(bob, "other", "elsewhere I speak")


async def test_an_expired_mute_no_longer_silences(gateway_factory):
    gw = await production(gateway_factory)
    alice, bob = await room_with(gw, "general", "alice", "bob")
    mine = await send(bob, "general", "first")
    await mute(gw, "bob", "general")
    await error(bob, "typing:start", {"roomId": "general"}, "MUTED")
    await expire_mutes(gw, "bob")
    await settle(alice)
    await bob.emit("typing:start", {"roomId": "general"})
    assert (await alice.next_event("user:typing"))["data"]["userId"] == "bob"
    await bob.emit("message:edit", {"messageId": mine["id"], "content": "edited"})
    await bob.emit("message:react", {"messageId": mine["id"], "emoji": "👍"})
    await send(bob, "general", "back")


async def test_leaving_and_rejoining_does_not_lift_a_mute(gateway_factory):
    gw = await production(gateway_factory)
    alice, bob = await room_with(gw, "general", "alice", "bob")
    muted = await mute(gw, "bob", "general")
    await bob.emit("room:leave", {"roomId": "general"})
    members = (await alice.emit("room:members", {"roomId": "general"}))["members"]
    assert [m["userId"] for m in members] == ["alice"]
    await join(bob, "general")
    await settle(alice, bob)
    await assert_silenced(bob, alice, muted["mutedUntil"])
    # Reconnecting does not either.
    await bob.aclose()
    bob = await gw.connect("bob")
    await join(bob, "general")
    await settle(alice)
    await assert_silenced(bob, alice, muted["mutedUntil"])
    # Once it expires, the member speaks again.
    await expire_mutes(gw, "bob")
    await bob.emit("typing:start", {"roomId": "general"})
    assert (await alice.next_event("user:typing"))["data"]["userId"] == "bob"
    assert (await send(bob, "general", "back"))["senderId"] == "bob"


async def test_a_mute_before_joining_applies_on_join(gateway_factory):
    gw = await production(gateway_factory)
    alice, carol = await users(gw, "alice", "carol")
    await room(alice, "general")
    await send(alice, "general", "welcome")
    # carol is no member (and has never been): a moderator mutes her pre-emptively.
    muted = await mute(gw, "carol", "general")
    assert (muted["userId"], muted["roomId"]) == ("carol", "general")
    joined = await join(carol, "general")
    assert [m["userId"] for m in joined["members"]] == ["alice", "carol"]
    await settle(alice, carol)
    await assert_silenced(carol, alice, muted["mutedUntil"])
    # Read-only, not shut out: she reads the room.
    assert [m["content"] for m in (await history(carol, "general"))["messages"]] == ["welcome"]
    await expire_mutes(gw, "carol")
    await send(carol, "general", "hello")


async def test_deleting_a_room_deletes_its_mutes(gateway_factory):
    gw = await production(gateway_factory)
    alice, bob = await users(gw, "alice", "bob")
    for room_id in ("general", "other"):
        await room(alice, room_id)
        await join(bob, room_id)
        await mute(gw, "bob", room_id)
    await alice.emit("room:delete", {"roomId": "general"})

    def rooms_with_mutes() -> list[str]:
        return sorted(m.room_id for m in RoomMute.select())

    # The id of a deleted room is never reused, so its mutes could only be dead rows.
    assert await gw.node.db.run("test.mutes", rooms_with_mutes) == ["other"]
    await error(bob, "message:send", {"roomId": "other", "content": "x"}, "MUTED")
    await error(alice, "room:create", {"roomId": "general", "name": "again"}, "CONFLICT")


# -- who may see a message ------------------------------------------------------------


async def test_no_existence_oracle_for_messages_of_closed_rooms(gateway_factory):
    gw = await production(gateway_factory)
    alice, carol = await users(gw, "alice", "carol")
    await room(alice, "secret", type="private")
    await room(alice, "vault", password="hunter22")  # public, but closed to non-members
    hidden = [(await send(alice, r, "hidden"))["id"] for r in ("secret", "vault")]
    await room(carol, "mine")

    def probes(message_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            ("room:join", {"roomId": "mine"}),  # so that message:send gets to the parent
            ("message:edit", {"messageId": message_id, "content": "x"}),
            ("message:delete", {"messageId": message_id}),
            ("message:react", {"messageId": message_id, "emoji": "👍"}),
            ("message:send", {"roomId": "mine", "content": "x", "parentMessageId": message_id}),
        ]

    # Ids are sequential: the next unused one stands for "no such message".
    missing = str(int(hidden[-1]) + 1000)
    for message_id in hidden:
        real = await raw_acks(gw, "carol", probes(message_id))
        none = await raw_acks(gw, "carol", probes(missing))
        for got, expected in zip(real[1:], none[1:], strict=True):
            assert got == expected.replace(missing.encode(), message_id.encode())
            assert b"MESSAGE_NOT_FOUND" in got
            assert b"secret" not in got and b"vault" not in got
    # Members still act on them, and nothing changed meanwhile.
    page = (await history(alice, "secret"))["messages"]
    assert [(m["content"], m["reactions"], m["deleted"]) for m in page] == [("hidden", {}, False)]


async def test_open_rooms_tell_non_members_to_join_without_naming_the_room(gateway_factory):
    gw = await production(gateway_factory)
    alice, carol = await users(gw, "alice", "carol")
    mod = await gw.connect("mod", roles=("moderator",))
    await room(alice, "lobby")
    m = await send(alice, "lobby", "open to all")
    exc = await error(carol, "message:react", {"messageId": m["id"], "emoji": "👍"}, "NOT_IN_ROOM")
    assert exc.details == {"messageId": m["id"]}
    exc = await error(carol, "message:edit", {"messageId": m["id"], "content": "x"}, "FORBIDDEN")
    assert "roomId" not in exc.details
    exc = await error(carol, "message:delete", {"messageId": m["id"]}, "FORBIDDEN")
    assert "roomId" not in exc.details
    # Moderators (token role) still remove any message, also in a private room.
    await room(alice, "secret", type="private")
    s = await send(alice, "secret", "spam")
    ack = await mod.emit("message:delete", {"messageId": s["id"]})
    assert ack["roomId"] == "secret"


# -- recovery ------------------------------------------------------------------------


async def test_recovery_after_reconnect(gateway):
    alice, bob = await room_with(gateway, "general", "alice", "bob", settled=True)
    for i in (1, 2):
        await send(bob, "general", f"seen {i}")
        await alice.next_event("message:new")
    last_seen = alice.last_seq("general")
    assert last_seen == 2
    await alice.aclose()
    assert (await bob.next_event("room:user_left"))["data"]["reason"] == "disconnect"
    sent = [await send(bob, "general", f"missed {i}") for i in range(3)]
    alice = await gateway.connect("alice")
    joined = await join(alice, "general", sinceSeq=last_seen)
    assert joined["recovered"] is True
    assert seqs(joined["missed"]) == [3, 4, 5]
    assert joined["missed"] == sent
    assert (await bob.next_event("room:user_joined"))["data"]["user"]["userId"] == "alice"
    await assert_no_event(alice, "message:new")
    # Caught up: nothing missed.
    again = await gateway.connect("alice")
    caught_up = await join(again, "general", sinceSeq=5)
    assert caught_up["recovered"] is True and caught_up["missed"] == []


async def test_recovery_limit(gateway):
    alice = await gateway.connect("alice")
    await room(alice, "big")
    await asyncio.gather(*(send(alice, "big", f"m{i}") for i in range(500)))
    reader = await gateway.connect("bob")
    joined = await join(reader, "big", sinceSeq=0)
    assert joined["recovered"] is True and seqs(joined["missed"]) == list(range(1, 501))
    await send(alice, "big", "one too many")
    reader2 = await gateway.connect("carol")
    joined = await join(reader2, "big", sinceSeq=0)
    assert joined["recovered"] is False and joined["missed"] == []
    joined = await join(reader2, "big", sinceSeq=1)
    assert joined["recovered"] is True and seqs(joined["missed"]) == list(range(2, 502))
    # Beyond the limit the client pages instead.
    page = await history(reader2, "big", limit=100)
    assert seqs(page["messages"]) == list(range(501, 401, -1)) and page["hasMore"] is True


async def test_join_with_since_seq_while_messages_flow(gateway):
    """Recovery and live traffic stitched together: no gap, no duplicate."""
    alice = await gateway.connect("alice")
    await room(alice, "general")
    for i in range(5):
        await send(alice, "general", f"before {i}")
    senders = await users(gateway, "s1", "s2", "s3")
    for s in senders:
        await join(s, "general")
    total = 5 + 30
    tasks = [asyncio.create_task(send(senders[i % 3], "general", f"live {i}")) for i in range(30)]
    joiners: list[tuple[Client, int, dict[str, Any]]] = []
    for n, since in enumerate((0, 2, 5, 3, 4, 1)):
        # Join at different points of the stream: after 0, 5, 10, ... acks.
        while sum(t.done() for t in tasks) < 5 * n:
            await asyncio.wait([t for t in tasks if not t.done()],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        joiner = await gateway.connect(f"joiner{n}")
        joiners.append((joiner, since, await join(joiner, "general", sinceSeq=since)))
    await asyncio.gather(*tasks)
    for joiner, since, joined in joiners:
        assert joined["recovered"] is True
        live = await collect_new(joiner, "general", total, seqs(joined["missed"]))
        union = seqs(joined["missed"]) + live
        expected = list(range(since + 1, total + 1))
        assert sorted(union) == expected, (since, seqs(joined["missed"]), live)


async def test_a_recipient_closed_mid_broadcast_costs_the_others_nothing(gateway):
    """Tornado closes a peer's stream between a broadcast's queueing and its flush.

    The write fast path must see the closed stream (whose write buffer tornado
    has dropped) and skip it, not raise out of the flush and cost the other
    recipients the frame.
    """
    owner = await gateway.connect("owner")
    await room(owner, "general")
    members = [await gateway.connect(f"m{n}") for n in range(5)]
    for client in members:
        await join(client, "general")
    await settle(owner, *members)
    hub = gateway.node.hub
    (victim,) = [h for h in hub.connections.values() if h.user_id == "m0"]
    data = {"message": {"id": "1", "roomId": "general", "seq": 1, "content": "x"}}
    hub.publish(Target.room("general"), "message:new", data, seq=1)  # queued for the flush
    victim.ws_connection.stream.close()  # before the flush, and before on_close runs
    for client in [owner, *members[1:]]:
        assert (await client.next_event("message:new"))["data"] == data
