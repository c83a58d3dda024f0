"""Socket.IO v4 over engine.io v4, WebSocket transport only: the packet codec and a lean client.

Just what the peer benchmark needs, written from the protocol (no Socket.IO
client library: the same framing and costs as Switchboard's lean client,
``bench/_wsclient.py``). One engine.io packet per WebSocket text frame:

* engine.io type digit: ``0`` open (``0{"sid":..,"pingInterval":..}``),
  ``1`` close, ``2`` ping (server -> client), ``3`` pong, ``4`` message;
* a message carries a Socket.IO packet, type digit then payload on the
  default namespace: ``40{..}`` connect (client: auth payload; server: ok
  with the sid), ``44{"message":..}`` connect error, ``42["ev",data]`` event,
  ``42<id>["ev",data]`` event wanting an ack, ``43<id>[data..]`` the ack.

The client connects with ``40{"token": JWT}`` once the server's open packet
arrives; ``welcome`` resolves on ``40{...}`` and fails on ``44{...}``.
Deliveries (``42["message",..]``) are not JSON-decoded: the ``"bt":`` stamp is
found with ``bytes.find``, as for Switchboard's ``message:new``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bench._wsclient import LeanWS, Tally, count_stamped

__all__ = ["PATH", "SioWS", "Tally", "decode", "encode_ack", "encode_connect", "encode_event"]

PATH = "/socket.io/?EIO=4&transport=websocket"
OPEN, CLOSE, PING, PONG, MESSAGE = b"0", b"1", b"2", b"3", b"4"
CONNECT, EVENT, ACK, CONNECT_ERROR = b"40", b"42", b"43", b"44"
#: The prefix of a room broadcast from the peer servers (event ``message``).
_DELIVERY = b'42["message",'
_BT = b'"bt":'


def encode_connect(auth: dict[str, Any]) -> bytes:
    """The client's connect packet to the default namespace, with its auth payload."""
    return CONNECT + orjson.dumps(auth)


def encode_event(event: str, data: Any, ack_id: int | None = None) -> bytes:
    """``42["event",data]``, or ``42<ack_id>["event",data]`` when an ack is wanted."""
    head = EVENT if ack_id is None else EVENT + str(ack_id).encode()
    return head + orjson.dumps([event, data])


def encode_ack(ack_id: int, *args: Any) -> bytes:
    """``43<ack_id>[args..]``: the answer to an event that asked for an ack."""
    return ACK + str(ack_id).encode() + orjson.dumps(list(args))


def decode(packet: bytes) -> tuple[str, int | None, Any]:
    """``(kind, ack_id, payload)`` of one engine.io packet (one text frame).

    kind: ``open``, ``close``, ``ping``, ``pong``, ``connect``, ``connect_error``,
    ``disconnect``, ``event`` (payload ``[name, args..]``), ``ack`` (payload the
    ack's argument list). ``ack_id`` for ``event`` (when it wants one) and ``ack``.
    Raises ``ValueError`` on anything else.
    """
    if not packet:
        raise ValueError("empty packet")
    eio = packet[:1]
    if eio == OPEN:
        return "open", None, orjson.loads(packet[1:])
    if eio in (PING, PONG, CLOSE):
        return {PING: "ping", PONG: "pong", CLOSE: "close"}[eio], None, None
    if eio != MESSAGE or len(packet) < 2:
        raise ValueError(f"not an engine.io v4 packet: {packet[:20]!r}")
    kind = {b"0": "connect", b"1": "disconnect", b"2": "event", b"3": "ack", b"4": "connect_error"}
    sio = packet[1:2].decode()
    if sio.encode() not in kind:
        raise ValueError(f"unknown Socket.IO packet type {sio!r}")
    rest = packet[2:]
    if rest.startswith(b"/"):
        raise ValueError("only the default namespace is spoken here")
    digits = 0
    while digits < len(rest) and 0x30 <= rest[digits] <= 0x39:
        digits += 1
    ack_id = int(rest[:digits]) if digits else None
    body = rest[digits:]
    return kind[sio.encode()], ack_id, orjson.loads(body) if body else None


class SioWS(LeanWS):
    """A lean Socket.IO v4 client on :class:`LeanWS`' framing (see the module docstring).

    ``request``/``request_future`` are :class:`LeanWS`' own: their futures resolve to
    the ack's first argument, ``{"ok": true, ...}`` from the peer servers.
    """

    def __init__(self, host: str, port: int, path: str, token: str, tally: Tally) -> None:
        super().__init__(host, port, path, token, tally)
        # The token goes in the connect packet, not in a header.
        self._request = self._request.replace(f"Authorization: Bearer {token}\r\n", "")
        self._token = token

    def _on_text(self, data: bytes, start: int, end: int, now: float) -> float:
        tally = self.tally
        if data.startswith(_DELIVERY, start):
            p = data.find(_BT, start, end)
            if p >= 0:
                return count_stamped(tally, data, p, end, now)
            tally.other += 1
            return now
        head = data[start : start + 2]
        if head == ACK:
            _, ack_id, args = decode(data[start:end])
            self._answer(ack_id or 0, args[0] if args else {})
        elif head[:1] == PING:
            self._send(PONG)
        elif head[:1] == OPEN:
            self._send(encode_connect({"token": self._token}))
        elif head == CONNECT:
            if not self.welcome.done():
                self.welcome.set_result(orjson.loads(data[start + 2 : end] or b"{}"))
        elif head == CONNECT_ERROR:
            if not self.welcome.done():
                reason = orjson.loads(data[start + 2 : end]).get("message")
                self.welcome.set_exception(ConnectionError(f"connect refused: {reason}"))
            if self.transport is not None:
                self.transport.close()
        else:
            tally.other += 1
        return now

    @staticmethod
    def encode(event: str, data: dict[str, Any], ack_id: int | None) -> bytes:
        return encode_event(event, data, ack_id)

    def join(self, room: str) -> Any:
        return self.request("join", {"room": room})

    def post(self, room: str, content: str, bt: float) -> asyncio.Future[dict[str, Any]]:
        data = {"room": room, "content": content, "metadata": {"bt": bt}}
        return self.request_future("send", data)
