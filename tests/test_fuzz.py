"""Fuzzing: generated frames to every event of every namespace, and the REST inputs.

A production-mode node gets ``SWITCHBOARD_FUZZ_FRAMES`` (10,000) generated
frames spread over every inbound event of every WebSocket namespace. The
namespaces and events are read from the application's routes and each
handler class's ``schemas`` (plus the base ones), so a new event or
namespace is fuzzed without touching this file. Frames are valid payloads
built from the schemas' fields, then mutated: fields dropped or given
wrong types, extreme numbers (2^63, 2^64, 1e308, 1e400, -0.0), deep nesting
(300 levels), strings near and over the frame cap, odd unicode (lone
surrogates, NUL, RTL marks, ZWJ emoji, non-characters), broken envelopes
and random structural changes.

What must hold for every frame: a frame whose envelope carries a usable
``ack`` gets exactly one ack, and every error (ack or ``system:error``) has a
documented code other than ``INTERNAL_ERROR``. The only closes allowed are
the documented ones (4400 after 20 bad frames, 1009 over the frame cap); the
fuzzer then reconnects. Afterwards the node is ready, answers a ping, and a
bystander in an untouched room still receives ``message:new``; no log record
at ERROR or above was written during the run.

The REST endpoints with query strings and bodies (history, notifications,
logs, publish) get a few hundred requests: each is answered 2xx or a
documented 4xx, never 500.

The seed is printed; ``SWITCHBOARD_FUZZ_SEED=<n>`` replays a run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import time
import urllib.parse
from collections import Counter
from typing import Any

import orjson
import pytest
from marshmallow import Schema, fields, validate
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from handlers.base import GatewayHandler
from handlers.schemas import MessageIdField

pytestmark = pytest.mark.asyncio

#: Fixed, so a failure replays; set SWITCHBOARD_FUZZ_SEED to explore others.
SEED = int(os.environ.get("SWITCHBOARD_FUZZ_SEED") or 20261112)
FRAMES = int(os.environ.get("SWITCHBOARD_FUZZ_FRAMES", "10000"))
REST_REQUESTS = int(os.environ.get("SWITCHBOARD_FUZZ_REST", "400"))
#: Every event gets at least this many frames, whatever the total.
MIN_FRAMES_PER_EVENT = 150
ACK_WAIT_SECS = 10.0

#: The error codes of shared/SPEC.md (plus NOTIFICATION_NOT_FOUND, see
#: docs/protocol.md), without INTERNAL_ERROR: a fuzzed frame never earns that.
DOCUMENTED_CODES = frozenset({
    "BAD_REQUEST", "UNKNOWN_EVENT", "VALIDATION_ERROR", "UNAUTHORIZED", "TOKEN_EXPIRED",
    "FORBIDDEN", "BANNED", "MUTED", "ROOM_NOT_FOUND", "ROOM_ACCESS_DENIED", "NOT_IN_ROOM",
    "MESSAGE_NOT_FOUND", "NOTIFICATION_NOT_FOUND", "CONFLICT", "RATE_LIMITED",
    "TOO_MANY_CONNECTIONS", "PAYLOAD_TOO_LARGE", "SERVICE_UNAVAILABLE",
})  # fmt: skip
#: Closes a fuzzed connection may get: 4400 (20 bad frames in 10 s), 1009 (frame over the cap).
DOCUMENTED_CLOSES = frozenset({4400, 1009})
INT64_MAX = 2**63 - 1
JWT_SECRET = "fuzz-secret-" + "k" * 40
MAX_FRAME_BYTES = 64 * 1024
RATE_LIMITS = "messages=1000000/1m,joins=1000000/1m,typing=1000000/1m,other=1000000/1m"


# -- values -----------------------------------------------------------------------


class Raw(str):
    """JSON text spliced into a frame as is (numbers Python cannot write: 1e400, 2^64)."""


EXTREME_NUMBERS: list[Any] = [
    0, -1, 1, 2**31, 2**53 + 1, INT64_MAX, 2**63, 2**64 - 1, -(2**63), Raw("18446744073709551616"),
    Raw("-9223372036854775809"), Raw("123456789012345678901234567890"), 1e308, -1e308, -0.0,
    0.5, 1.5, 5e-324, 1e20, -1e20, Raw("1e400"), Raw("-1e400"), Raw("1E+999"), Raw("-0"),
]  # fmt: skip
ODD_TEXT = [
    "", " ", "\x00", "a\x00b", "\u200f\u202eevil", "👩\u200d👩\u200d👧\u200d👦", "\ufffe\uffff",
    "\U0010ffff", "\ud800", "x\udfffy", "\r\n", "\t", "0", "-1", "1e400", "NaN", "true",
    "١٢٣", "²", " 5", "5.0", "0x10", "%00", "../../etc/passwd", "<script>", "\U0001d54f" * 40,
]  # fmt: skip


def deep_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def deep_dict(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def nasty_value(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.35:
        return rng.choice(EXTREME_NUMBERS)
    if kind < 0.6:
        return rng.choice(ODD_TEXT)
    if kind < 0.7:
        return rng.choice([None, True, False, [], {}, [1, "a"], {"a": 1}])
    if kind < 0.8:
        return rng.choice([deep_list, deep_dict])(rng.choice([31, 32, 33, 100, 300]))
    if kind < 0.9:
        n = rng.choice([63, 64, 65, 100, 101, 128, 129, 200, 201, 500, 501, 2000, 4001, 8193])
        return rng.choice("aé😀\x00") * n
    return [
        rng.choice(EXTREME_NUMBERS + ODD_TEXT) for _ in range(rng.choice([1, 11, 51, 201, 501]))
    ]


def extreme_for(field: fields.Field[Any], rng: random.Random) -> Any:
    """A value at or past the edge of what ``field`` accepts."""
    if isinstance(field, fields.Integer | fields.Float | MessageIdField):
        number = rng.choice(EXTREME_NUMBERS)
        if rng.random() < 0.3:
            return str(number) if not isinstance(number, Raw) else number
        return number
    if isinstance(field, fields.Dict):
        depth = rng.choice([31, 32, 33, 300])
        return rng.choice([deep_dict(depth), {"a": deep_list(depth)}, {"big": "x" * 5000}])
    if isinstance(field, fields.List):
        return rng.choice([deep_list(300), ["a"] * 1001, [rng.choice(ODD_TEXT)] * 11])
    if isinstance(field, fields.DateTime):
        return rng.choice([
            "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00", "1999-12-31T23:59:59Z",
            "2026-13-45T00:00:00Z", "99999-01-01T00:00:00Z", "1970-01-01T00:00:00",
        ])  # fmt: skip
    if isinstance(field, fields.Boolean):
        return rng.choice(["yes", 2, -0.0, "\x00"])
    return rng.choice(ODD_TEXT) * rng.choice([1, 17, 65, 129, 501, 4001])


def encode(frame: Any) -> str:
    """Frame → JSON text; :class:`Raw` values spliced in, lone surrogates escaped."""
    raws: dict[str, str] = {}

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            key = f"__raw{len(raws)}__"
            raws[key] = str(value)
            return key
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    # The stdlib writes big ints and escapes lone surrogates (orjson can do neither).
    text = json.dumps(swap(frame), ensure_ascii=True, allow_nan=True)
    for key, raw in raws.items():
        text = text.replace(f'"{key}"', raw)
    return text


# -- valid payloads from the schemas ------------------------------------------------


@dataclasses.dataclass
class Pools:
    """Ids the fuzzer picks valid-looking values from, grown from the acks."""

    rooms: list[str]
    users: list[str]
    messages: list[int]
    notifications: list[int]
    tokens: list[str]

    def copy(self) -> Pools:
        """One namespace's own pools: concurrent fuzzers must not change each other's draws."""
        return Pools(*(list(getattr(self, f.name)) for f in dataclasses.fields(self)))


def pick(rng: random.Random, pool: list[Any]) -> Any:
    """Like ``rng.choice`` but one draw whatever the pool's size, so runs replay exactly."""
    return pool[int(rng.random() * len(pool))]


