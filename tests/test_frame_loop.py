"""handlers/base.py ``_DetachedReceive``: text frames are handled in the frame reader's task.

Tornado would run each frame's ``on_message`` as a task of its own, started
a loop iteration later; the gateway's reader awaits it in its own task
instead. These check that what tornado did around it still holds: frames
one at a time in order, a failing handler closes the connection
(tests/test_frames.py has the reader's framing rules).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from handlers.base import GatewayHandler
from server.core import protocol
from switchboard_client import ConnectionClosed

pytestmark = pytest.mark.asyncio


def _handler(gateway: Any, user_id: str) -> GatewayHandler:
    [conn] = [c for c in gateway.node.hub.connections.values() if c.user_id == user_id]
    assert isinstance(conn, GatewayHandler)
    return conn


async def test_a_frame_is_handled_in_the_frame_loops_task(gateway: Any) -> None:
    client = await gateway.connect("alice")
    handler = _handler(gateway, "alice")
    tasks: list[asyncio.Task[Any] | None] = []
    handle = handler.handle_envelope

    async def recording(envelope: protocol.Envelope) -> None:
        tasks.append(asyncio.current_task())
        await handle(envelope)

    # An instance attribute (tornado's handlers keep a dict): this connection only.
    handler.handle_envelope = recording  # type: ignore[method-assign]
    assert "serverTime" in await client.emit("system:ping", {})
    assert "serverTime" in await client.emit("system:ping", {})
    assert tasks == [handler._receiving, handler._receiving]


async def test_frames_are_answered_in_order(gateway: Any) -> None:
    client = await gateway.connect("alice")
    await client.emit("room:create", {"roomId": "lobby", "name": "Lobby"})
    await client.emit("room:join", {"roomId": "lobby"})
    sends = [
        client.emit("message:send", {"roomId": "lobby", "content": str(n)}) for n in range(20)
    ]
    acks = await asyncio.gather(*sends)
    assert [ack["message"]["content"] for ack in acks] == [str(n) for n in range(20)]
    assert [ack["message"]["seq"] for ack in acks] == sorted(ack["message"]["seq"] for ack in acks)


async def test_a_failing_handler_closes_the_connection(gateway: Any) -> None:
    client = await gateway.connect("alice")
    handler = _handler(gateway, "alice")

    async def broken(envelope: protocol.Envelope) -> None:
        raise RuntimeError("a bug past handle_envelope's own error handling")

    handler.handle_envelope = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionClosed):
        await client.emit("system:ping", {})
