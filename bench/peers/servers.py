"""The servers under test, each in its own process, started and stopped the same way.

* ``switchboard`` -- the real node as it ships (``bench._server.ServerProc("node")``:
  its own hub with no bench counters around it, SQLite in a temp dir, every
  message persisted before its broadcast);
* ``socketio-node`` -- ``socketio_node/server.js`` (npm ``socket.io`` 4.8);
* ``socketio-py`` -- ``socketio_py/server.py`` (python-socketio on aiohttp);
* ``ws-node`` (only when named in ``--servers``) -- ``ws_node/server.js``,
  Node ``ws`` with each broadcast framed once, speaking Switchboard's
  envelope: the ceiling reference;
* ``switchboard-memory`` (only when named) -- the same node with its message
  store in memory (``bench._server --hub memory``: no SQL for a send, no
  notification rounds): what Switchboard's path costs without the database,
  i.e. the database's share of the ``switchboard`` figures.

The peers persist nothing. Their dependencies install on first use into
ignored folders: ``npm ci`` into ``socketio_node/node_modules`` and a
virtualenv ``bench/peers/.venv`` (``socketio_py/requirements.txt``), so the
product's ``.venv`` stays as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._server import BENCH_SECRET, ServerProc
from bench._wsclient import LeanWS
from bench.peers.sio import PATH as SIO_PATH
from bench.peers.sio import SioWS

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "socketio_node"
PY_VENV = HERE / ".venv"


def ensure_node() -> None:
    """``npm ci`` into ``socketio_node/node_modules`` unless already there."""
    if not (NODE_DIR / "node_modules" / "socket.io").is_dir():
        print("  installing socketio_node's npm packages (first use)...", flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)


def ensure_py() -> Path:
    """The peers' own virtualenv with python-socketio, aiohttp and PyJWT; its python."""
    python = PY_VENV / "bin" / "python"
    if not python.exists():
        print("  creating bench/peers/.venv for python-socketio (first use)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PY_VENV)], check=True)
        reqs = HERE / "socketio_py" / "requirements.txt"
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(reqs)], check=True)
    return python


class PeerProc:
    """A peer server process: prints ``{"port", "pid"}``, answers ``gc``, stops on stdin EOF."""

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        self.cmd, self.cwd = cmd, cwd
        self.proc: subprocess.Popen[str] | None = None
        self.port = self.pid = 0

    def start(self, timeout: float = 30.0) -> PeerProc:
        env = dict(os.environ, BENCH_JWT_SECRET=BENCH_SECRET, PORT="0")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        hello = self._read_json(timeout)
        self.port, self.pid = hello["port"], hello["pid"]
        return self

    def _read_json(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], min(left, 1.0))[0]:
                line = self.proc.stdout.readline()
                if line.startswith("{"):
                    reply: dict[str, Any] = json.loads(line)
                    return reply
        raise RuntimeError(f"peer server {self.cmd} not answering")

    def command(self, cmd: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read_json(timeout)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


class Family:
    """How to start one server and talk to it: process, client class, path, rooms."""

    def __init__(self, name: str, label: str, cls: type[LeanWS], path: str, persisted: bool):
        self.name, self.label, self.cls, self.path = name, label, cls, path
        self.persisted = persisted

    def start(self) -> Any:
        if self.name == "switchboard":
            return ServerProc("node").start()
        if self.name == "switchboard-memory":
            return ServerProc("memory").start()
        if self.name in ("socketio-node", "ws-node"):
            ensure_node()
            node = shutil.which("node") or "node"
            where = NODE_DIR if self.name == "socketio-node" else HERE / "ws_node"
            return PeerProc([node, "--expose-gc", "server.js"], where).start()
        python = ensure_py()
        return PeerProc([str(python), "server.py"], HERE / "socketio_py").start()

    async def make_rooms(self, port: int, token: str, names: list[str]) -> list[str]:
        """Room ids for ``names``: Switchboard's are created (public) by ``token``'s user;
        Socket.IO rooms exist once joined, so their names are their ids."""
        if self.cls is not LeanWS or self.name == "ws-node":
            return names
        from bench._wsclient import Tally

        ws = await LeanWS.connect("127.0.0.1", port, self.path, token, Tally())
        try:
            await ws.welcome
            ids = []
            for name in names:
                created = await ws.request("room:create", {"name": name, "type": "public"})
                ids.append(created["data"]["room"]["id"])
            return ids
        finally:
            ws.abort()


FAMILIES = {
    f.name: f
    for f in (
        Family("switchboard", "Switchboard (persisted)", LeanWS, "/ws/chat", True),
        Family("socketio-node", "Node Socket.IO 4.8", SioWS, SIO_PATH, False),
        Family("socketio-py", "python-socketio (aiohttp)", SioWS, SIO_PATH, False),
        Family("ws-node", "Node `ws`, frame once", LeanWS, "/ws/chat", False),
        Family("switchboard-memory", "Switchboard, store in memory", LeanWS, "/ws/chat", False),
    )
}
