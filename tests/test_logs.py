"""Live logs end to end: /ws/logs, POST /api/v1/logs, recent and stats.

Each test runs a real node on port 0 and talks to it with real WebSocket
and HTTP clients; the slow-subscriber test uses a raw TCP WebSocket that
stops reading, so the server meets a genuinely stalled peer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from handlers.logs import MAX_INGEST_BODY_BYTES, MAX_INGEST_ENTRIES, LogsHandler
from server.services.logstream import MAX_PENDING_ENTRIES, LogCaptureHandler, LogFilter
from switchboard_client import Client, ClientError
from tests.support.client_checks import assert_no_event, barrier
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

ISO_MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LOG_EVENTS = ("log:entry", "log:warning", "log:error")


@pytest.fixture(autouse=True)
def debug_logging() -> Iterator[None]:
    """Let the gateway's DEBUG/INFO records exist (the root logger defaults to WARNING)."""
    logger = logging.getLogger("switchboard")
    before = logger.level
    logger.setLevel(logging.DEBUG)
    yield
    logger.setLevel(before)


async def http(
    gw: Any, method: str, path: str, *, token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    raw = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    response = await AsyncHTTPClient().fetch(
        f"{gw.http}{path}",
        method=method,
        headers=headers,
        body=raw,
        raise_error=False,
        allow_nonstandard_methods=True,
    )
    return response.code, orjson.loads(response.body) if response.body else None


async def ingest(gw: Any, entries: list[dict[str, Any]], service: str = "billing") -> None:
    status, body = await http(
        gw, "POST", "/api/v1/logs", token=gw.token(service, ("service",)), body={"entries": entries}
    )
    assert status == 200, body
    assert body == {"accepted": len(entries)}


def messages(client: Client) -> list[str]:
    return [f["data"]["message"] for f in client.events if f["event"] in LOG_EVENTS]


async def until_message(client: Client, text: str) -> dict[str, Any]:
    return await client.next_event(
        None,
        timeout=5,
        predicate=lambda f: f["event"] in LOG_EVENTS and f["data"]["message"] == text,
    )


# -- roles ----------------------------------------------------------------------


async def test_logs_namespace_needs_admin_or_logs_role(gateway: Any) -> None:
    for roles in (("user",), ("moderator",), ("service",)):
        with pytest.raises(ClientError) as info:
            await gateway.client("eve", "logs", roles=roles).connect()
        assert info.value.code == "FORBIDDEN"
        assert info.value.close_code == 4403
    for roles in (("logs",), ("admin",)):
        client = await gateway.connect("ops", "logs", roles=roles)
        assert client.welcome is not None and client.welcome["namespace"] == "logs"


# -- the gateway's own records --------------------------------------------------


async def test_own_records_stream_with_level_minimum_and_event_names(gateway: Any) -> None:
    client = await gateway.connect("ops", "logs", roles=("logs",))
    ack = await client.emit("logs:subscribe", {"level": "warn", "contexts": ["switchboard.t1"]})
    assert ack == {
        "subscribed": True,
        "filter": {
            "level": "WARNING",
            "services": None,
            "contexts": ["switchboard.t1"],
            "contains": None,
        },
    }
    logger = logging.getLogger("switchboard.t1.sub")
    logger.debug("d")
    logger.info("i")
    logger.warning("w %s", "arg", extra={"roomId": "general", "obj": {"n": 1}})
    logger.error("e")
    logger.critical("c")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        logger.exception("x")
    last = await until_message(client, "x")
    assert messages(client) == ["w arg", "e", "c", "x"]
    names = [f["event"] for f in client.events if f["event"] in LOG_EVENTS]
    assert names == ["log:warning", "log:error", "log:error", "log:error"]
    warning = client.events[[f["event"] for f in client.events].index("log:warning")]["data"]
    assert warning["level"] == "WARNING"
    assert warning["service"] == "switchboard"
    assert warning["context"] == "switchboard.t1.sub"
    assert warning["node"] == gateway.config.node_id
    assert warning["metadata"] == {"roomId": "general", "obj": {"n": 1}}
    assert ISO_MS_RE.match(warning["timestamp"])
    assert "stack" not in warning
    assert "RuntimeError: kaput" in last["data"]["stack"]

    # Without a level everything comes, and INFO/DEBUG arrive as log:entry.
    await client.emit("logs:subscribe", {"contexts": ["switchboard.t1"]})
    logger.debug("d2")
    logger.info("i2")
    await until_message(client, "i2")
    tail = [f for f in client.events if f["event"] in LOG_EVENTS][-2:]
    assert [(f["event"], f["data"]["level"]) for f in tail] == [
        ("log:entry", "DEBUG"),
        ("log:entry", "INFO"),
    ]


async def test_records_from_worker_threads_reach_subscribers(gateway: Any) -> None:
    client = await gateway.connect("ops", "logs", roles=("admin",))
    await client.emit("logs:subscribe", {"contains": "from-thread"})

    def db_work(_db: Any = None) -> str:
        logging.getLogger("switchboard.db.test").warning(
            "from-thread %s", threading.current_thread().name
        )
        return threading.current_thread().name

    thread_name = await gateway.node.db.run("logs.test", db_work)
    assert thread_name != threading.current_thread().name
    frame = await client.next_event("log:warning", timeout=5)
    assert frame["data"]["message"] == f"from-thread {thread_name}"
    await asyncio.to_thread(logging.getLogger("switchboard.other").error, "from-thread 2")
    frame = await client.next_event("log:error", timeout=5)
    assert frame["data"]["context"] == "switchboard.other"


async def test_unsubscribe_stops_delivery(gateway: Any) -> None:
    client = await gateway.connect("ops", "logs", roles=("logs",))
    await client.emit("logs:subscribe", {"contains": "unsub-test"})
    logging.getLogger("switchboard.t").warning("unsub-test 1")
    await until_message(client, "unsub-test 1")
    assert await client.emit("logs:unsubscribe") == {"subscribed": False}
    logging.getLogger("switchboard.t").warning("unsub-test 2")
    await assert_no_event(client, "log:warning")
    assert gateway.node.logstream.subscriber_count() == 0


async def test_subscription_ends_with_the_connection(gateway: Any) -> None:
    client = await gateway.connect("ops", "logs", roles=("logs",))
    await client.emit("logs:subscribe", {})
    assert gateway.node.logstream.subscriber_count() == 1
    await client.aclose()
    await eventually(lambda: gateway.node.logstream.subscriber_count() == 0, what="unsubscribed")


# -- ingestion and filters ------------------------------------------------------


async def test_ingested_entries_reach_filtered_subscribers(gateway: Any) -> None:
    filters = {
        "services": {"services": ["billing"]},
        "contexts": {"contexts": ["Pay"]},
        "contains": {"contains": "needle"},
        "level": {"level": "WARNING"},
        "combined": {"services": ["billing"], "level": "warning", "contains": "GAMMA"},
    }
    clients: dict[str, Client] = {}
    for name, wanted in filters.items():
        clients[name] = await gateway.connect(f"ops-{name}", "logs", roles=("logs",))
        await clients[name].emit("logs:subscribe", wanted)
    await ingest(
        gateway,
        [
            {"level": "info", "service": "billing", "context": "Pay", "message": "alpha"},
            {"level": "error", "service": "search", "context": "Index", "message": "beta needle"},
            {"level": "warn", "service": "billing", "context": "Pay.Refund", "message": "gamma"},
            {"level": "debug", "service": "billing", "context": "Payroll", "message": "NEEDLE d"},
            {"level": "error", "service": "billing", "context": "Pay", "message": "needle gamma"},
        ],
    )
    for client in clients.values():
        await until_message(client, "needle gamma")

    def ingested(client: Client) -> list[str]:
        return [
            f["data"]["message"]
            for f in client.events
            if f["event"] in LOG_EVENTS and f["data"]["service"] != "switchboard"
        ]

    assert ingested(clients["services"]) == ["alpha", "gamma", "NEEDLE d", "needle gamma"]
    # "Pay" matches Pay and Pay.Refund, not Payroll.
    assert ingested(clients["contexts"]) == ["alpha", "gamma", "needle gamma"]
    assert ingested(clients["contains"]) == ["beta needle", "NEEDLE d", "needle gamma"]
    assert ingested(clients["level"]) == ["beta needle", "gamma", "needle gamma"]
    assert ingested(clients["combined"]) == ["gamma", "needle gamma"]
    entry = clients["contains"].events[-1]["data"]
    assert entry["service"] == "billing" and entry["node"] == gateway.config.node_id
    assert ISO_MS_RE.match(entry["timestamp"])


async def test_ingest_defaults_and_normalisation(gateway: Any) -> None:
    client = await gateway.connect("ops", "logs", roles=("logs",))
    await client.emit("logs:subscribe", {"services": ["mailer"]})
    await ingest(
        gateway,
        [
            {
                "level": "FATAL",
                "message": "smtp down",
                "timestamp": "2026-01-02T03:04:05.678+01:00",
                "metadata": {"host": "mx1"},
                "stack": "Error: smtp down\n    at send()",
                "unknownField": "ignored",
            }
        ],
        service="mailer",
    )
    frame = await client.next_event("log:error", timeout=5)
    assert frame["data"] == {
        "timestamp": "2026-01-02T02:04:05.678Z",
        "level": "CRITICAL",
        "service": "mailer",  # the token's name when the entry has none
        "context": "",
        "message": "smtp down",
        "metadata": {"host": "mx1"},
        "stack": "Error: smtp down\n    at send()",
        "node": gateway.config.node_id,
    }


async def test_ingest_auth_and_validation(gateway: Any) -> None:
    good = {"entries": [{"level": "info", "message": "hello"}]}
    status, body = await http(gateway, "POST", "/api/v1/logs", body=good)
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    status, body = await http(gateway, "POST", "/api/v1/logs", token="not-a-jwt", body=good)
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    for roles in (("user",), ("logs",), ("admin",)):
        status, body = await http(
            gateway, "POST", "/api/v1/logs", token=gateway.token("x", roles), body=good
        )
        assert status == 403 and body["error"]["code"] == "FORBIDDEN", roles
    service = gateway.token("billing", ("service",))

    async def post(payload: Any) -> tuple[int, Any]:
        return await http(gateway, "POST", "/api/v1/logs", token=service, body=payload)

    status, body = await post(b"{not json")
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST"
    status, body = await post([1, 2])
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST"
    status, body = await post({"entries": []})
    assert status == 400 and body["error"]["code"] == "VALIDATION_ERROR"
    status, body = await post(
        {"entries": [{"level": "info", "message": "ok"}, {"level": "loud", "message": ""}]}
    )
    assert status == 400 and body["error"]["code"] == "VALIDATION_ERROR"
    assert set(body["error"]["details"]) == {"entries.1.level", "entries.1.message"}
    status, body = await post(
        {"entries": [{"level": "info", "message": "x", "service": "switchboard"}]}
    )
    assert status == 400 and "entries.0.service" in body["error"]["details"]
    status, body = await post(
        {"entries": [{"level": "info", "message": "x", "metadata": {"k": "v" * 5000}}]}
    )
    assert status == 400 and "entries.0.metadata" in body["error"]["details"]
    many = {"entries": [{"level": "info", "message": "m"}] * (MAX_INGEST_ENTRIES + 1)}
    status, body = await post(many)
    assert status == 400 and "entries" in body["error"]["details"]
    huge = {"entries": [{"level": "info", "message": "m" * 4000}] * 300}
    assert len(orjson.dumps(huge)) > MAX_INGEST_BODY_BYTES
    status, body = await post(huge)
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    # Nothing of the refused requests was stored, and the node still serves.
    assert all(e["service"] != "billing" for e in gateway.node.logstream.recent(1000))
    status, body = await post(good)
    assert status == 200 and body == {"accepted": 1}


async def test_ingest_bounds_metadata_depth_and_timestamps(gateway: Any) -> None:
    # Regression (issue 12): 300-deep metadata and a timestamp whose offset
    # carries it past year 9999 (or before year 1) were 500s.
    service = gateway.token("billing", ("service",))
    deep = '{"a":' * 300 + "{}" + "}" * 300
    raw = ('{"entries": [{"level": "info", "message": "x", "metadata": ' + deep + "}]}").encode()
    status, body = await http(gateway, "POST", "/api/v1/logs", token=service, body=raw)
    assert status == 400, body
    assert body["error"]["details"] == {"entries.0.metadata": ["Must nest at most 32 levels deep."]}
    for stamp in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00", "1999-12-31T23:59:59Z"):
        entry = {"level": "info", "message": "x", "timestamp": stamp}
        status, body = await http(
            gateway, "POST", "/api/v1/logs", token=service, body={"entries": [entry]}
        )
        assert status == 400, (stamp, body)
        assert body["error"]["details"] == {
            "entries.0.timestamp": ["Must be between 2000-01-01 and 9999-12-31 (UTC)."]
        }, stamp
    await ingest(gateway, [{"level": "info", "message": "y2k", "timestamp": "2000-01-01T00:00:00"}])
    assert gateway.node.logstream.recent(1)[0]["timestamp"] == "2000-01-01T00:00:00.000Z"


# -- recent and stats -------------------------------------------------------------


async def test_recent_over_socket_and_http(gateway_factory: Any) -> None:
    gateway = await gateway_factory(log_buffer_size=8)
    await ingest(gateway, [{"level": "info", "message": f"old {i}"} for i in range(10)])
    await ingest(
        gateway,
        [
            {"level": "error", "message": "e1"},
            {"level": "warning", "message": "w1"},
            {"level": "info", "message": "i1"},
            {"level": "error", "message": "e2", "service": "search"},
        ],
    )
    client = await gateway.connect("ops", "logs", roles=("logs",))
    # Only the newest 8 entries are kept (oldest first in answers).
    everything = (await client.emit("logs:recent", {"limit": 1000}))["entries"]
    assert len(everything) == 8
    # The newest is the reader's own connection line (one INFO per accepted connection).
    assert everything[-1]["message"] == "accepted logs connection from 127.0.0.1"
    assert [e["message"] for e in everything[-6:-1]] == ["old 9", "e1", "w1", "i1", "e2"]
    ack = await client.emit("logs:recent", {"limit": 2, "level": "WARNING"})
    assert [e["message"] for e in ack["entries"]] == ["w1", "e2"]
    ack = await client.emit("logs:recent", {"level": "error", "service": "billing"})
    assert [e["message"] for e in ack["entries"]] == ["e1"]
    for bad in ({"limit": 0}, {"limit": 1001}, {"level": "LOUD"}, {"limit": "x"}):
        with pytest.raises(ClientError) as info:
            await client.emit("logs:recent", bad)
        assert info.value.code == "VALIDATION_ERROR"

    reader = gateway.token("ops", ("logs",))
    status, body = await http(
        gateway, "GET", "/api/v1/logs/recent?level=warning&service=billing&limit=5", token=reader
    )
    assert status == 200 and [e["message"] for e in body["entries"]] == ["e1", "w1"]
    status, body = await http(gateway, "GET", "/api/v1/logs/recent?limit=0", token=reader)
    assert status == 400 and body["error"]["code"] == "VALIDATION_ERROR"
    status, body = await http(gateway, "GET", "/api/v1/logs/recent?level=nope", token=reader)
    assert status == 400 and "level" in body["error"]["details"]

    status, stats = await http(
        gateway, "GET", "/api/v1/logs/stats", token=gateway.token("a", ("admin",))
    )
    assert status == 200
    assert stats["byService"]["billing"] == 13 and stats["byService"]["search"] == 1
    assert stats["total"] >= 14 and stats["buffered"] == 8
    assert stats["byLevel"]["ERROR"] >= 2 and stats["byLevel"]["WARNING"] >= 1
    assert set(stats["byLevel"]) == {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    assert [e["message"] for e in stats["recentErrors"][:2]] == ["e2", "e1"]  # newest first

    for path in ("/api/v1/logs/recent", "/api/v1/logs/stats"):
        status, body = await http(gateway, "GET", path)
        assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
        status, body = await http(
            gateway, "GET", path, token=gateway.token("u", ("user", "service"))
        )
        assert status == 403 and body["error"]["code"] == "FORBIDDEN"


# -- slow subscribers ---------------------------------------------------------------


class RawSubscriber:
    """A WebSocket client on a bare TCP socket that reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, token: str) -> RawSubscriber:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window, so the server's writes back up quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # A small reader limit: asyncio stops reading the socket once it holds this much.
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws/logs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        status = await reader.readuntil(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101"), status
        return cls(reader, writer)

    def send(self, obj: Any) -> None:
        payload = orjson.dumps(obj)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        header = (
            struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0xFE, n)
        )
        self.writer.write(header + mask + masked)

    async def frame(self) -> dict[str, Any]:
        head = await self.reader.readexactly(2)
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(n)
        if opcode != 0x1:
            return {"opcode": opcode}
        result: dict[str, Any] = orjson.loads(payload)
        return result

    def close(self) -> None:
        self.writer.close()


async def test_slow_subscriber_loses_entries_not_server_memory(gateway_factory: Any) -> None:
    gateway = await gateway_factory(max_outbound_bytes=64 * 1024)
    raw = await RawSubscriber.open(gateway.port, gateway.token("ops", ("logs",)))
    assert (await raw.frame())["event"] == "system:welcome"
    raw.send({"event": "logs:subscribe", "data": {"contains": "flood-"}, "ack": 1})
    assert (await raw.frame()) == {"ack": 1, "ok": True, "data": orjson.loads(orjson.dumps({
        "subscribed": True,
        "filter": {"level": None, "services": None, "contexts": None, "contains": "flood-"},
    }))}  # fmt: skip
    handler = next(c for c in gateway.node.hub.connections.values() if isinstance(c, LogsHandler))
    assert handler.backlog_cap == 32 * 1024

    # Stop reading and flood: 4 KB entries until the server has had to drop some.
    logger = logging.getLogger("switchboard.flood")
    padding = "x" * 4000
    produced = 0
    while handler.dropped == 0:
        assert produced < 20_000, "the server never started dropping"
        for _ in range(100):
            logger.warning("flood-%d %s", produced, padding)
            produced += 1
        await asyncio.sleep(0)  # let the loop publish them
        assert handler.backlog_bytes <= handler.backlog_cap
        # Only one log frame at a time waits in tornado's own write buffer.
        assert len(handler.ws_connection.stream._write_buffer) < 2 * 5000  # type: ignore[union-attr]
    for _ in range(300):
        logger.warning("flood-%d %s", produced, padding)
        produced += 1
    await asyncio.sleep(0)  # let the loop publish them
    assert handler.backlog_peak <= handler.backlog_cap
    assert handler.dropped > 0
    # Still connected: losing log entries is not a reason to close.
    assert handler.conn_id in gateway.node.hub.connections

    # Read again: every entry is either delivered or counted in log:dropped.
    delivered = 0
    dropped_counts: list[int] = []
    while delivered + sum(dropped_counts) < produced:
        frame = await asyncio.wait_for(raw.frame(), 10)
        if frame.get("event") == "log:warning":
            delivered += 1
        elif frame.get("event") == "log:dropped":
            dropped_counts.append(frame["data"]["count"])
    assert delivered + sum(dropped_counts) == produced
    assert dropped_counts and all(count > 0 for count in dropped_counts)
    # The metrics tell an operator the same story.
    registry = gateway.node.registry
    assert registry.get_sample_value("switchboard_log_entries_dropped_total") == sum(dropped_counts)
    assert registry.get_sample_value("switchboard_log_entries_streamed_total") == delivered
    assert delivered > 0
    assert handler.backlog_bytes == 0 and handler.dropped == 0
    # After catching up the subscriber gets live entries again.
    logger.warning("flood-after")
    frame = await asyncio.wait_for(raw.frame(), 10)
    assert frame["event"] == "log:warning" and frame["data"]["message"] == "flood-after"
    raw.close()


# -- no recursion ---------------------------------------------------------------------


async def test_logging_while_delivering_does_not_loop(gateway: Any) -> None:
    stream = gateway.node.logstream
    seen: list[str] = []

    def noisy_sink(entry: dict[str, Any], frame: bytes) -> None:
        seen.append(entry["message"])
        # Both would feed back into the stream if it were not guarded.
        logging.getLogger("switchboard.noisy").error("delivered %s", entry["message"])
        stream.publish({**entry, "message": "re-entrant " + entry["message"]})

    stream.subscribe("noisy", LogFilter(contexts=frozenset({"switchboard.loop"})), noisy_sink)
    client = await gateway.connect("ops", "logs", roles=("logs",))
    await client.emit("logs:subscribe", {})
    suppressed = stream.suppressed
    logging.getLogger("switchboard.loop").warning("once")
    logging.getLogger("switchboard.loop").warning("twice")
    await until_message(client, "twice")
    # Barrier: re-entrant records would be published by loop callbacks queued
    # before the node reads this ping.
    await barrier(client)
    assert seen == ["once", "twice"]
    assert stream.suppressed - suppressed == 4
    mine = [m for m in messages(client) if "once" in m or "twice" in m]
    assert mine == ["once", "twice"]
    assert not [e for e in stream.recent(1000) if "delivered" in e["message"]]
    assert not [e for e in stream.recent(1000) if e["message"].startswith("re-entrant")]
    stream.unsubscribe("noisy")


async def test_failing_sink_is_dropped_and_others_still_served(gateway: Any) -> None:
    stream = gateway.node.logstream

    def broken(entry: dict[str, Any], frame: bytes) -> None:
        raise RuntimeError("sink bug")

    stream.subscribe("broken", LogFilter(), broken)
    client = await gateway.connect("ops", "logs", roles=("logs",))
    await client.emit("logs:subscribe", {"contains": "after-bug"})
    logging.getLogger("switchboard.x").warning("after-bug")
    await until_message(client, "after-bug")
    assert stream.subscriber_count() == 1  # "broken" is gone, the socket stays


async def test_capture_handler_installed_by_start_and_removed_by_stop(gateway_factory: Any) -> None:
    gateway = await gateway_factory()

    def ours() -> list[logging.Handler]:
        return [
            h
            for h in logging.getLogger("switchboard").handlers
            if isinstance(h, LogCaptureHandler) and h.stream is gateway.node.logstream
        ]

    assert len(ours()) == 1
    # The stream's own logger is never captured.
    logging.getLogger("switchboard.logstream").error("own")
    logging.getLogger("switchboard.y").error("other")
    await eventually(
        lambda: any(e["message"] == "other" for e in gateway.node.logstream.recent(10)),
        what="the record captured",
    )
    messages_now = [e["message"] for e in gateway.node.logstream.recent(1000)]
    assert "other" in messages_now and "own" not in messages_now
    await gateway.node.stop(grace_secs=0.5)
    assert ours() == []


async def test_a_logging_sink_on_one_node_is_not_captured_by_another(gateway_factory: Any) -> None:
    first, second = await gateway_factory(), await gateway_factory()

    def noisy_sink(entry: dict[str, Any], frame: bytes) -> None:
        logging.getLogger("switchboard.noisy").error("delivered %s", entry["message"])

    first.node.logstream.subscribe("noisy", LogFilter(contains="ping-pong"), noisy_sink)
    logging.getLogger("switchboard.z").warning("ping-pong")
    # Barrier: a later record; a "delivered" record from the sink would have
    # been queued for publishing before it.
    logging.getLogger("switchboard.z").warning("sentinel")
    for node in (first.node, second.node):
        await eventually(
            lambda node=node: any(e["message"] == "sentinel" for e in node.logstream.recent(10)),
            what="the sentinel captured",
        )
    for node in (first.node, second.node):
        found = [e["message"] for e in node.logstream.recent(1000)]
        assert "ping-pong" in found  # both capture the process's records
        assert not [m for m in found if m.startswith("delivered")]


async def test_records_queued_for_a_stalled_loop_are_bounded(gateway: Any) -> None:
    stream = gateway.node.logstream
    logger = logging.getLogger("switchboard.burst")
    extra = 25

    def burst() -> None:
        for i in range(MAX_PENDING_ENTRIES + extra):
            logger.info("burst %d", i)

    # Deliberately stall the loop while a worker thread logs (a blocked loop
    # is exactly the situation the bound is for).
    worker = threading.Thread(target=burst)
    worker.start()
    worker.join()
    assert stream.overflowed >= extra
    await eventually(lambda: stream._pending == 0, what="the queued records published")
    newest = stream.recent(1)[0]["message"]
    assert newest.startswith("burst ")
