"""The wire format's small pieces: frame types and (de)serialisation helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _orjson = None  # type: ignore[assignment]

Frame = dict[str, Any]
"""A decoded frame, e.g. ``{"event": "message:new", "data": {...}}``."""
EventCallback = Callable[[Frame], Any]
"""Callback for :meth:`Client.on`: gets the whole frame; may return an awaitable."""
Predicate = Callable[[Frame], bool]

#: Longest slice of a bad frame quoted in a log line, in characters.
LOG_PREVIEW_CHARS: Final = 200


def dumps(obj: Any) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(raw: str | bytes) -> Any:
    if _orjson is not None:
        return _orjson.loads(raw)
    return json.loads(raw)


def preview(raw: str | bytes) -> str:
    """``raw`` as text, cut for a log line."""
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
    return text if len(text) <= LOG_PREVIEW_CHARS else text[:LOG_PREVIEW_CHARS] + "…"


def as_int(value: Any) -> int | None:
    """``value`` if it is a JSON integer (not a bool), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
