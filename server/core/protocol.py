"""The wire format: JSON envelopes and pre-built WebSocket frames.

Client → server: ``{"event": name, "data": {...}, "ack": int}``.
Server → client: events ``{"event", "data"}`` and acks
``{"ack", "ok", "data" | "error"}``. See docs/protocol.md.

Broadcasts are encoded once: :func:`event_frame` returns the complete
WebSocket frame (header + payload) so the hub can write the very same bytes
to every recipient's stream.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from server.core.errors import BadRequest, GatewayError

_FIN_TEXT = 0x81  # FIN bit + opcode 0x1 (text)
#: The largest id, seq or ack on the wire: what PostgreSQL BIGINT and SQLite INTEGER hold.
INT64_MAX = 2**63 - 1
MAX_EVENT_CHARS = 64


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded client frame."""

    event: str
    data: dict[str, Any]
    ack: int | None


def decode_envelope(raw: str | bytes) -> Envelope:
    """Parse and check a client frame, raising :class:`BadRequest` with the reason.

    The ack id is recovered even when the rest is wrong, so the error can
    still be answered as an ack: see :func:`salvage_ack`.
    """
    try:
        # Also refuses what JSON cannot carry safely: NaN, 1e400, lone
        # surrogates, nesting beyond 1024 levels.
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("Frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("Frame must be a JSON object")
    event = obj.get("event")
    if not isinstance(event, str) or not event or len(event) > MAX_EVENT_CHARS:
        raise BadRequest(
            f"'event' must be a string of 1 to {MAX_EVENT_CHARS} characters", {"field": "event"}
        )
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest("'data' must be an object", {"field": "data"})
    ack = obj.get("ack")
    if ack is not None and not _is_ack(ack):
        raise BadRequest(f"'ack' must be an integer from 0 to {INT64_MAX}", {"field": "ack"})
    return Envelope(event, data, ack)


def _is_ack(value: Any) -> bool:
    return type(value) is int and 0 <= value <= INT64_MAX


def salvage_ack(raw: str | bytes) -> int | None:
    """The frame's ack id if it has a usable one, for answering a bad frame."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    ack = obj.get("ack") if isinstance(obj, dict) else None
    return ack if _is_ack(ack) else None


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def event_payload(event: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"event": event, "data": data})


def ack_payload(ack: int, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"ack": ack, "ok": True, "data": data})


def ack_error_payload(ack: int, error: GatewayError) -> bytes:
    return orjson.dumps({"ack": ack, "ok": False, "error": error.to_dict()})


def system_error_payload(error: GatewayError, event: str | None) -> bytes:
    return event_payload("system:error", {**error.to_dict(), "event": event})


def frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in one unmasked, uncompressed WebSocket text frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", _FIN_TEXT, n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", _FIN_TEXT, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, n)
    return header + payload


def event_frame(event: str, data: dict[str, Any]) -> bytes:
    return frame(event_payload(event, data))


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    """UTC ISO-8601 with milliseconds and ``Z`` (naive values are taken as UTC)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


def epoch_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)
