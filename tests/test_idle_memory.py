"""What an open connection keeps: not the handshake's headers (issue 16, idle memory).

``bench.idle`` measures the bytes; these tests pin the behaviour the savings
rest on, and fail if a tornado upgrade keeps the headers somewhere new.
"""

from __future__ import annotations

import asyncio
import gc
import types
from typing import Any

import pytest
from tornado.httputil import HTTPHeaders

from handlers.base import TORNADO_HANDLER_ATTRS, GatewayHandler, _DetachedReceive


def _handler(gateway: Any, user_id: str) -> GatewayHandler:
    [conn] = [c for c in gateway.node.hub.connections.values() if c.user_id == user_id]
    assert isinstance(conn, GatewayHandler)
    return conn


@pytest.mark.asyncio
@pytest.mark.parametrize("namespace", ["chat", "notifications"])
async def test_open_connection_keeps_no_handshake_headers(gateway, namespace):
    agent = "idle-test/1.0"
    await gateway.connect("alice", namespace, headers={"User-Agent": agent})
    handler = _handler(gateway, "alice")

    assert len(handler.request.headers) == 0
    assert not handler.ui  # the template namespace went too
    # Tornado keeps the 101 response's headers in a private attribute that
    # the handler empties; if tornado moved them, they would show up here.
    held = [name for name, value in vars(handler).items()
            if isinstance(value, HTTPHeaders) and len(value)]  # fmt: skip
    assert held == []
    # What the admin listing reads was copied before the headers went.
    described = handler.describe()
    assert described["userAgent"] == agent
    assert described["ip"] == "127.0.0.1"


@pytest.mark.asyncio
async def test_same_user_agent_is_one_string_across_connections(gateway):
    agent = "shared-agent/" + "x" * 40
    await gateway.connect("alice", headers={"User-Agent": agent})
    await gateway.connect("bob", headers={"User-Agent": agent})
    # Interned: a thousand browsers of one build hold one copy.
    assert _handler(gateway, "alice").user_agent is _handler(gateway, "bob").user_agent


@pytest.mark.asyncio
async def test_gateway_state_lives_in_slots_not_the_instance_dict(gateway):
    await gateway.connect("alice")
    handler = _handler(gateway, "alice")
    # Only tornado's own attributes are in the dict (few enough for CPython
    # to share one key table between connections).
    ours = {"conn_id", "user_id", "outbound", "hub", "rooms", "member_rooms", "_timer"}
    assert ours.isdisjoint(vars(handler))
    assert handler.conn_id and handler.user_id == "alice"


def _coroutines(qualname: str) -> int:
    """Suspended coroutines running ``qualname`` on the server side (not the test's clients)."""
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, types.CoroutineType)
        and obj.cr_code.co_qualname == qualname
        and obj.cr_frame is not None
        and isinstance(obj.cr_frame.f_locals.get("self"), GatewayHandler | _DetachedReceive)
    )


@pytest.mark.asyncio
async def test_handshake_coroutines_finish_once_the_socket_is_open(gateway):
    # _DetachedReceive runs its frame reader as a task of its own: with
    # it awaited inside the handshake, each open connection kept
    # WebSocketHandler.get and four more coroutines suspended.
    client = await gateway.connect("alice")
    assert _coroutines("WebSocketHandler.get") == 0
    assert _coroutines("_DetachedReceive._read_frames") == 1
    # Frames still arrive, in order, with their acks.
    assert "serverTime" in await client.emit("system:ping", {})
    assert "serverTime" in await client.emit("system:ping", {})


def _own_dict(handler: GatewayHandler) -> bool:
    return any(type(r) is dict and "ws_connection" in r for r in gc.get_referents(handler))


@pytest.mark.asyncio
async def test_concurrent_handshakes_share_one_key_table(gateway):
    # Opened together, as under load: each handler was created before the
    # first had all its attributes (the case __init_subclass__ primes for).
    users = [f"u{i}" for i in range(40)]
    await asyncio.gather(*(gateway.connect(user) for user in users))
    handlers = [_handler(gateway, user) for user in users]
    # A handler whose attributes overflowed the shared table has a dict of
    # its own, which the collector then reaches from the handler.
    assert [h for h in handlers if _own_dict(h)] == []
    # Guard: every attribute tornado gave the handler is one the primer names.
    assert set(vars(handlers[0])) <= set(TORNADO_HANDLER_ATTRS)


@pytest.mark.asyncio
async def test_roles_are_one_shared_set_per_combination(gateway):
    await gateway.connect("alice", roles=("user", "moderator"))
    await gateway.connect("bob", roles=("moderator", "user"))
    assert _handler(gateway, "alice").roles is _handler(gateway, "bob").roles
