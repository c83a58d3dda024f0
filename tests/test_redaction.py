"""No credential in any log line: server/core/redaction.py and the node's logging as a whole.

The end-to-end test starts a production node with the logging an operator
gets (``setup_logging``: one root handler, here at DEBUG into a buffer, in
text and in JSON), drives every kind of refused and accepted handshake and
request through it with real clients — tokens in the query, the header, a
cookie and an auth frame; expired, badly signed, for the wrong role; a 404
and an origin refusal with ``?token=``; handlers that raise with the token
in their exception — and then searches everything the node logged, what a
``/ws/logs`` subscriber received and what ``logs:recent`` returns for each
token used and its signature: none may appear.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import jwt
import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.routing import Rule

from handlers.chat import ChatHandler
from handlers.http import JSONHandler
from handlers.schemas import AuthRefresh
from server.cli import JSONFormatter, setup_logging
from server.core.auth import mint_token
from server.core.config import Config
from server.core.redaction import REDACTED, RedactionFilter, redact, redact_uri
from switchboard_client import Client, ClientError, HandshakeError, TokenLocation

SECRET = "redaction-test-secret-0123456789abcdef0123"
ORIGIN = "https://app.example.com"
MARKER = "redaction-test: end of run"


# -- redact / redact_uri ----------------------------------------------------------------


def jwt_for(user: str = "alice") -> str:
    return mint_token(Config.from_env({}, jwt_secret=SECRET), user)


def test_query_values_are_redacted_and_the_names_kept() -> None:
    token = jwt_for()
    line = f"403 GET /ws/chat?x=1&token={token}&y=2 (10.0.0.7) 1.52ms"
    assert redact(line) == f"403 GET /ws/chat?x=1&token={REDACTED}&y=2 (10.0.0.7) 1.52ms"
    assert redact("GET /a?access_token=opaque-value") == f"GET /a?access_token={REDACTED}"
    assert redact("uri='/ws/chat?token=opaque', v=1") == f"uri='/ws/chat?token={REDACTED}', v=1"


def test_anything_shaped_like_a_jwt_is_redacted() -> None:
    token = jwt_for()
    assert redact(f"bad token {token} here") == f"bad token {REDACTED} here"
    unsigned = token.rsplit(".", 1)[0] + "."  # alg none: empty signature
    assert redact(f"[{unsigned}]") == f"[{REDACTED}]"


def test_text_without_a_token_is_returned_as_is() -> None:
    text = "accepted chat connection from 127.0.0.1"
    assert redact(text) is text


def test_redact_uri_reads_the_query_like_tornado() -> None:
    # tornado decodes parameter names: "to%6Ben" is a token parameter.
    assert redact_uri("/ws/chat?to%6Ben=opaque&a=b") == f"/ws/chat?to%6Ben={REDACTED}&a=b"
    assert redact_uri("/ws/chat?tokens=1&token") == "/ws/chat?tokens=1&token"
    assert redact_uri("/health") == "/health"


def test_filter_redacts_message_args_and_exception_text() -> None:
    token = jwt_for()
    try:
        raise RuntimeError(f"cannot use {token}")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "switchboard.test", logging.ERROR, __file__, 1, "GET %s failed", (f"/x?token={token}",),
        exc_info,
    )  # fmt: skip
    assert RedactionFilter().filter(record)
    text = logging.Formatter().format(record)
    json_line = JSONFormatter("n1").format(record)
    for output in (text, json_line):
        assert token not in output and token.split(".")[2] not in output
        assert f"token={REDACTED}" in output
        assert f"cannot use {REDACTED}" in output
    assert "Traceback" in text and "stack" in orjson.loads(json_line)


# -- a whole node ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_access_log_line_is_redacted_before_any_filter(gateway: Any, caplog: Any) -> None:
    # caplog's handler has no RedactionFilter: this is the access log's own work.
    token = gateway.token("alice")
    with caplog.at_level(logging.INFO, logger="tornado.access"):
        assert (await fetch(f"{gateway.http}/no/where?token={token}&a=1")).code == 404
        assert (await fetch(f"{gateway.http}/health?to%6Ben=opaque-1&access_token=x")).code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert lines[0].startswith(f"404 GET /no/where?token={REDACTED}&a=1 (127.0.0.1) ")
    assert lines[1].startswith(
        f"200 GET /health?to%6Ben={REDACTED}&access_token={REDACTED} (127.0.0.1) "
    )
    assert [r.levelname for r in caplog.records if r.name == "tornado.access"] == [
        "WARNING", "INFO"
    ]  # fmt: skip


class Boom(JSONHandler):
    """A handler that fails with the token it was given in its exception."""

    def get(self) -> None:
        raise RuntimeError(f"cannot use {self.get_query_argument('token')}")


class BoomChat(ChatHandler):
    """/ws/chat plus an event whose handler fails with the token it was sent."""

    schemas = {**ChatHandler.schemas, "boom:token": AuthRefresh}

    async def on_boom_token(self, token: str) -> dict[str, Any]:
        raise RuntimeError(f"cannot use {token}")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back as pytest had it after setup_logging replaced it."""
    root = logging.getLogger()
    access = logging.getLogger("tornado.access")
    saved = root.handlers[:], root.level, access.level
    yield
    root.handlers[:], _, _ = saved
    root.setLevel(saved[1])
    access.setLevel(saved[2])