def _validator(field: fields.Field[Any], kind: type) -> Any:
    return next((v for v in field.validators if isinstance(v, kind)), None)


def valid_value(name: str, field: fields.Field[Any], rng: random.Random, pools: Pools) -> Any:
    if name in ("roomId",):
        return pick(rng, pools.rooms)
    if name in ("userId", "userIds", "members"):
        many = isinstance(field, fields.List)
        return rng.sample(pools.users, rng.randint(1, 3)) if many else rng.choice(pools.users)
    if name == "token":
        return pick(rng, pools.tokens)
    if isinstance(field, MessageIdField):
        pool = pools.notifications if "otification" in type(field).__name__ else pools.messages
        value = pick(rng, pool) if pool and rng.random() < 0.8 else rng.randint(1, 10**6)
        return str(value) if rng.random() < 0.7 else value
    one_of = _validator(field, validate.OneOf)
    if one_of is not None:
        return rng.choice(list(one_of.choices))
    if isinstance(field, fields.Nested):
        schema = field.schema
        return valid_payload(schema, rng, pools)
    if isinstance(field, fields.List):
        if field.inner is not None and _validator(field.inner, validate.OneOf) is not None:
            choices = list(_validator(field.inner, validate.OneOf).choices)
            return rng.sample(choices, rng.randint(1, len(choices)))
        count = rng.randint(1, 3)
        return [valid_value(name, field.inner, rng, pools) for _ in range(count)]
    if isinstance(field, fields.Dict):
        return {"k": rng.randint(0, 9), "nested": {"ok": True}}
    if isinstance(field, fields.Boolean):
        return rng.random() < 0.5
    if isinstance(field, fields.DateTime):
        return "2026-01-02T03:04:05.678Z"
    if isinstance(field, fields.Url):
        return f"https://example.com/{rng.randint(0, 999)}.png"
    if isinstance(field, fields.Integer):
        bounds = _validator(field, validate.Range)
        low = bounds.min if bounds is not None and bounds.min is not None else 0
        high = bounds.max if bounds is not None and bounds.max is not None else low + 100
        return rng.randint(low, min(high, low + 100))
    if isinstance(field, fields.Float):
        return float(int(time.time() * 1000) - rng.randint(0, 1000))
    if name == "level":
        return rng.choice(["debug", "INFO", "warn", "error"])
    if name == "emoji":
        return rng.choice(["👍", "🎉", "+1", "👩\u200d👩\u200d👧"])
    length = _validator(field, validate.Length)
    regexp = _validator(field, validate.Regexp)
    if regexp is not None:
        return f"fz-{rng.randint(0, 10**6)}"
    low = length.min if length is not None and length.min is not None else 1
    high = length.max if length is not None and length.max is not None else 20
    return "".join(rng.choice("abc xyz@é") for _ in range(rng.randint(max(low, 1), min(high, 24))))


