import pytest


@pytest.mark.asyncio
async def test_two_users_chat(gateway):
    alice = await gateway.connect("alice")
    bob = await gateway.connect("bob")
    assert alice.welcome["userId"] == "alice"
    created = await alice.emit("room:create", {"roomId": "general", "name": "General"})
    assert created["room"]["id"] == "general"
    await alice.emit("room:join", {"roomId": "general"})
    joined = await bob.emit("room:join", {"roomId": "general"})
    assert {m["userId"] for m in joined["members"]} == {"alice", "bob"}
    ev = await alice.next_event("room:user_joined")
    assert ev["data"]["user"]["userId"] == "bob"
    ack = await alice.emit("message:send", {"roomId": "general", "content": "hi bob"})
    assert ack["message"]["seq"] == 1
    ev = await bob.next_event("message:new")
    assert ev["data"]["message"]["content"] == "hi bob"