async def fetch(url: str, **kw: Any) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(url, raise_error=False, **kw)


@pytest.mark.asyncio
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_token_reaches_any_log_line(
    gateway_factory: Any, root_logging: None, log_format: str
) -> None:
    stream = io.StringIO()
    settings = {
        "env": "production", "jwt_secret": SECRET, "allowed_origins": ORIGIN,
        "log_format": log_format, "log_level": "DEBUG", "log_buffer_size": 20_000,
        "node_id": "redaction-node",
    }  # fmt: skip
    setup_logging(Config.from_env({}, **settings), stream=stream)
    logging.getLogger("tornado.access").setLevel(logging.DEBUG)  # every request, 2xx too
    gw = await gateway_factory(**settings)
    app = gw.node.app
    chat_rule = next(r for r in app.wildcard_router.rules if r.target is ChatHandler)
    assert isinstance(chat_rule, Rule)
    deps = chat_rule.target_kwargs  # every route is given the same {"deps": ...}
    app.add_handlers(r".*", [(r"/boom", Boom, deps), (r"/ws/boom", BoomChat, deps)])

    used: list[str] = []

    def token(user: str, roles: tuple[str, ...] = ("user",), **kw: Any) -> str:
        used.append(gw.token(user, roles, **kw))
        return used[-1]

    def forged(user: str) -> str:
        now = int(time.time())
        claims = {"sub": user, "roles": ["admin"], "iat": now, "exp": now + 600}
        used.append(jwt.encode(claims, "not-the-secret-but-long-enough-0123456789", "HS256"))
        return used[-1]

    async def refused(client: Client) -> ClientError:
        gw.clients.append(client)
        with pytest.raises(ClientError) as info:
            await client.connect()
        return info.value

    chat, admin, logs_url = gw.url("chat"), gw.url("admin"), gw.url("logs")

    # A live-log subscriber, as an operator's `switchboard tail` would be.
    reader = Client(logs_url, token("ops", ("logs",)))
    gw.clients.append(reader)
    await reader.connect()
    await reader.emit("logs:subscribe", {"level": "DEBUG"})

    # WebSocket handshakes: accepted and refused, the token in every place it can travel.
    everywhere: tuple[TokenLocation, ...] = ("query", "cookie", "header", "frame")
    for token_in in everywhere:
        client = Client(chat, token(f"u-{token_in}"), token_in=token_in)
        gw.clients.append(client)
        await client.connect()
        with pytest.raises(ClientError):
            await client.emit("auth:refresh", {"token": token("someone-else")})
        await client.aclose()
    for token_in in everywhere:
        exc = await refused(Client(chat, token("late", ttl_secs=-30), token_in=token_in))
        assert (exc.code, exc.close_code) == ("TOKEN_EXPIRED", 4401)
        exc = await refused(Client(admin, token("wrong-role"), token_in=token_in))
        assert (exc.code, exc.close_code) == ("FORBIDDEN", 4403)
    # Badly signed, enough times for the security monitor to log an alert.
    for token_in in (*everywhere, "query"):
        exc = await refused(Client(chat, forged("mallory"), token_in=token_in))
        assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)
    opaque = "opaque-credential-9f8e7d6c5b4a"
    used.append(opaque)
    exc = await refused(Client(chat, opaque, token_in="query"))
    assert exc.code == "UNAUTHORIZED"
    # Refused before the upgrade (origin): tornado's access line is the 403.
    with pytest.raises(HandshakeError):
        await Client(chat, token("away"), token_in="query", origin="https://evil.example").connect()

    # REST: bearer header 401/403/200, and tokens in the query of refused and unknown paths.
    count = f"{gw.http}/api/v1/notifications/unread/count"
    assert (await fetch(count, headers={"Authorization": f"Bearer {forged('bob')}"})).code == 401
    stats = f"{gw.http}/websocket/stats"
    assert (await fetch(stats, headers={"Authorization": f"Bearer {token('bob')}"})).code == 403
    assert (await fetch(count, headers={"Authorization": f"Bearer {token('bob')}"})).code == 200
    assert (await fetch(f"{count}?token={token('bob')}")).code == 401
    assert (await fetch(f"{count}?access_token={token('bob')}")).code == 401
    assert (await fetch(f"{gw.http}/no/such/path?token={token('bob')}")).code == 404
    assert (await fetch(f"{gw.http}/health?token={token('bob')}&x=1")).code == 200

    # Handlers that raise with the token in their exception (HTTP and WebSocket).
    assert (await fetch(f"{gw.http}/boom?token={token('bob')}")).code == 500
    boom = Client(f"ws://127.0.0.1:{gw.port}/ws/boom", token("carol"), token_in="query")
    gw.clients.append(boom)
    await boom.connect()
    with pytest.raises(ClientError) as info:
        await boom.emit("boom:token", {"token": token("carol")})
    assert info.value.code == "INTERNAL_ERROR"

    # Barrier: entries reach subscribers in order, so the marker comes last.
    logging.getLogger("switchboard.test").warning(MARKER)
    await reader.next_event("log:warning", predicate=lambda f: f["data"]["message"] == MARKER)
    streamed = orjson.dumps([f for f in reader.events if f["event"].startswith("log:")]).decode()
    recent = orjson.dumps(await reader.emit("logs:recent", {"limit": 1000})).decode()
    ops = {"Authorization": f"Bearer {token('ops', ('logs',))}"}
    recent_http = (await fetch(f"{gw.http}/api/v1/logs/recent?limit=1000", headers=ops)).body
    await gw.close_clients()
    await gw.node.stop(grace_secs=1.0)

    lines = stream.getvalue()
    if log_format == "json":
        for line in lines.splitlines():
            orjson.loads(line)  # every line is one JSON object
    captured = "\n".join([lines, streamed, recent, recent_http.decode()])
    for credential in used:
        assert credential not in captured, credential
        if credential.count(".") == 2:
            assert credential.split(".")[2] not in captured, credential
    # Operators still see that a token was sent, and what went wrong.
    assert f"403 GET /ws/chat?token={REDACTED} (127.0.0.1)" in lines
    assert f"404 GET /no/such/path?token={REDACTED} (127.0.0.1)" in lines
    assert f"200 GET /health?token={REDACTED}&x=1 (127.0.0.1)" in lines
    assert f"Uncaught exception GET /boom?token={REDACTED} (127.0.0.1)" in lines
    assert f"cannot use {REDACTED}" in lines and f"cannot use {REDACTED}" in streamed
    assert "refused chat connection from 127.0.0.1: TOKEN_EXPIRED" in lines
    assert "security: 5 failed authentications for user id 'mallory'" in lines
