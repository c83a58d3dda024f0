"""What an open connection keeps: not the handshake's headers (issue 16, idle memory).

``bench.idle`` measures the bytes; these tests pin the behaviour the savings
rest on, and fail if a tornado upgrade keeps the headers somewhere new.
"""

from __future__ import annotations

from typing import Any

import pytest
from tornado.httputil import HTTPHeaders

from handlers.base import GatewayHandler


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
