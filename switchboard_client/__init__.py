"""Async Python client for the Switchboard WebSocket gateway.

A package of its own, used by the gateway's ``switchboard tail``, the test
suite and the benchmarks. It speaks the wire protocol of SPEC §2 on top of
tornado's own WebSocket client:

* client → server ``{"event": name, "data": {...}, "ack": n}`` (``ack`` optional);
* server → client ack ``{"ack": n, "ok": true, "data": {...}}`` or
  ``{"ack": n, "ok": false, "error": {"code", "message", "details"}}``;
* server → client event ``{"event": name, "data": {...}}``.

Every server event frame is appended to an in-memory buffer (consumed by
:meth:`Client.next_event`, never discarded when it does not match), to the
:attr:`Client.events` history, and passed to callbacks registered with
:meth:`Client.on`.

With ``reconnect=True`` the client survives dropped connections: it retries
with capped, jittered exponential backoff, resumes every room it joined
through :meth:`Client.emit` with one ``room:resume`` (``sinceSeq``: the highest
contiguous ``seq``, :meth:`Client.contiguous_seq`; the room's ``epoch`` from its
join ack; one ``room:join {sinceSeq}`` per room on gateways without
``room:resume``), and replays the missed messages as ``message:new`` frames
flagged ``"recovered": True``. A live message that arrives after a gap in its
room's ``seq`` is held for ``hole_wait`` seconds, then the missing ones are
fetched and delivered the same way, in order and once. Local pseudo-events
(all prefixed ``client:``):

* ``client:disconnected`` ``{code, reason, willReconnect}`` — connection lost;
* ``client:reconnected`` ``{attempts, welcome, rooms}`` — back, rooms re-joined;
* ``client:rejoin_failed`` ``{roomId, error}`` — a room could not be re-joined;
* ``client:room_reset`` ``{roomId}`` — the room's history changed while away
  (another epoch): what the application holds of it is stale; re-joined afresh;
* ``client:reconnect_failed`` ``{code, message, closeCode, attempts}`` — the
  server refused the reconnection for good (4401/4403/4429).

Example::

    async with Client("ws://127.0.0.1:8080/ws/chat", token) as client:
        room = (await client.emit("room:create", {"name": "general", "type": "public"}))["room"]
        await client.emit("room:join", {"roomId": room["id"]})
        await client.emit("message:send", {"roomId": room["id"], "content": "hi"})
        frame = await client.next_event("message:new")
        print(frame["data"]["message"]["seq"])
"""

from switchboard_client.client import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FATAL_CLOSE_CODES,
    Client,
    TokenLocation,
    connect,
)
from switchboard_client.errors import ClientError, ConnectionClosed, HandshakeError
from switchboard_client.wire import EventCallback, Frame, Predicate

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FATAL_CLOSE_CODES",
    "Client",
    "ClientError",
    "ConnectionClosed",
    "EventCallback",
    "Frame",
    "HandshakeError",
    "Predicate",
    "TokenLocation",
    "connect",
]
