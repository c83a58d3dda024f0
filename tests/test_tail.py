"""``switchboard tail`` as a real subprocess against a live node.

Entries are produced through ``POST /api/v1/logs``; the test reads what the
command prints, breaks its connection from the server side to watch it
reconnect, and stops it with SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from tornado.httpclient import AsyncHTTPClient

from server.cli import format_entry

ROOT = Path(__file__).resolve().parent.parent
LINE_TIMEOUT_SECS = 15.0


class Tail:
    """A running ``python -m server tail`` with line readers for both streams."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr_seen: list[str] = []

    async def stdout_line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), LINE_TIMEOUT_SECS)
        assert raw, f"tail exited; stderr so far: {self.stderr_seen}"
        return raw.decode().rstrip("\n")

    async def stderr_until(self, text: str) -> str:
        assert self.proc.stderr is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stderr.readline(), LINE_TIMEOUT_SECS)
            assert raw, f"tail exited before saying {text!r}; stderr: {self.stderr_seen}"
            line = raw.decode().rstrip("\n")
            self.stderr_seen.append(line)
            if text in line:
                return line


@pytest_asyncio.fixture
async def run_tail() -> AsyncIterator[Any]:
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str, token: str | None = None) -> Tail:
        env = {k: v for k, v in os.environ.items() if k != "SWITCHBOARD_TOKEN"}
        if token is not None:
            env["SWITCHBOARD_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "tail", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=ROOT, env=env,
        )  # fmt: skip
        started.append(proc)
        return Tail(proc)

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def ingest(gateway: Any, entries: list[dict[str, Any]]) -> None:
    response = await AsyncHTTPClient().fetch(
        f"{gateway.http}/api/v1/logs",
        method="POST",
        headers={"Authorization": f"Bearer {gateway.token('billing', ('service',))}"},
        body=orjson.dumps({"entries": entries}),
    )
    assert orjson.loads(response.body) == {"accepted": len(entries)}


@pytest.mark.asyncio
async def test_tail_prints_filtered_entries_reconnects_and_exits_on_ctrl_c(
    gateway: Any, run_tail: Any
) -> None:
    tail = await run_tail(
        "--url", gateway.url("logs"), "--level", "warning", "--service", "billing",
        token=gateway.token("ops", ("logs",)),
    )  # fmt: skip
    await tail.stderr_until("subscribed to")
    await ingest(
        gateway,
        [
            {"level": "info", "service": "billing", "message": "too quiet"},
            {"level": "error", "service": "search", "message": "someone else"},
            {"level": "error", "service": "billing", "context": "Pay", "message": "card declined",
             "metadata": {"orderId": 7}},
        ],
    )  # fmt: skip
    line = await tail.stdout_line()
    assert "card declined" in line
    assert " ERROR " in line and " billing " in line and "Pay:" in line
    assert '{"orderId":7}' in line
    assert "\x1b[" not in line  # stdout is a pipe, not a TTY: no colors

    # The server drops the connection: tail says so, comes back and re-subscribes.
    for conn in list(gateway.node.hub.connections.values()):
        conn.close_with(1011, "test restart")
    await tail.stderr_until("reconnecting")
    await tail.stderr_until("reconnected")
    await tail.stderr_until("subscribed to")
    await ingest(gateway, [{"level": "warning", "service": "billing", "message": "back again"}])
    line = await tail.stdout_line()
    assert "back again" in line and "WARNING" in line

    tail.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(tail.proc.wait(), LINE_TIMEOUT_SECS) == 0


@pytest.mark.asyncio
async def test_tail_json_with_context_and_token_flag(gateway: Any, run_tail: Any) -> None:
    tail = await run_tail(
        "--url", gateway.url("logs"), "--context", "Pay", "--contains", "REFUND", "--json",
        "--token", gateway.token("root", ("admin",)),
    )  # fmt: skip
    await tail.stderr_until("subscribed to")
    await ingest(
        gateway,
        [
            {"level": "debug", "context": "Payroll", "message": "refund payroll"},
            {"level": "debug", "context": "Pay.Refund", "message": "no match here"},
            {"level": "debug", "context": "Pay.Refund", "message": "refund issued"},
        ],
    )
    entry = orjson.loads(await tail.stdout_line())
    assert entry["message"] == "refund issued"
    assert entry["context"] == "Pay.Refund" and entry["service"] == "billing"
    assert entry["level"] == "DEBUG" and entry["node"] == gateway.config.node_id
    tail.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(tail.proc.wait(), LINE_TIMEOUT_SECS) == 0


@pytest.mark.asyncio
async def test_tail_refused_or_without_token(gateway: Any, run_tail: Any) -> None:
    tail = await run_tail("--url", gateway.url("logs"))
    assert await asyncio.wait_for(tail.proc.wait(), LINE_TIMEOUT_SECS) == 2
    assert tail.proc.stderr is not None
    assert b"token" in await tail.proc.stderr.read()

    tail = await run_tail("--url", gateway.url("logs"), token=gateway.token("eve", ("user",)))
    await tail.stderr_until("refused: FORBIDDEN")
    assert await asyncio.wait_for(tail.proc.wait(), LINE_TIMEOUT_SECS) == 1


def test_format_entry_colors_by_level_and_indents_the_stack() -> None:
    entry = {
        "timestamp": "2026-01-01T00:00:00.000Z",
        "level": "ERROR",
        "service": "billing",
        "context": "Pay",
        "message": "boom",
        "metadata": {},
        "stack": "Traceback\n  line",
        "node": "n1",
    }
    plain = format_entry(entry, color=False)
    assert (
        plain
        == "2026-01-01T00:00:00.000Z ERROR    billing [n1] Pay: boom\n    Traceback\n      line"
    )
    colored = format_entry(entry, color=True)
    assert colored.startswith("\x1b[31m") and colored.endswith("\x1b[0m")
    assert format_entry({**entry, "level": "INFO"}, color=True).startswith("2026")
