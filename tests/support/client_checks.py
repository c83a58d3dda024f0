"""Test assertions about what a :class:`switchboard_client.Client` received.

"Nothing arrived" is proved with a barrier, never with a pause: a
``system:ping`` round trip on the client's own connection. A node writes to
one connection in order (a queued broadcast goes out before a direct write,
see ``Hub.send_soon``), so once the pong is back every frame the node had
queued for this client before the ping is in its buffer. That covers
anything the node decided before it read the ping: a delivery caused by an
action whose ack the test already holds, on the same node.

A frame that travels through another node (the Redis mirror) is not ordered
with this connection's pong. Such a test sends a sentinel along the same
path after the action (a message from the same node into the same room),
waits for it, and then checks with ``ping=False``: the Redis channel
keeps order, so anything unwanted would have arrived before the sentinel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from server.app import Node
from server.realtime.hub import Hub, Target
from switchboard_client import Client, Predicate
from tests.support.waiting import eventually

#: A sentinel crosses Redis to another node; generous for a loaded CI box.
SENTINEL_TIMEOUT_SECS = 10.0


async def barrier(*clients: Client) -> None:
    """A ping round trip per connected client: what the node queued before is here."""
    for client in clients:
        if client.connected:
            await client.emit("system:ping")


async def assert_no_event(
    client: Client,
    name: str | None = None,
    predicate: Predicate | None = None,
    *,
    ping: bool = True,
) -> None:
    """Fail if a ``name`` frame (matching ``predicate``) reached ``client``; consume nothing.

    With ``ping`` (the default) a ping round trip comes first (see the
    module docstring); pass ``ping=False`` after a sentinel of your own.
    A closed client is checked as it is.

    Example::

        await alice.emit("message:send", {"roomId": rid, "content": "hi"})
        await assert_no_event(outsider, "message:new")
    """
    if ping and client.connected:
        await client.emit("system:ping")
    found = client.buffered(name, predicate)
    if found:
        raise AssertionError(f"unexpected {name or 'event'!r} frame on {client.url}: {found[0]}")


async def nothing_arrived(clients: Iterable[Client], *events: str) -> None:
    """:func:`assert_no_event` for each client and each of ``events``."""
    for client in clients:
        await barrier(client)
        for event in events:
            await assert_no_event(client, event, ping=False)


async def settle(*clients: Client) -> None:
    """Barrier: everything sent to these clients so far has arrived; then forget it."""
    for client in clients:
        await barrier(client)
        client.drain_events()


async def sentinel_message(sender: Client, room_id: str, *receivers: Client) -> None:
    """Barrier across nodes: ``sender`` posts a sentinel to ``room_id``; each receiver gets it.

    The sentinel travels the way the room's earlier messages did (the same
    node, the same Redis channel, which keeps order), so whatever those
    caused has reached each receiver once it is here. It is consumed; the
    frames before it stay buffered for :func:`assert_no_event` with ``ping=False``.
    """
    content = f"sentinel {os.urandom(4).hex()}"
    await sender.emit("message:send", {"roomId": room_id, "content": content})
    for client in receivers:
        await client.next_event(
            "message:new",
            timeout=SENTINEL_TIMEOUT_SECS,
            predicate=lambda f: f["data"]["message"]["content"] == content,
        )


async def sentinel_event(hub: Hub, target: Target, *receivers: Client) -> None:
    """Barrier across nodes: ``hub`` publishes ``test:sentinel`` to ``target``; each receiver
    gets it (consumed).

    A node publishes in order over one Redis connection and Redis delivers
    in order, so whatever ``hub`` published before has reached each receiver
    once the sentinel is here.
    """
    hub.publish(target, "test:sentinel", {})
    for client in receivers:
        await client.next_event("test:sentinel", timeout=SENTINEL_TIMEOUT_SECS)


async def background_done(node: Node, *closed: Client, timeout: float = 5.0) -> None:
    """Barrier for what ``node`` does in background tasks: wait until none is running.

    Clean-up after a close, notices from the notifier's drainer, security
    alerts and moderation's follow-ups run as tasks after the action's ack;
    a "nothing arrived" check about them waits for this first, then pings.
    ``closed``: clients the test just closed; the node may see the close a
    little after the client does, and spawns its clean-up only then, so
    their connections leaving the node's hub is waited for first.

    Example::

        await bob.aclose()
        await background_done(gateway.node, bob)
        await assert_no_event(alice, "user:status_changed")
    """
    gone = [client.welcome["connectionId"] for client in closed if client.welcome]
    await eventually(
        lambda: not any(conn_id in node.hub.connections for conn_id in gone),
        timeout=timeout,
        what="the node noticed the close",
    )
    await node.tasks.drain(timeout)
    assert len(node.tasks) == 0, f"{len(node.tasks)} background task(s) still running"
