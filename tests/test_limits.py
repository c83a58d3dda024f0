"""Rate limits and connection limits, seen by clients of a real server, plus
unit tests of the in-memory limiters with an injected clock.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from server.core.config import RateLimit
from server.core.limits import ConnectionLimiter, RateLimiter
from switchboard_client import ClientError


async def joined(gw: Any, user: str, room: str = "general") -> Any:
    client = await gw.connect(user)
    try:
        await client.emit("room:create", {"roomId": room, "name": room})
    except ClientError as exc:
        assert exc.code == "CONFLICT"
    await client.emit("room:join", {"roomId": room})
    return client


async def send(client: Any, text: str, room: str = "general") -> dict[str, Any]:
    return await client.emit("message:send", {"roomId": room, "content": text})


# -- rate limits ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_message_rate_limit(gateway_factory):
    gw = await gateway_factory(rate_limits="messages=3/1m")
    alice = await joined(gw, "alice")
    bob = await joined(gw, "bob")
    for i in range(3):
        await send(alice, f"m{i}")

    with pytest.raises(ClientError) as info:
        await send(alice, "one too many")
    exc = info.value
    assert exc.code == "RATE_LIMITED"
    assert exc.details["limit"] == 3
    assert exc.details["window"] == 60_000
    retry = exc.details["retryAfter"]
    assert isinstance(retry, int) and 0 < retry <= 20_000  # one token is 20 s at 3/min

    # A refused message is not stored or broadcast.
    page = await bob.emit("room:get_messages", {"roomId": "general"})
    assert [m["content"] for m in page["messages"]] == ["m2", "m1", "m0"]

    # Another user has a bucket of their own.
    for i in range(3):
        await send(bob, f"b{i}")

    # Other event classes are not charged to the messages bucket.
    assert "serverTime" in await alice.emit("system:ping", {})
    await alice.emit("typing:start", {"roomId": "general"})


@pytest.mark.asyncio
async def test_rate_limit_without_ack_is_a_system_error(gateway_factory):
    gw = await gateway_factory(rate_limits="messages=1/1m")
    alice = await joined(gw, "alice")
    await send(alice, "first")
    await alice.send("message:send", {"roomId": "general", "content": "second"})
    frame = await alice.next_event("system:error")
    assert frame["data"]["code"] == "RATE_LIMITED"
    assert frame["data"]["event"] == "message:send"
    assert set(frame["data"]["details"]) == {"retryAfter", "limit", "window"}


@pytest.mark.asyncio
async def test_rate_limit_is_per_user_across_connections(gateway_factory):
    gw = await gateway_factory(rate_limits="messages=3/1m")
    tab1 = await joined(gw, "alice")
    tab2 = await joined(gw, "alice")
    await send(tab1, "1")
    await send(tab2, "2")
    await send(tab1, "3")
    with pytest.raises(ClientError) as info:
        await send(tab2, "4")
    assert info.value.code == "RATE_LIMITED"


@pytest.mark.asyncio
async def test_rate_limit_bucket_refills(gateway_factory):
    gw = await gateway_factory(rate_limits="messages=2/1s")
    alice = await joined(gw, "alice")
    await send(alice, "a")
    await send(alice, "b")
    with pytest.raises(ClientError) as info:
        await send(alice, "c")
    details = info.value.details
    assert details["limit"] == 2 and details["window"] == 1000
    retry_ms = details["retryAfter"]
    assert 0 < retry_ms <= 500

    # Waiting what the server said is enough (a real-clock wait: the bucket
    # refills with time, and no event announces it).
    await asyncio.sleep(retry_ms / 1000 + 0.02)
    assert (await send(alice, "c"))["message"]["content"] == "c"
    with pytest.raises(ClientError) as info:
        await send(alice, "d")
    assert info.value.code == "RATE_LIMITED"


@pytest.mark.asyncio
async def test_join_rate_limit_uses_test_defaults(gateway_factory):
    # Test-env defaults: joins 5/min (room:create and room:join both count).
    gw = await gateway_factory(rate_limits="messages=10/1m")
    assert gw.config.rate_limit("joins") == RateLimit(5, 60.0)
    alice = await gw.connect("alice")
    for i in range(5):
        await alice.emit("room:create", {"roomId": f"r{i}", "name": f"R{i}"})
    with pytest.raises(ClientError) as info:
        await alice.emit("room:join", {"roomId": "r0"})
    assert info.value.code == "RATE_LIMITED"
    assert info.value.details["limit"] == 5
    assert info.value.details["window"] == 60_000


# -- connection limits -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connections_per_user(gateway_factory):
    gw = await gateway_factory(max_connections_per_user=2)
    first = await gw.connect("alice")
    second = await gw.connect("alice")

    third = gw.client("alice")
    with pytest.raises(ClientError) as info:
        await third.connect()
    assert info.value.code == "TOO_MANY_CONNECTIONS"
    assert info.value.close_code == 4429
    assert info.value.details.get("limit") == 2

    # The first two still work; another user is not affected.
    assert "serverTime" in await first.emit("system:ping", {})
    assert "serverTime" in await second.emit("system:ping", {})
    assert (await gw.connect("bob")).welcome["userId"] == "bob"
    assert len(gw.node.hub.user_connections("alice")) == 2

    # Closing one frees its slot.
    await first.aclose()
    fourth = await gw.connect("alice")
    assert "serverTime" in await fourth.emit("system:ping", {})
    again = gw.client("alice")
    with pytest.raises(ClientError) as info:
        await again.connect()
    assert (info.value.code, info.value.close_code) == ("TOO_MANY_CONNECTIONS", 4429)


@pytest.mark.asyncio
async def test_connections_per_ip_across_users(gateway_factory):
    gw = await gateway_factory(max_connections_per_ip=3)
    clients = [await gw.connect(user) for user in ("alice", "bob", "carol")]
    with pytest.raises(ClientError) as info:
        await gw.client("dave").connect()
    assert info.value.code == "TOO_MANY_CONNECTIONS"
    assert info.value.close_code == 4429
    assert info.value.details.get("limit") == 3
    for client in clients:
        assert "serverTime" in await client.emit("system:ping", {})

    await clients[1].aclose()
    dave = await gw.connect("dave")
    assert dave.welcome["userId"] == "dave"


@pytest.mark.asyncio
async def test_refused_for_limit_frees_nothing_and_takes_nothing(gateway_factory):
    # Repeated refusals must not leak slots (or steal them from the holders).
    gw = await gateway_factory(max_connections_per_user=1)
    holder = await gw.connect("alice")
    for _ in range(3):
        with pytest.raises(ClientError) as info:
            await gw.client("alice").connect()
        assert info.value.close_code == 4429
    assert "serverTime" in await holder.emit("system:ping", {})
    await holder.aclose()
    assert (await gw.connect("alice")).welcome["userId"] == "alice"


# -- unit: RateLimiter -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_rate_limiter_token_bucket():
    clock = FakeClock()
    limiter = RateLimiter({"messages": RateLimit(3, 60.0)}, clock=clock)
    for _ in range(3):
        assert (await limiter.hit("alice", "messages")).allowed
    denied = await limiter.hit("alice", "messages")
    assert not denied.allowed
    assert denied.retry_after_ms == 20_000  # one token per 20 s
    assert denied.details() == {"retryAfter": 20_000, "limit": 3, "window": 60_000}

    clock.now += 5.0
    denied = await limiter.hit("alice", "messages")
    assert not denied.allowed and denied.retry_after_ms == 15_000
    clock.now += 15.0
    assert (await limiter.hit("alice", "messages")).allowed
    assert not (await limiter.hit("alice", "messages")).allowed

    # Users are independent.
    assert (await limiter.hit("bob", "messages")).allowed


@pytest.mark.asyncio
async def test_rate_limiter_answers_at_once_from_the_same_buckets():
    # What a frame's handler asks first (no coroutine per frame): the same
    # bucket as hit(), so mixing both never grants more than the limit.
    clock = FakeClock()
    limiter = RateLimiter({"messages": RateLimit(3, 60.0)}, clock=clock)
    first = limiter.hit_now("alice", "messages")
    assert first is not None and first.allowed
    assert (await limiter.hit("alice", "messages")).allowed
    third = limiter.hit_now("alice", "messages")
    assert third is not None and third.allowed
    denied = limiter.hit_now("alice", "messages")
    assert denied is not None and not denied.allowed
    assert denied.details() == {"retryAfter": 20_000, "limit": 3, "window": 60_000}
    assert not (await limiter.hit("alice", "messages")).allowed


@pytest.mark.asyncio
async def test_rate_limiter_never_exceeds_capacity_after_idling():
    clock = FakeClock()
    limiter = RateLimiter({"typing": RateLimit(2, 1.0)}, clock=clock)
    clock.now += 3600  # a long idle period does not bank extra tokens
    assert (await limiter.hit("u", "typing")).allowed
    assert (await limiter.hit("u", "typing")).allowed
    assert not (await limiter.hit("u", "typing")).allowed


@pytest.mark.asyncio
async def test_rate_limiter_classes_are_independent_and_reset():
    clock = FakeClock()
    limiter = RateLimiter(
        {"messages": RateLimit(1, 60.0), "joins": RateLimit(1, 60.0)}, clock=clock
    )
    assert (await limiter.hit("u", "messages")).allowed
    assert (await limiter.hit("u", "joins")).allowed
    assert not (await limiter.hit("u", "messages")).allowed
    await limiter.reset("u")
    assert (await limiter.hit("u", "messages")).allowed


@pytest.mark.asyncio
async def test_rate_limiter_denials_do_not_extend_the_wait():
    clock = FakeClock()
    limiter = RateLimiter({"messages": RateLimit(1, 10.0)}, clock=clock)
    assert (await limiter.hit("u", "messages")).allowed
    for _ in range(50):  # hammering while limited
        assert not (await limiter.hit("u", "messages")).allowed
    clock.now += 10.0
    assert (await limiter.hit("u", "messages")).allowed


@pytest.mark.asyncio
async def test_rate_limiter_retry_after_is_rounded_up():
    clock = FakeClock()
    limiter = RateLimiter({"messages": RateLimit(3, 1.0)}, clock=clock)
    for _ in range(3):
        await limiter.hit("u", "messages")
    denied = await limiter.hit("u", "messages")
    assert denied.retry_after_ms == math.ceil(1000 / 3)
    clock.now += denied.retry_after_ms / 1000
    assert (await limiter.hit("u", "messages")).allowed


@pytest.mark.asyncio
async def test_rate_limiter_forgets_idle_buckets():
    clock = FakeClock()
    limiter = RateLimiter({"messages": RateLimit(1, 1.0)}, clock=clock)
    for i in range(100):
        await limiter.hit(f"user{i}", "messages")
    assert len(limiter._buckets) == 100
    clock.now += 3600
    assert (await limiter.hit("fresh", "messages")).allowed
    assert len(limiter._buckets) == 1


# -- unit: ConnectionLimiter ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connection_limiter_per_user_is_per_namespace():
    limiter = ConnectionLimiter(per_user=2, per_ip=100)
    assert await limiter.acquire("alice", "chat", "10.0.0.1") is None
    assert await limiter.acquire("alice", "chat", "10.0.0.2") is None
    assert await limiter.acquire("alice", "chat", "10.0.0.3") == "user"
    # Two tabs on another namespace are fine.
    assert await limiter.acquire("alice", "notifications", "10.0.0.1") is None
    assert await limiter.acquire("alice", "notifications", "10.0.0.1") is None
    await limiter.release("alice", "chat", "10.0.0.1")
    assert await limiter.acquire("alice", "chat", "10.0.0.3") is None


@pytest.mark.asyncio
async def test_connection_limiter_per_ip_across_users_and_namespaces():
    limiter = ConnectionLimiter(per_user=5, per_ip=3)
    assert await limiter.acquire("a", "chat", "1.2.3.4") is None
    assert await limiter.acquire("b", "chat", "1.2.3.4") is None
    assert await limiter.acquire("c", "notifications", "1.2.3.4") is None
    assert await limiter.acquire("d", "chat", "1.2.3.4") == "ip"
    assert await limiter.acquire("d", "chat", "5.6.7.8") is None
    await limiter.release("b", "chat", "1.2.3.4")
    assert await limiter.acquire("d", "chat", "1.2.3.4") is None


@pytest.mark.asyncio
async def test_connection_limiter_refusal_takes_no_slot():
    limiter = ConnectionLimiter(per_user=1, per_ip=2)
    assert await limiter.acquire("a", "chat", "ip") is None
    for _ in range(5):
        assert await limiter.acquire("a", "chat", "ip") == "user"
    # The refused attempts did not count against the IP.
    assert await limiter.acquire("b", "chat", "ip") is None
    assert await limiter.acquire("c", "chat", "ip") == "ip"
    # Releasing more than was taken never goes negative.
    for _ in range(3):
        await limiter.release("a", "chat", "ip")
    await limiter.release("b", "chat", "ip")
    assert limiter._users == {} and limiter._ips == {}
    assert await limiter.acquire("a", "chat", "ip") is None
    assert await limiter.acquire("a", "chat", "ip") == "user"


@pytest.mark.asyncio
async def test_connection_limiter_tells_who_is_connected_per_namespace():
    limiter = ConnectionLimiter(per_user=5, per_ip=10)
    await limiter.acquire("alice", "chat", "ip")
    await limiter.acquire("bob", "notifications", "ip")
    assert await limiter.connected("chat", ["alice", "bob", "carol"]) == {"alice"}
    assert await limiter.connected("notifications", ["alice", "bob"]) == {"bob"}
    await limiter.release("alice", "chat", "ip")
    assert await limiter.connected("chat", ["alice"]) == set()
