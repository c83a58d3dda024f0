"""handlers/schemas.py: the marshmallow-free load of a common ``message:send``.

``load(MessageSend, data)`` takes the common shape without marshmallow. It
must give what marshmallow gives, and hand everything else (every invalid
input among them) to marshmallow, so results and errors stay identical.
Each case here runs both ways: over every field's bounds and types, missing
and unknown fields, and a seeded random mix of them all.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from marshmallow import ValidationError

from handlers import schemas as s
from server.core import errors

INT64_MAX = 2**63 - 1
ABSENT = object()

#: Candidate values per field: valid ones, edges and wrong types (ABSENT: key left out).
VALUES: dict[str, list[Any]] = {
    "roomId": [
        ABSENT, "general", "a", "r" * 64, "r" * 65, "", "bad room", "général", "general\n",
        None, 7, ["general"], {"id": "general"}, True,
    ],
    "content": [
        ABSENT, "hi", "x" * 4000, "x" * 4001, "", "\x00", "\x01hi\x7f", "tab\tand\nnewline",
        "x" * 4000 + "\x00", "ünïcødé 🎉", None, 5, 1.5, True, ["hi"], {"text": "hi"},
    ],
    "type": [ABSENT, "text", "image", "file", "video", "", "TEXT", None, 1, ["text"]],
    "parentMessageId": [
        ABSENT, None, 1, INT64_MAX, INT64_MAX + 1, 0, -1, "42", "0", "x", 1.0, 2.5, True,
        False, [1],
    ],
    "attachments": [
        ABSENT, [], ["https://example.com/a.png"], ["ftp://example.com/a"], ["not a url"],
        ["https://x.io/" + "a" * 3000], ["https://e.com/a"] * 11, None, "https://e.com/a", {},
    ],
    "metadata": [
        ABSENT, {}, {"bt": 1.5}, {"k": "v", "n": None, "b": True, "l": [1, 2]},
        {"deep": {"a": {"b": 1}}}, {"x": "y" * 4100}, {"x": "y" * 4085},
        {"a": 1}, None, [], "meta", 3,
    ],
    "clientMsgId": [
        ABSENT, None, "c-1", "c" * 64, "c" * 65, "", "id\x00", "id\n", 12, ["c"], True,
    ],
}  # fmt: skip


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"d": value}
    return value


VALUES["metadata"] += [_deep(32), _deep(33), {1: "int key"}]


def build(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not ABSENT}


def by_marshmallow(data: Any) -> tuple[str, Any]:
    try:
        return "ok", s._instance(s.MessageSend).load(data)
    except ValidationError as exc:
        return "error", errors.ValidationFailed.from_marshmallow(exc).to_dict()


def by_load(data: Any) -> tuple[str, Any]:
    try:
        return "ok", s.load(s.MessageSend, data)
    except errors.ValidationFailed as exc:
        return "error", exc.to_dict()


def check(data: Any) -> bool:
    """Both ways agree on ``data``; True when the common path took it."""
    expected = by_marshmallow(data)
    assert by_load(data) == expected, data
    common = s._message_send_common(data)
    if common is None:
        return False
    assert expected == ("ok", common), data
    return True


def cases() -> list[dict[str, Any]]:
    base = {"roomId": "general", "content": "hi"}
    out = []
    # Every value of every field, the others at the base.
    for name, values in VALUES.items():
        for value in values:
            out.append(build(**{**base, name: value}))
    # Every pair of fields over a few values each.
    for a, b in itertools.combinations(VALUES, 2):
        for va, vb in itertools.product(VALUES[a][:6], VALUES[b][:6]):
            out.append(build(**{**base, a: va, b: vb}))
    # A seeded random mix of everything, unknown fields included.
    rng = random.Random(16)
    for _ in range(3000):
        data = build(**{name: rng.choice(values) for name, values in VALUES.items()})
        if rng.random() < 0.3:
            data[rng.choice(["room_id", "extra", "client_msg_id", "Content"])] = rng.choice(
                [1, "x", None, {}]
            )
        out.append(data)
    return out


def test_load_agrees_with_marshmallow_on_every_case() -> None:
    taken = sum(check(data) for data in cases())
    # Not vacuous: the common path took a good share of the valid inputs.
    assert taken > 200


@pytest.mark.parametrize(
    "data",
    [
        {"roomId": "general", "content": "hi"},
        {"roomId": "r1", "content": "hello", "metadata": {"bt": 1764264000.123}},
        {"roomId": "r1", "content": "x", "type": "image", "clientMsgId": "c-1",
         "parentMessageId": 9, "attachments": [], "metadata": {}, "extra": True},
    ],
)  # fmt: skip
def test_common_sends_skip_marshmallow(data: dict[str, Any]) -> None:
    assert check(data)


@pytest.mark.parametrize(
    "data",
    [
        {"roomId": "general", "content": ""},
        {"roomId": "general", "content": "hi", "attachments": ["https://e.com/a.png"]},
        {"roomId": "general", "content": "hi", "parentMessageId": "42"},
        {"roomId": "general", "content": "hi", "metadata": _deep(33)},
        ["not", "an", "object"],
        None,
    ],
)
def test_other_inputs_go_to_marshmallow(data: Any) -> None:
    assert not check(data)


def test_loaded_defaults_are_fresh_objects() -> None:
    first = s.load(s.MessageSend, {"roomId": "r", "content": "a"})
    first["attachments"].append("x")
    first["metadata"]["k"] = 1
    second = s.load(s.MessageSend, {"roomId": "r", "content": "a"})
    assert second["attachments"] == [] and second["metadata"] == {}


def test_metadata_is_copied_not_shared() -> None:
    metadata = {"bt": 1.0}
    loaded = s.load(s.MessageSend, {"roomId": "r", "content": "a", "metadata": metadata})
    assert loaded["metadata"] == metadata and loaded["metadata"] is not metadata
