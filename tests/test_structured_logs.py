"""Structured logs: ``SWITCHBOARD_LOG_FORMAT=json`` gives one JSON object per line.

The end-to-end test runs ``python -m server serve --port 0`` as an operator
would, with JSON logs on stderr, drives a few connections through it (one
accepted and closed normally, one refused for its token, one closed for
sending bad events), stops it with SIGTERM and parses every stderr line.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from server.cli import JSONFormatter
from server.core.auth import mint_token
from server.core.config import Config
from switchboard_client import Client, ClientError, ConnectionClosed, HandshakeError

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():  # e.g. a CI image with the packages installed system-wide
    PYTHON = sys.executable
LISTENING_RE = re.compile(r"listening\s+http\s+http://127\.0\.0\.1:(\d+)")
NODE_ID = "json-node-1"
SECRET = "structured-logs-secret-0123456789abcdef"
ISO_UTC_MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# The base handler closes a connection after this many bad frames (handlers/base.py).
BAD_FRAMES_TO_CLOSE = 20


async def serve(tmp_path: Path, **settings: str) -> tuple[asyncio.subprocess.Process, int, Path]:
    """Start ``switchboard serve``; stderr goes to a file (read once it has exited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update({f"SWITCHBOARD_{k.upper()}": v for k, v in settings.items()})
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "server", "serve", "--port", "0", "--host", "127.0.0.1",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError(f"exited before listening: {stderr_path.read_text()}")
                if match := LISTENING_RE.search(line):
                    return proc, int(match.group(1)), stderr_path
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


async def stop(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        await proc.stdout.read()  # drain, so a full pipe cannot hold it up
        assert await proc.wait() == 0


@pytest.mark.asyncio
async def test_json_logs_carry_node_connection_user_and_event(tmp_path: Path) -> None:
    proc, port, stderr_path = await serve(
        tmp_path, env="test", log_format="json", node_id=NODE_ID, jwt_secret=SECRET,
        database_url=f"sqlite:///{tmp_path}/x.db",
    )  # fmt: skip
    try:
        config = Config.from_env({}, env="test", jwt_secret=SECRET)
        url = f"ws://127.0.0.1:{port}/ws/chat"
        polite = Client(url, mint_token(config, "alice"))
        await polite.connect()
        await polite.emit("system:ping", {})
        await polite.aclose()

        with pytest.raises((ClientError, HandshakeError)):
            await Client(url, "not-a-token").connect()

        rude = Client(url, mint_token(config, "mallory"))
        await rude.connect()
        for _ in range(BAD_FRAMES_TO_CLOSE):
            try:
                await rude.send("nope:nothing", {})
            except ConnectionClosed:
                break
        code, _ = await rude.wait_closed(timeout=10)
        assert code == 4400
    finally:
        if proc.returncode is None:
            await stop(proc)

    lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
    records = [orjson.loads(line) for line in lines]  # every line is one JSON object
    assert records
    for record in records:
        assert {"timestamp", "level", "logger", "message", "node"} <= set(record), record
        assert record["node"] == NODE_ID
        assert ISO_UTC_MS_RE.match(record["timestamp"]), record
    assert SECRET not in stderr_path.read_text()

    def find(**want: Any) -> list[dict[str, Any]]:
        return [r for r in records if all(r.get(k) == v for k, v in want.items())]

    polite_id, rude_id = polite.welcome["connectionId"], rude.welcome["connectionId"]
    accepted = find(connection_id=polite_id, user_id="alice", level="INFO")
    assert accepted[0]["message"] == "accepted chat connection from 127.0.0.1"
    assert accepted[-1]["message"].startswith("closed chat connection from 127.0.0.1: client")
    assert all(r["logger"] == "switchboard.ws" for r in accepted)

    refused = [r for r in records if r["message"].startswith("refused chat connection")]
    assert len(refused) == 1 and "UNAUTHORIZED" in refused[0]["message"]
    assert refused[0]["connection_id"] and "user_id" not in refused[0]

    abuse = find(connection_id=rude_id, user_id="mallory", event="nope:nothing")
    assert [r["level"] for r in abuse] == ["WARNING"]
    assert "repeated bad frames" in abuse[0]["message"]
    closed = find(connection_id=rude_id, user_id="mallory", level="INFO")
    assert any("protocol_abuse" in r["message"] for r in closed)


@pytest.mark.asyncio
async def test_text_logs_stay_for_development(tmp_path: Path) -> None:
    proc, port, stderr_path = await serve(
        tmp_path, env="test", node_id=NODE_ID, database_url=f"sqlite:///{tmp_path}/x.db"
    )
    try:
        client = Client(f"ws://127.0.0.1:{port}/ws/chat", mint_token(Config.from_env({}), "bob"))
        await client.connect()
        await client.aclose()
    finally:
        if proc.returncode is None:
            await stop(proc)
    text = stderr_path.read_text()
    assert "INFO    switchboard.ws: accepted chat connection from 127.0.0.1" in text
    assert not any(line.startswith("{") for line in text.splitlines())


def test_json_formatter_fields_and_utc_timestamp() -> None:
    formatter = JSONFormatter("n1")
    record = logging.LogRecord("switchboard.ws", logging.ERROR, __file__, 1, "boom %s", ("x",),
                               None)  # fmt: skip
    record.created = 1_790_000_000.25
    record.msecs = 250.0
    record.connection_id, record.user_id, record.event = "c1", "u1", "room:join"
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    entry = orjson.loads(formatter.format(record))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".250Z"
    assert entry["timestamp"] == stamp
    assert calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) == 1_790_000_000
    assert {k: v for k, v in entry.items() if k != "stack"} == {
        "timestamp": stamp, "level": "ERROR", "logger": "switchboard.ws", "message": "boom x",
        "node": "n1", "connection_id": "c1", "user_id": "u1", "event": "room:join",
    }  # fmt: skip
    assert "RuntimeError: kaput" in entry["stack"]
    # Unknown context is left out rather than written as null.
    bare = logging.LogRecord("switchboard", logging.INFO, __file__, 1, "hi", None, None)
    assert set(orjson.loads(formatter.format(bare))) == {
        "timestamp", "level", "logger", "message", "node",
    }  # fmt: skip