def valid_payload(
    schema: Schema | type[Schema], rng: random.Random, pools: Pools
) -> dict[str, Any]:
    instance = schema() if isinstance(schema, type) else schema
    payload: dict[str, Any] = {}
    for attr, field in instance.load_fields.items():
        name = field.data_key or attr
        if not field.required and rng.random() < 0.4:
            continue
        payload[name] = valid_value(name, field, rng, pools)
    return payload


# -- mutations ----------------------------------------------------------------------


def mutate_structure(value: Any, rng: random.Random, budget: int = 3) -> Any:
    """A random structural change somewhere inside ``value``."""
    if budget <= 0:
        return nasty_value(rng)
    if isinstance(value, dict) and value and rng.random() < 0.7:
        out = dict(value)
        key = rng.choice(list(out))
        action = rng.random()
        if action < 0.5:
            out[key] = mutate_structure(out[key], rng, budget - 1)
        elif action < 0.7:
            del out[key]
        elif action < 0.85:
            out[key] = [out[key]] * rng.randint(1, 3)
        else:
            out[key] = {key: out[key]}
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out_list = list(value)
        index = rng.randrange(len(out_list))
        out_list[index] = mutate_structure(out_list[index], rng, budget - 1)
        if rng.random() < 0.3:
            out_list *= rng.randint(2, 50)
        return out_list
    action = rng.random()
    if action < 0.3 and isinstance(value, str):
        return value + rng.choice(ODD_TEXT)
    if action < 0.5 and isinstance(value, int | float) and not isinstance(value, bool):
        return rng.choice([value + 1, value - 1, -value, value * 2**40, str(value)])
    return nasty_value(rng)


