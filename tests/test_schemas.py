"""handlers/schemas.py: every field of every schema is bounded, and the bounded field types.

The audit walks every marshmallow schema defined in a ``handlers`` module
(socket events, REST queries and bodies), so a field added later without a
bound fails here before a fuzzer or an attacker finds it. What each bound
looks like to a client is tested end to end in the namespace test files and
tests/test_fuzz.py.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import pkgutil
import re
from typing import Any

import pytest
from marshmallow import Schema, ValidationError, fields, validate

import handlers
from handlers import schemas as s

INT64_MAX = 2**63 - 1
# A regexp bounds a string when its last quantifier is {m,n} right before \Z.
_BOUNDED_PATTERN = re.compile(r"\{\d+,\d+\}\\Z$")


def all_schemas() -> list[type[Schema]]:
    found: dict[str, type[Schema]] = {}
    for info in pkgutil.iter_modules(handlers.__path__):
        module = importlib.import_module(f"handlers.{info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, Schema)
                and value.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = value
    return list(found.values())


def _has(field: fields.Field[Any], kind: type, check: Any = lambda v: True) -> bool:
    return any(isinstance(v, kind) and check(v) for v in field.validators)


def why_unbounded(field: fields.Field[Any]) -> str | None:
    """None if the field bounds what it accepts, else the reason it does not."""
    if isinstance(field, fields.Nested):
        return None  # its schema is audited on its own
    if isinstance(field, fields.List):
        if not _has(field, validate.Length, lambda v: v.max is not None):
            return "a list without a maximum count"
        assert field.inner is not None
        return why_unbounded(field.inner)
    if isinstance(field, fields.Dict):
        return None if isinstance(field, s.JSONObject) else "a dict that is not a JSONObject"
    if isinstance(field, fields.DateTime):
        return None if isinstance(field, s.Timestamp) else "a date-time that is not a Timestamp"
    if isinstance(field, fields.Integer):
        return None if isinstance(field, s.Int) else "an integer that is not an Int"
    if isinstance(field, fields.Float):
        return None if isinstance(field, s.Float) else "a float that is not a bounded Float"
    if isinstance(field, fields.Boolean | s.MessageIdField):
        return None
    if isinstance(field, fields.String):
        if _has(field, validate.Length, lambda v: v.max is not None) or _has(field, validate.OneOf):
            return None
        if _has(field, validate.Regexp, lambda v: _BOUNDED_PATTERN.search(v.regex.pattern)):
            return None
        return "a string without a maximum length"
    return f"an unaudited field type {type(field).__name__}"


def test_every_field_of_every_schema_is_bounded() -> None:
    schemas = all_schemas()
    # The walk does find the socket events and the REST bodies.
    names = {schema.__name__ for schema in schemas}
    assert {"MessageSend", "RoomJoin", "Ping", "HistoryQuery", "Publish", "IngestEntry"} <= names
    problems = [
        f"{schema.__module__}.{schema.__name__}.{name}: {reason}"
        for schema in schemas
        for name, field in schema().load_fields.items()
        if (reason := why_unbounded(field)) is not None
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("value", "loaded"),
    [(0, 0), (INT64_MAX, INT64_MAX), ("42", 42), ("-0", 0), (7.0, 7), (1e3, 1000)],
)
def test_int_accepts_integers_integral_floats_and_ascii_digits(value: Any, loaded: int) -> None:
    assert s.Int(-5).deserialize(value) == loaded


@pytest.mark.parametrize(
    "value",
    [True, False, 5.5, float("inf"), float("nan"), "1_000", " 5", "5 ", "²", "١٢", "0x10", "1e3",
     "", None, [], {}, "9" * 20],
)  # fmt: skip
def test_int_refuses_what_is_not_plainly_an_integer(value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        s.Int(allow_none=False).deserialize(value)
    assert info.value.messages in (["Not a valid integer."], ["Field may not be null."])


def test_int_bounds_name_the_range_and_stay_within_int64() -> None:
    with pytest.raises(ValidationError) as info:
        s.Int(1).deserialize(2**63)
    assert info.value.messages == [
        "Must be greater than or equal to 1 and less than or equal to 9223372036854775807."
    ]
    with pytest.raises(ValueError):
        s.Int(0, 2**63)


@pytest.mark.parametrize("value", [float("inf"), -1.0, s.MAX_EPOCH_MS + 1, True, "nan"])
def test_float_is_finite_and_ranged(value: Any) -> None:
    with pytest.raises(ValidationError):
        s.Float(0, s.MAX_EPOCH_MS).deserialize(value)


def test_timestamp_is_utc_within_its_years() -> None:
    field = s.Timestamp()
    assert field.deserialize("2026-01-02T03:04:05+01:00") == dt.datetime(
        2026, 1, 2, 2, 4, 5, tzinfo=dt.UTC
    )
    assert field.deserialize("2000-01-01T00:00:00").tzinfo == dt.UTC
    for value in ("1999-12-31T23:59:59Z", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00+01:00"):
        with pytest.raises(ValidationError):
            field.deserialize(value)


def test_json_depth_counts_objects_and_lists() -> None:
    assert s.json_depth(1, 32) == 0
    assert s.json_depth({}, 32) == 1
    assert s.json_depth({"a": [1, {"b": []}]}, 32) == 4
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    # Iterative, stops early: no recursion limit, no full walk.
    assert s.json_depth(deep, 32) == 33
