"""The real CLI as a subprocess: start-up, graceful shutdown on a signal, refusals.

``python -m server serve --port 0`` runs exactly what an operator runs; the
test reads the printed listening line for the port, talks to the node with
real clients, signals it and checks what clients and the database saw.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from server import __version__
from server.core.auth import mint_token
from server.core.config import Config
from switchboard_client import Client

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():  # e.g. a CI image with the packages installed system-wide
    PYTHON = sys.executable
LISTENING_RE = re.compile(r"listening\s+http\s+http://127\.0\.0\.1:(\d+)")


def clean_env(**switchboard: str) -> dict[str, str]:
    """The current environment minus any SWITCHBOARD_* setting, plus ``switchboard``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update({f"SWITCHBOARD_{k.upper()}": v for k, v in switchboard.items()})
    return env


class ServerProcess:
    """A ``switchboard serve`` child process and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, db_path: Path) -> None:
        self.proc = proc
        self.db_path = db_path
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.port = 0
        self._pumps: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls, tmp_path: Path, *, preexec_fn: Callable[[], Any] | None = None, **switchboard: str
    ) -> ServerProcess:
        """Start a test-env node; ``switchboard`` adds SWITCHBOARD_* settings.

        The database is ``tmp_path``/x.db unless ``database_url`` says otherwise.
        """
        db_path = tmp_path / "x.db"
        settings = {"env": "test", "database_url": f"sqlite:///{db_path}", **switchboard}
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "server", "serve", "--port", "0", "--host", "127.0.0.1",
            cwd=ROOT,
            env=clean_env(**settings),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=preexec_fn,
        )  # fmt: skip
        server = cls(proc, db_path)
        assert proc.stderr is not None
        server._pumps.append(asyncio.create_task(server._pump(proc.stderr, server.stderr)))
        try:
            async with asyncio.timeout(15):
                server.port = await server._read_port()
        except BaseException:
            await server.kill()
            raise
        assert proc.stdout is not None
        server._pumps.append(asyncio.create_task(server._pump(proc.stdout, server.stdout)))
        return server

    async def _read_port(self) -> int:
        assert self.proc.stdout is not None
        while True:
            line = (await self.proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(
                    f"server exited before listening: {self.stdout} {''.join(self.stderr)}"
                )
            self.stdout.append(line)
            if match := LISTENING_RE.search(line):
                return int(match.group(1))

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, sink: list[str]) -> None:
        while line := await stream.readline():
            sink.append(line.decode())

    def token(self, user: str) -> str:
        return mint_token(Config.from_env({}, env="test"), user)

    async def client(self, user: str) -> Client:
        client = Client(f"ws://127.0.0.1:{self.port}/ws/chat", self.token(user))
        await client.connect()
        return client

    async def wait(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self._pumps)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = await ServerProcess.start(tmp_path)
    yield server
    await server.kill()


def stored_messages(db_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT room_id, content FROM message ORDER BY id").fetchall()


@pytest.mark.asyncio
async def test_sigterm_says_goodbye_closes_1001_and_keeps_the_data(served):
    assert "switchboard" in served.stdout[0] and "(test)" in served.stdout[0]
    alice, bob = await served.client("alice"), await served.client("bob")
    await alice.emit("room:create", {"roomId": "general", "name": "General"})
    await alice.emit("room:join", {"roomId": "general"})
    await bob.emit("room:join", {"roomId": "general"})
    ack = await alice.emit("message:send", {"roomId": "general", "content": "before shutdown"})
    assert ack["message"]["seq"] == 1
    await bob.next_event("message:new")

    loop = asyncio.get_running_loop()
    started = loop.time()
    served.proc.send_signal(signal.SIGTERM)
    for client in (alice, bob):
        goodbye = await client.next_event("system:disconnect", timeout=5)
        assert goodbye["data"] == {"reason": "server_shutdown", "reconnect": True}
        code, _reason = await client.wait_closed(timeout=5)
        assert code == 1001
    assert await served.wait(timeout=8) == 0, "".join(served.stderr)
    assert loop.time() - started < 3.0  # no sitting out the 5 s grace period
    assert "Traceback" not in "".join(served.stderr), "".join(served.stderr)
    # The acknowledged message outlived the process.
    assert stored_messages(served.db_path) == [("general", "before shutdown")]
    # And nothing listens any more.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", served.port)


@pytest.mark.asyncio
async def test_sigint_with_no_clients_exits_zero(served):
    served.proc.send_signal(signal.SIGINT)
    assert await served.wait(timeout=8) == 0, "".join(served.stderr)
    assert "Traceback" not in "".join(served.stderr), "".join(served.stderr)


def run_cli(*args: str, **switchboard: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "server", *args], cwd=ROOT, env=clean_env(**switchboard),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"switchboard {__version__}"


def test_production_refuses_to_start_without_a_secret(tmp_path):
    result = run_cli(
        "serve", "--port", "0",
        env="production", database_url=f"sqlite:///{tmp_path}/x.db",
        allowed_origins="https://chat.example.com",
    )  # fmt: skip
    assert result.returncode != 0
    assert "SWITCHBOARD_JWT_SECRET" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stdout
    assert not (tmp_path / "x.db").exists()
    # The public development default does not count as a secret either.
    result = run_cli(
        "serve", "--port", "0", env="production",
        jwt_secret="switchboard-development-secret-change-me",
        allowed_origins="https://chat.example.com",
    )  # fmt: skip
    assert result.returncode != 0 and "SWITCHBOARD_JWT_SECRET" in result.stderr