@dataclasses.dataclass
class Frame:
    text: str
    kind: str
    #: The ack the server must answer with (None: no usable ack in the frame).
    ack: int | None


def usable_ack(text: str) -> int | None:
    """The documented rule: a JSON object whose ``ack`` is an integer in 0..2^63-1."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    ack = obj.get("ack") if isinstance(obj, dict) else None
    if isinstance(ack, int) and not isinstance(ack, bool) and 0 <= ack <= INT64_MAX:
        return ack
    return None


class FrameMaker:
    """Generated frames for one namespace's events."""

    def __init__(self, rng: random.Random, pools: Pools, events: dict[str, type[Schema]]) -> None:
        self.rng = rng
        self.pools = pools
        self.events = events
        # Instances, not classes: building a schema deep-copies its fields.
        self.schemas = {event: schema() for event, schema in events.items()}
        self.next_ack = rng.randint(1, 2**40)
        self.oversized_left = 2  # a 1009 close costs a reconnect: only a few per namespace

    def make(self, event: str) -> Frame:
        rng = self.rng
        payload = valid_payload(self.schemas[event], rng, self.pools)
        self.next_ack += 1
        envelope: dict[str, Any] = {"event": event, "data": payload, "ack": self.next_ack}
        roll = rng.random()
        if roll < 0.12:
            kind = "valid"
        elif roll < 0.22:
            kind = "drop"
            if payload:
                del payload[rng.choice(list(payload))]
        elif roll < 0.52:
            fields_ = list(self.schemas[event].load_fields.values()) or [fields.Raw(data_key="x")]
            field = rng.choice(fields_)
            if rng.random() < 0.5:
                kind = "retype"
                payload[field.data_key or field.name] = nasty_value(rng)
            else:
                kind = "extreme"
                payload[field.data_key or field.name] = extreme_for(field, rng)
        elif roll < 0.57:
            kind = "extra"
            payload[rng.choice(["zzz", "__proto__", "constructor", "a" * 300, ""])] = nasty_value(
                rng
            )
        elif roll < 0.80:
            kind = "structure"
            envelope["data"] = mutate_structure(payload, rng, rng.randint(1, 4))
        elif roll < 0.85:
            kind = "no-ack"
            del envelope["ack"]
            if rng.random() < 0.5:
                envelope["data"] = mutate_structure(payload, rng)
        elif roll < 0.93:
            kind = "envelope"
            self._break_envelope(envelope)
        elif roll < 0.995 or not self.oversized_left:
            kind = "raw"
            return Frame(self._raw(envelope), kind, None)
        else:
            kind = "oversized"
            self.oversized_left -= 1
            payload["pad"] = "x" * rng.choice([MAX_FRAME_BYTES - 200, MAX_FRAME_BYTES + 1])
        text = encode(envelope)
        return Frame(text, kind, usable_ack(text))

    def _break_envelope(self, envelope: dict[str, Any]) -> None:
        rng = self.rng
        part = rng.choice(["ack", "event", "data", "whole"])
        if part == "ack":
            envelope["ack"] = rng.choice(
                [str(envelope["ack"]), True, False, None, -1, 2**63, 2**64 - 1, 1.5, -0.0,
                 Raw("18446744073709551616"), Raw("1e400"), [1], {"a": 1}, INT64_MAX, 0]
            )  # fmt: skip
        elif part == "event":
            envelope["event"] = rng.choice(
                [5, None, "", "x" * 65, "x" * 64, ["room:join"], {"e": 1}, "\x00", "room:nope",
                 "\u200froom:join", envelope["event"].upper(), envelope["event"] + " "]
            )  # fmt: skip
        elif part == "data":
            envelope["data"] = rng.choice([[], [1], "x", 5, True, None, deep_list(300)])
        else:
            envelope["zzz"] = deep_dict(300)

    def _raw(self, envelope: dict[str, Any]) -> str:
        rng = self.rng
        text = encode(envelope)
        choice = rng.randrange(7)
        if choice == 0:
            return "[" * 1100 + "]" * 1100
        if choice == 1:
            return text[: rng.randrange(len(text))]
        if choice == 2:
            return text.replace('"data": {', '"data": {"s": "\\ud800", ', 1)
        if choice == 3:
            return text.replace('"data": {', '"data": {"n": NaN, ', 1)
        if choice == 4:
            return '{"event": "system:ping", "data": ' + "{" * 1030 + "}" * 1030 + "}"
        if choice == 5:
            return text.replace("{", "{\x00", 1)
        return text + ","


