"""A gateway in a child process (``python -m server serve``), restartable on its port.

The web tests drive the gateway from other processes (Node's test runner, a
browser), so it runs as the command a developer runs, in ``development`` so
``POST /dev/token`` exists, on a SQLite file that survives restarts.
:class:`ControlServer` lets those processes ask for a restart over HTTP.

Example::

    with GatewayProcess(tmp_path) as gw, ControlServer(gw) as control:
        run(["node", "--test", "web/test/"], env={"SWITCHBOARD_TEST_URL": gw.http, ...})
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from tests.support.services import Managed

REPO_ROOT = Path(__file__).absolute().parents[2]
START_TIMEOUT_SECS = 20.0
STOP_TIMEOUT_SECS = 10.0
# Roomy limits: the tests are about the client, not about rate limiting.
ROOMY_RATE_LIMITS = "messages=1000/1m,joins=1000/1m,typing=1000/1m,other=5000/1m"
_LISTENING = re.compile(r"listening\s+http\s+http://127\.0\.0\.1:(\d+)")


class GatewayProcess(Managed):
    """``python -m server serve`` on 127.0.0.1; :meth:`restart` keeps the port."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "SWITCHBOARD_ENV": "development",
            "SWITCHBOARD_DATABASE_URL": f"sqlite:///{home}/switchboard.db",
            "SWITCHBOARD_RATE_LIMITS": ROOMY_RATE_LIMITS,
            "SWITCHBOARD_NODE_ID": "web-test",
            **env,
        }
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self._lock = threading.Lock()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "gateway.log"

    def start(self) -> Self:
        log = open(self.log_path, "a")  # the child keeps its own copy of the fd
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        log.close()
        self.starts += 1
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_SECS)
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"gateway did not start; log:\n{self.log()}") from None
            if line is None:
                raise RuntimeError(f"gateway exited at start; log:\n{self.log()}")
            if match := _LISTENING.search(line):
                self.port = int(match.group(1))
                return self

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # keep draining so the child never blocks on a full pipe
            lines.put(line)
        lines.put(None)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # graceful: system:disconnect, close 1001
        try:
            proc.wait(STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        with self._lock:
            self.stop()
            self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-8000:]
        except OSError:
            return ""


class ControlServer(Managed):
    """``POST /restart`` restarts the gateway and answers once it listens again."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/restart":
                    self.send_error(404)
                    return
                outer.gateway.restart()
                body = json.dumps({"http": outer.gateway.http, "starts": outer.gateway.starts})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
