"""``server/services/admission.py``: the admission rules, and their one use by both surfaces.

The plain functions are checked directly; the rest end to end on a real
node: REST errors rendered once (``JSONHandler``), every route given the
node's one :class:`handlers.deps.Deps`, and the base handler's after-ack hook
(:class:`handlers.base.Reply`) through a tiny handler written for the test.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import orjson
import pytest
from marshmallow import Schema
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.web import RequestHandler, StaticFileHandler
from tornado.websocket import WebSocketClientConnection, websocket_connect

from handlers import schemas as s
from handlers.base import EarlyAck, GatewayHandler, Reply
from server.core import errors
from server.core.auth import Identity
from server.services.admission import (
    AUTH_EXPIRY_WARNING_SECS,
    bearer_token,
    client_ip,
    expiry_delays,
    handshake_token,
    require_roles,
)

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def test_bearer_token_reads_only_a_bearer_header() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Bearer ") is None
    assert bearer_token("Basic abc") is None
    assert bearer_token("") is None


def test_handshake_token_prefers_the_header_then_the_query_then_the_cookie() -> None:
    assert handshake_token("Bearer h", "q", "c") == "h"
    assert handshake_token("", "q", "c") == "q"
    assert handshake_token("", None, "c") == "c"
    assert handshake_token("", "", "c") == "c"
    assert handshake_token("", None, None) is None
    # An empty Bearer header is the client's choice: the other places are not read.
    assert handshake_token("Bearer ", "q", "c") is None


def test_client_ip_trusts_forwarded_hops_only_from_trusted_proxies() -> None:
    # Not from a proxy: the header is the client's own claim and ignored.
    assert client_ip("203.0.113.9", "198.51.100.1", PROXIES) == "203.0.113.9"
    # No proxies configured, or no header: the peer.
    assert client_ip("10.1.1.1", "198.51.100.1", ()) == "10.1.1.1"
    assert client_ip("10.1.1.1", None, PROXIES) == "10.1.1.1"
    # The first untrusted hop from the nearest outwards; prepended hops do not count.
    assert client_ip("10.1.1.1", "6.6.6.6, 198.51.100.1, 10.2.2.2", PROXIES) == "198.51.100.1"
    # Every hop a proxy: the farthest one.
    assert client_ip("::1", "10.3.3.3, 10.2.2.2", PROXIES) == "10.3.3.3"
    # Garbage hops are not proxies, so they are the client as written.
    assert client_ip("10.1.1.1", "not-an-ip", PROXIES) == "not-an-ip"
    assert client_ip("10.1.1.1", " , ", PROXIES) == "10.1.1.1"


def test_expiry_warning_leads_by_a_minute_or_half_the_time_left() -> None:
    now = 1_000.0
    assert expiry_delays(now + 600, now) == (600 - AUTH_EXPIRY_WARNING_SECS, 600)
    assert expiry_delays(now + 30, now) == (15, 30)
    assert expiry_delays(now - 5, now) == (0.0, 0.0)


def test_require_roles_names_the_roles_needed() -> None:
    identity = Identity("u1", "u1", "U1", frozenset({"user"}), 0.0)
    require_roles(identity, None)
    require_roles(identity, frozenset({"user", "admin"}))
    with pytest.raises(errors.Forbidden) as info:
        require_roles(identity, frozenset({"logs", "admin"}))
    assert info.value.message == "Needs one of the roles admin, logs"
    with pytest.raises(errors.Forbidden) as info:
        require_roles(identity, frozenset({"admin"}), "The x namespace needs one of {roles}")
    assert info.value.message == "The x namespace needs one of admin"


@pytest.mark.asyncio
async def test_every_json_endpoint_renders_a_401_the_same_way(gateway: Any) -> None:
    """The API, the log endpoints and /websocket/stats share one error renderer."""
    client = AsyncHTTPClient()
    for path in ("/api/v1/notifications", "/api/v1/logs/stats", "/api/v1/logs/recent",
                 "/websocket/stats"):  # fmt: skip
        response = await client.fetch(f"{gateway.http}{path}", raise_error=False)
        assert response.code == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert orjson.loads(response.body) == {
            "error": {"code": "UNAUTHORIZED", "message": "Missing token", "details": {}}
        }, path


@pytest.mark.asyncio
async def test_every_route_is_given_the_nodes_one_deps(gateway: Any) -> None:
    node = gateway.node
    handlers = 0
    for rule in node.app.wildcard_router.rules:
        target = rule.target
        if issubclass(target, StaticFileHandler):
            continue
        assert issubclass(target, RequestHandler)
        assert rule.target_kwargs == {"deps": node.deps}, target
        assert rule.target_kwargs["deps"] is node.deps
        handlers += 1
    assert handlers >= 15


class Say(s.EventSchema):
    text = s.Str(64, required=True)


class AfterAckHandler(GatewayHandler):
    """A namespace whose one event sends ``echo:after`` from its after-ack hook."""

    namespace = "chat"
    schemas: ClassVar[dict[str, type[Schema]]] = {"echo:say": Say, "echo:fail": Say}

    async def on_echo_say(self, text: str) -> Reply:
        return Reply({"text": text}, lambda: self.send_event("echo:after", {"text": text}))

    async def on_echo_fail(self, text: str) -> Reply:
        raise errors.BadRequest("no")


async def tiny_namespace(
    gateway: Any, path: str, handler: type[GatewayHandler]
) -> tuple[WebSocketClientConnection, Callable[[], Awaitable[dict[str, Any]]]]:
    """``handler`` served at ``path``; alice connected to it, and her next frame, decoded."""
    gateway.node.app.add_handlers(r".*", [(path, handler, {"deps": gateway.node.deps})])
    request = HTTPRequest(
        f"ws://127.0.0.1:{gateway.port}{path}",
        headers={"Authorization": f"Bearer {gateway.token('alice')}"},
    )
    ws = await websocket_connect(request)

    async def frame() -> dict[str, Any]:
        raw = await ws.read_message()
        assert raw is not None
        decoded: dict[str, Any] = orjson.loads(raw)
        return decoded

    return ws, frame


@pytest.mark.asyncio
async def test_after_ack_runs_once_the_ack_is_queued(gateway: Any) -> None:
    ws, frame = await tiny_namespace(gateway, "/ws/echo", AfterAckHandler)
    try:
        assert (await frame())["event"] == "system:welcome"
        # A handler that raises has no after-ack: only the error comes back.
        await ws.write_message(
            orjson.dumps({"event": "echo:fail", "data": {"text": "x"}, "ack": 1})
        )
        assert (await frame())["error"]["code"] == "BAD_REQUEST"
        await ws.write_message(
            orjson.dumps({"event": "echo:say", "data": {"text": "hi"}, "ack": 2})
        )
        assert await frame() == {"ack": 2, "ok": True, "data": {"text": "hi"}}
        assert await frame() == {"event": "echo:after", "data": {"text": "hi"}}
        # Without an ack id the hook still runs.
        await ws.write_message(orjson.dumps({"event": "echo:say", "data": {"text": "yo"}}))
        assert await frame() == {"event": "echo:after", "data": {"text": "yo"}}
    finally:
        ws.close()


class EarlyAckHandler(GatewayHandler):
    """A namespace whose events ack early (``EarlyAck``), then return or raise."""

    namespace = "chat"
    schemas: ClassVar[dict[str, type[Schema]]] = {"early:say": Say, "early:fail": Say,
                                                  "early:late": Say}  # fmt: skip
    early_acks: ClassVar[frozenset[str]] = frozenset({"early:say", "early:fail", "early:late"})

    async def on_early_say(self, text: str, answer: EarlyAck) -> dict[str, Any]:
        answer({"text": text})
        answer({"text": "a second answer"})
        return {"text": "the result, not sent"}

    async def on_early_fail(self, text: str, answer: EarlyAck) -> dict[str, Any]:
        answer({"text": text})
        raise errors.BadRequest("after the ack")

    async def on_early_late(self, text: str, answer: EarlyAck) -> dict[str, Any]:
        return {"text": text}  # never answered early: acked from the result


@pytest.mark.asyncio
async def test_an_early_ack_is_the_frames_one_answer(gateway: Any) -> None:
    ws, frame = await tiny_namespace(gateway, "/ws/early", EarlyAckHandler)
    registry = gateway.node.registry

    def counted(event: str) -> float | None:
        return registry.get_sample_value("switchboard_event_duration_seconds_count",
                                         {"namespace": "chat", "event": event})  # fmt: skip

    try:

        async def emit(event: str, text: str, ack: int | None) -> None:
            envelope: dict[str, Any] = {"event": event, "data": {"text": text}}
            if ack is not None:
                envelope["ack"] = ack
            await ws.write_message(orjson.dumps(envelope))

        assert (await frame())["event"] == "system:welcome"
        await emit("early:say", "hi", 1)
        await emit("early:fail", "x", 2)
        await emit("early:fail", "y", None)  # no ack asked: no error frame either
        await emit("early:late", "late", 3)
        # One answer per frame, in order; the error after an early ack is only logged.
        assert await frame() == {"ack": 1, "ok": True, "data": {"text": "hi"}}
        assert await frame() == {"ack": 2, "ok": True, "data": {"text": "x"}}
        assert await frame() == {"ack": 3, "ok": True, "data": {"text": "late"}}
        assert (counted("early:say"), counted("early:fail"), counted("early:late")) == (1, 2, 1)
    finally:
        ws.close()