# -- the fuzzing client ----------------------------------------------------------------


@dataclasses.dataclass
class Report:
    frames: int = 0
    acks: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    kinds: Counter[str] = dataclasses.field(default_factory=Counter)
    closes: Counter[int] = dataclasses.field(default_factory=Counter)
    problems: list[str] = dataclasses.field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)


class FuzzConnection:
    """One namespace's socket: sends a frame, reads until its ack, reconnects after a close."""

    def __init__(self, url: str, token: str, report: Report, on_connect: Any = None) -> None:
        self.url = url
        self.token = token
        self.report = report
        self.on_connect = on_connect
        self.ws: WebSocketClientConnection | None = None
        # Set-up requests' acks, far above the fuzzed ones (which start below 2^41).
        self.setup_acks = itertools.count(2**62)
        #: A frame over the cap went out on this connection (a 1009 close is then due).
        self.sent_oversized = False

    async def connect(self) -> None:
        request = HTTPRequest(self.url, headers={"Authorization": f"Bearer {self.token}"})
        self.ws = await websocket_connect(request, max_message_size=4 * MAX_FRAME_BYTES)
        self.sent_oversized = False
        welcome = await self._read()
        assert welcome is not None and welcome.get("event") == "system:welcome", welcome
        if self.on_connect is not None:
            await self.on_connect(self)

    async def request(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """A normal request (set-up, not counted): its ack frame."""
        ack = next(self.setup_acks)
        assert self.ws is not None
        await self.ws.write_message(orjson.dumps({"event": event, "data": data, "ack": ack}))
        while True:
            msg = await self._read()
            assert msg is not None, f"closed during {event}"
            if msg.get("ack") == ack:
                return msg
            if "ack" in msg:  # a second answer to an earlier fuzzed frame
                self.report.problem(f"ack {msg['ack']} while awaiting {event}: {msg}")

    async def _read(self) -> dict[str, Any] | None:
        assert self.ws is not None
        raw = await asyncio.wait_for(self.ws.read_message(), ACK_WAIT_SECS)
        if raw is None:
            return None
        msg: dict[str, Any] = orjson.loads(raw)
        error = None
        if msg.get("event") == "system:error":
            error = msg["data"]
        elif msg.get("ok") is False:
            error = msg["error"]
        if error is not None:
            code = error.get("code")
            self.report.outcomes[code] += 1
            if code not in DOCUMENTED_CODES:
                self.report.problem(f"undocumented error {code}: {error}")
        return msg

    async def _closed(self, frame: Frame, context: str) -> None:
        """The server closed: fine if documented (the frame is then owed no ack); reconnect."""
        assert self.ws is not None
        code = self.ws.close_code
        self.report.closes[code or 0] += 1
        if code not in DOCUMENTED_CLOSES or (code == 1009 and not self.sent_oversized):
            self.report.problem(
                f"closed {code} {self.ws.close_reason!r} {context}: {frame.text[:300]!r}"
            )
        await self.connect()

    async def send(self, frame: Frame) -> dict[str, Any] | None:
        """Send one fuzzed frame; the ack if one is due (None after a documented close)."""
        assert self.ws is not None
        self.report.frames += 1
        self.report.kinds[frame.kind] += 1
        oversized = len(frame.text.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES
        try:
            await self.ws.write_message(frame.text)
        except WebSocketClosedError:
            # Closed by an earlier frame without an ack (the 20th bad one): send again.
            await self._closed(frame, "before sending")
            await self.ws.write_message(frame.text)
        self.sent_oversized |= oversized
        if frame.ack is None:
            return None
        while True:
            try:
                msg = await self._read()
            except TimeoutError:
                self.report.problem(f"no ack within {ACK_WAIT_SECS}s: {frame.text[:300]!r}")
                return None
            if msg is None:
                await self._closed(frame, "awaiting its ack")
                return None
            if "ack" not in msg:
                continue
            if msg["ack"] != frame.ack:
                self.report.problem(f"ack {msg['ack']} while awaiting {frame.ack}: {msg}")
                continue
            self.report.acks += 1
            return msg

    async def barrier(self) -> None:
        """A ping round trip: whatever the earlier frames caused has arrived.

        The last fuzzed frames may have closed the connection (4400) unnoticed:
        then the close is checked and the ping goes over a new connection.
        """
        assert self.ws is not None
        ack = next(self.setup_acks)
        try:
            await self.ws.write_message(orjson.dumps({"event": "system:ping", "ack": ack}))
        except WebSocketClosedError:
            pass
        while (msg := await self._read()) is not None:
            if msg.get("ack") == ack:
                assert msg["ok"] is True, msg
                return
            if "ack" in msg:
                self.report.problem(f"ack {msg['ack']} while awaiting the barrier: {msg}")
        await self._closed(Frame("", "barrier", None), "at the barrier")
        pong = await self.request("system:ping", {})
        assert pong["ok"] is True, pong


def namespaces(app: Any) -> dict[str, tuple[str, type[GatewayHandler]]]:
    """namespace → (path, handler class) for every WebSocket route of the application."""
    found: dict[str, tuple[str, type[GatewayHandler]]] = {}
    for rule in app.wildcard_router.rules:
        target = rule.target
        if isinstance(target, type) and issubclass(target, GatewayHandler):
            path = rule.matcher.regex.pattern.rstrip("$")
            found[target.namespace] = (path, target)
    return found


def events_of(handler: type[GatewayHandler]) -> dict[str, type[Schema]]:
    return {**handler._base_schemas, **handler.schemas}


class ErrorRecords(logging.Handler):
    """Collects every record at ERROR or above (installed on the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_records() -> Any:
    handler = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def _formatted(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return "\n".join(formatter.format(r)[:2000] for r in records[:10])


async def production_node(gateway_factory: Any) -> Any:
    return await gateway_factory(
        env="production",
        jwt_secret=JWT_SECRET,
        allowed_origins=("https://chat.example.com",),
        rate_limits=RATE_LIMITS,
    )


# -- the WebSocket fuzz test --------------------------------------------------------


#: Roles each fuzzing identity holds: enough to reach every event's real work.
ROLES = {"admin": ("admin",), "logs": ("logs",)}


async def test_fuzz_every_event_of_every_namespace(gateway_factory, error_records):
    print(f"\nfuzz seed {SEED} (replay with SWITCHBOARD_FUZZ_SEED={SEED})")
    gw = await production_node(gateway_factory)
    found = namespaces(gw.node.app)
    assert {"chat", "notifications", "admin", "logs"} <= set(found)

    # Rooms owned by someone else (the chat fuzzer may not delete them) with
    # messages, a bystander pair in a room no generated id can name,
    # notifications to read.
    owner = await gw.connect("fz-owner")
    room_ids = ["fz-public", "fz-other"]
    for room_id in room_ids:
        await owner.emit("room:create", {"roomId": room_id, "name": room_id})
        await owner.emit("room:join", {"roomId": room_id})
    messages = []
    for i in range(3):
        sent = await owner.emit("message:send", {"roomId": "fz-public", "content": f"m{i}"})
        messages.append(int(sent["message"]["id"]))
    await owner.emit("room:create", {"roomId": "fz-private", "name": "p", "type": "private"})
    await owner.emit("room:create", {"roomId": "fz-locked", "name": "l", "password": "pw"})
    bystander_room = f"bystanders-{os.urandom(8).hex()}"
    listener = await gw.connect("by-listener")
    speaker = await gw.connect("by-speaker")
    await speaker.emit("room:create", {"roomId": bystander_room, "name": "quiet"})
    await speaker.emit("room:join", {"roomId": bystander_room})
    await listener.emit("room:join", {"roomId": bystander_room})
    made = await gw.node.notifications.notify(["fz-notifications"], title="hello")
    pools = Pools(
        rooms=[*room_ids, "fz-private", "fz-locked", "fz-missing", "fz-gone"],
        users=["fz-victim-1", "fz-victim-2", "fz-owner"],
        messages=messages,
        notifications=[int(n["id"]) for n in made],
        tokens=[gw.token("fz-x"), "not.a.jwt", "", "a" * 8192],
    )

    report = Report()
    started = time.perf_counter()

    async def fuzz(namespace: str, path: str, handler: type[GatewayHandler], count: int) -> None:
        user = f"fz-{namespace}"
        own = pools.copy()
        own.tokens.append(gw.token(user, ROLES.get(namespace, ("user",))))

        async def rejoin(conn: FuzzConnection) -> None:
            if namespace == "chat":
                for room_id in room_ids:
                    await conn.request("room:join", {"roomId": room_id})

        conn = FuzzConnection(
            f"ws://127.0.0.1:{gw.port}{path}",
            gw.token(user, ROLES.get(namespace, ("user",))),
            report,
            rejoin,
        )
        await conn.connect()
        events = events_of(handler)
        maker = FrameMaker(random.Random(f"{SEED}-{namespace}"), own, events)
        per_event = max(MIN_FRAMES_PER_EVENT, math.ceil(count / len(events)))
        schedule = [e for e in events for _ in range(per_event)]
        maker.rng.shuffle(schedule)
        for event in schedule:
            answer = await conn.send(maker.make(event))
            harvest(answer, own)
        await conn.barrier()

    total_events = sum(len(events_of(h)) for _, h in found.values())
    await asyncio.gather(*(
        fuzz(ns, path, handler, math.ceil(FRAMES * len(events_of(handler)) / total_events))
        for ns, (path, handler) in found.items()
    ))  # fmt: skip
    elapsed = time.perf_counter() - started
    print(
        f"fuzz: {report.frames} frames ({dict(report.kinds)}) in {elapsed:.1f}s; "
        f"{report.acks} acks; errors {dict(report.outcomes)}; closes {dict(report.closes)}"
    )

    assert report.frames >= FRAMES
    assert not report.problems, f"seed {SEED}:\n" + "\n".join(report.problems[:30])
    # The node is healthy, and a bystander was not disturbed.
    response = await AsyncHTTPClient().fetch(f"{gw.http}/health/ready", raise_error=False)
    assert response.code == 200, response.body
    fresh = await gw.connect("fz-after")
    assert "serverTime" in await fresh.emit("system:ping", {})
    listener.drain_events()
    sent = await speaker.emit("message:send", {"roomId": bystander_room, "content": "still here"})
    heard = await listener.next_event("message:new", timeout=5.0)
    assert heard["data"]["message"]["id"] == sent["message"]["id"]
    assert not error_records.records, f"seed {SEED}:\n" + _formatted(error_records.records)


def harvest(answer: dict[str, Any] | None, pools: Pools) -> None:
    """Ids from successful acks, so later frames name things that exist."""
    if not answer or not answer.get("ok"):
        return
    data = answer.get("data") or {}
    message = data.get("message")
    if isinstance(message, dict) and str(message.get("id", "")).isdigit():
        pools.messages.append(int(message["id"]))
        del pools.messages[:-50]
    room = data.get("room")
    if isinstance(room, dict) and isinstance(room.get("id"), str) and len(pools.rooms) < 40:
        pools.rooms.append(room["id"])


# -- REST ------------------------------------------------------------------------------


def query_value(rng: random.Random) -> str:
    value = nasty_value(rng) if rng.random() < 0.7 else rng.randint(-5, 200)
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, float | int | bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        # Request lines over tornado's 64 KiB header limit are dropped unanswered.
        return value[:1000]
    return encode(value)[:200]


def quoted(text: str) -> str:
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")


async def test_fuzz_rest_inputs(gateway_factory, error_records):
    print(f"\nfuzz seed {SEED} (replay with SWITCHBOARD_FUZZ_SEED={SEED})")
    rng = random.Random(SEED)
    gw = await production_node(gateway_factory)
    member = await gw.connect("fz-rest")
    await member.emit("room:create", {"roomId": "fz-rest-room", "name": "r"})
    await member.emit("room:join", {"roomId": "fz-rest-room"})
    await member.emit("message:send", {"roomId": "fz-rest-room", "content": "one"})
    [note] = await gw.node.notifications.notify(["fz-rest"], title="hi")
    tokens = {
        "user": gw.token("fz-rest"),
        "service": gw.token("fz-service", ("service",)),
        "admin": gw.token("fz-admin", ("admin",)),
    }
    valid_bodies = {
        "/api/v1/publish": {"target": {"roomId": "fz-rest-room"}, "event": "x:y", "data": {"a": 1}},
        "/api/v1/notifications": {"userIds": ["fz-rest"], "title": "t", "data": {"a": 1}},
        "/api/v1/logs": {"entries": [{"level": "info", "message": "m", "metadata": {"a": 1}}]},
        # PATCH, by the room's owner (fz-rest).
        "/api/v1/rooms/fz-rest-room": {"name": "r", "topic": "t", "password": None},
    }
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    http = AsyncHTTPClient()
    for _ in range(REST_REQUESTS):
        roll = rng.random()
        method, body, who = "GET", None, "user"
        if roll < 0.3:
            room = rng.choice(
                ["fz-rest-room", "fz-rest-room", "nope", quoted(rng.choice(ODD_TEXT))]
            )
            params = {k: query_value(rng) for k in ("limit", "beforeSeq") if rng.random() < 0.8}
            path = f"/api/v1/rooms/{room or 'x'}/messages"
        elif roll < 0.55:
            params = {
                k: query_value(rng) for k in ("unreadOnly", "limit", "before") if rng.random() < 0.8
            }
            path = "/api/v1/notifications"
        elif roll < 0.7:
            method = rng.choice(["POST", "DELETE"])
            raw_id = rng.choice([note["id"], query_value(rng)]) or "0"
            params = {}
            path = f"/api/v1/notifications/{quoted(raw_id)}" + ("/read" if method == "POST" else "")
            body = b"" if method == "POST" else None
        elif roll < 0.8:
            who = "admin"
            params = {
                k: query_value(rng) for k in ("limit", "level", "service") if rng.random() < 0.7
            }
            path = "/api/v1/logs/recent"
        else:
            method, who, params = "POST", "service", {}
            path = rng.choice(list(valid_bodies))
            if path.startswith("/api/v1/rooms/"):
                method, who = "PATCH", "user"
            valid_body = valid_bodies[path]
            if rng.random() < 0.3:
                mutated = {**valid_body, "data": extreme_for(fields.Dict(), rng)}
                if "entries" in valid_body:
                    mutated = {"entries": [{**valid_body["entries"][0], **rng.choice([
                        {"metadata": extreme_for(fields.Dict(), rng)},
                        {"timestamp": extreme_for(fields.DateTime(), rng)},
                    ])}]}  # fmt: skip
            else:
                mutated = mutate_structure(valid_body, rng, rng.randint(1, 4))
            body = encode(mutated).encode()
        url = gw.http + path
        if params:
            url += "?" + "&".join(f"{k}={quoted(v)}" for k, v in params.items())
        response = await http.fetch(
            url, method=method, body=body, raise_error=False, allow_nonstandard_methods=True,
            headers={"Authorization": f"Bearer {tokens[who]}", "Content-Type": "application/json"},
        )  # fmt: skip
        statuses[response.code] += 1
        if response.code >= 500 or response.code not in (200, 201, 400, 403, 404, 413):
            problems.append(f"{response.code} {method} {url}: {response.body[:300]!r}")
            continue
        if response.code >= 400:
            code = orjson.loads(response.body)["error"]["code"]
            if code not in DOCUMENTED_CODES | {"NOT_FOUND"}:
                problems.append(f"{code} {method} {url}")
    print(f"fuzz rest: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems[:30])
    assert not error_records.records, f"seed {SEED}:\n" + _formatted(error_records.records)
