"""A real multi-process cluster: redis-server, PostgreSQL and 2-3 gateway nodes.

Each node is ``python -m server serve --port 0`` -- exactly what an operator
runs -- with ``SWITCHBOARD_REDIS_URL`` pointing at one throwaway redis-server,
``SWITCHBOARD_DATABASE_URL`` at one shared PostgreSQL database (``seq`` is
allocated there, so every node must use the same one) and its own
``SWITCHBOARD_NODE_ID``. The port is read from the node's
``listening  http  http://127.0.0.1:PORT`` line.

Plain classes, no pytest: ``tests/test_cluster.py`` wraps :class:`Cluster`
in a module-scoped fixture and ``bench/cluster.py`` uses it directly::

    with Cluster(nodes=("a", "b")) as cluster:
        client = await cluster.connect("a", "alice")
        cluster.node("b").kill()          # kill -9
        cluster.node("b").start()         # back, on a new port
        cluster.redis.kill(); cluster.redis.start()   # same port, empty

Cleanup: ``stop()`` (also on an exception in ``with``) stops the nodes, then
Redis and PostgreSQL; an :mod:`atexit` hook stops whatever is still running;
and every node is started with ``PR_SET_PDEATHSIG`` so it dies with the
process that started it even when that one is SIGKILLed (services.py sweeps
the stores' leftovers on the next run).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from server.core.auth import mint_token
from server.core.config import Config
from switchboard_client import Client
from tests.support.services import Managed, PostgresServer, RedisServer, ServiceError

__all__ = ["Cluster", "NodeProcess", "parse_metrics"]

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():  # e.g. a CI image with the packages installed system-wide
    PYTHON = sys.executable
LISTENING_RE = re.compile(r"listening\s+http\s+http://127\.0\.0\.1:(\d+)")
NODE_STARTUP_TIMEOUT_SECS = 30.0
NODE_STOP_TIMEOUT_SECS = 10.0
#: Generous limits except ``typing``, which tests/test_cluster.py uses to reach
#: a rate limit quickly (no other cluster test sends typing events).
CLUSTER_RATE_LIMITS = "messages=5000/1m,joins=5000/1m,typing=10/1m,other=5000/1m"
CLUSTER_MAX_CONNECTIONS_PER_USER = 3
HEARTBEAT_INTERVAL_SECS = 0.5
# Kept well above the interval: the heartbeat sweep closes a connection that has
# not answered a ping for interval + timeout, and a test process busy for a
# second (start-up of a node, a psycopg2 query) must not lose its clients.
HEARTBEAT_TIMEOUT_SECS = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn``: the kernel SIGKILLs the node when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → ``{"name{labels}": value}`` (and ``{"name": sum}`` per family).

    Enough for counters and gauges; comments and histogram buckets are kept
    as their own series like any other line.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        out[series] = number
        name = series.split("{", 1)[0]
        if "{" in series:
            out[name] = out.get(name, 0.0) + number
    return out


class NodeProcess:
    """One ``python -m server serve`` child: start, kill -9, graceful stop, restart.

    Output (stdout and stderr) goes to ``log_path``; the port comes from the
    listening line. ``start()`` after ``kill()``/``stop()`` runs a new process
    with the same environment (and a new port).
    """

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self._offset = 0  # where this run's output starts in the log

    # -- addresses ------------------------------------------------------------

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, namespace: str = "chat") -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{namespace}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def log_text(self) -> str:
        """Everything this node (all its runs) wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle ------------------------------------------------------------

    def launch(self) -> None:
        """Start the process; :meth:`wait_listening` waits for its port."""
        if self.alive():
            return
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts + 1} of node {self.name} =====\n".encode())
            log.flush()
            self._offset = log.tell()
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "server", "serve", "--port", "0", "--host", "127.0.0.1"],
                cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.starts += 1
        self.port = 0

    def wait_listening(self, timeout: float = NODE_STARTUP_TIMEOUT_SECS) -> int:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), self.log_path.open("rb") as log:
                log.seek(self._offset)
                match = LISTENING_RE.search(log.read().decode(errors="replace"))
                if match:
                    self.port = int(match.group(1))
                    return self.port
            if not self.alive():
                raise ServiceError(
                    f"node {self.name} exited ({self.returncode}) before listening:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServiceError(f"node {self.name} not listening after {timeout}s:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.05)

    def start(self, timeout: float = NODE_STARTUP_TIMEOUT_SECS) -> Self:
        self.launch()
        self.wait_listening(timeout)
        return self

    def kill(self) -> None:
        """``kill -9``: no goodbye, no cleanup; Redis keeps whatever it had written."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=NODE_STOP_TIMEOUT_SECS)

    def stop(self, timeout: float = NODE_STOP_TIMEOUT_SECS) -> None:
        """Graceful (SIGTERM), then SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def __repr__(self) -> str:
        state = f"pid {self.pid} port {self.port}" if self.alive() else "down"
        return f"<NodeProcess {self.name} {state}>"


_live_clusters: set[Cluster] = set()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _live_lock:
        clusters = list(_live_clusters)
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.stop()


atexit.register(_stop_all_at_exit)


class Cluster(Managed):
    """redis-server + PostgreSQL + gateway nodes named ``nodes`` (``a``, ``b``, ``c``).

    ``node_env`` adds or overrides ``SWITCHBOARD_*`` settings for every node.
    ``redis_prefix`` defaults to a random one (the prefix setting is exercised,
    and channels/keys are easy to tell apart in ``MONITOR``).
    """

    def __init__(
        self,
        nodes: Iterable[str] = ("a", "b", "c"),
        *,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_SECS,
        node_env: Mapping[str, str] | None = None,
        redis_prefix: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.names = list(nodes)
        self.heartbeat_interval = heartbeat_interval
        self.prefix = redis_prefix or f"sbt{secrets.token_hex(3)}"
        self.extra_env = dict(node_env or {})
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="switchboard-cluster-"))
        self.redis = RedisServer()
        self.pg = PostgresServer()
        self.database_url = ""
        self.nodes: dict[str, NodeProcess] = {}
        self.config = Config.from_env(self.base_env())  # for minting tokens

    # -- settings -------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        """The ``SWITCHBOARD_*`` settings every node shares (plus the rest of os.environ)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "SWITCHBOARD_ENV": "test",
            "SWITCHBOARD_REDIS_URL": self.redis.url,
            "SWITCHBOARD_REDIS_PREFIX": self.prefix,
            "SWITCHBOARD_DATABASE_URL": self.database_url,
            "SWITCHBOARD_HEARTBEAT_INTERVAL": f"{self.heartbeat_interval:g}",
            "SWITCHBOARD_HEARTBEAT_TIMEOUT": f"{HEARTBEAT_TIMEOUT_SECS:g}",
            "SWITCHBOARD_RATE_LIMITS": CLUSTER_RATE_LIMITS,
            "SWITCHBOARD_MAX_CONNECTIONS_PER_USER": str(CLUSTER_MAX_CONNECTIONS_PER_USER),
            "SWITCHBOARD_METRICS_INTERVAL": "1",
        })  # fmt: skip
        env.update(self.extra_env)
        return env

    def node_env(self, name: str) -> dict[str, str]:
        return {**self.base_env(), "SWITCHBOARD_NODE_ID": name}

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        with _live_lock:
            _live_clusters.add(self)
        try:
            self.redis.start()
            self.pg.start()
            self.database_url = self.pg.create_database("cluster")
            self.config = Config.from_env(self.base_env())
            for name in self.names:
                self.nodes[name] = NodeProcess(
                    name, self.node_env(name), self.workdir / f"node-{name}.log"
                )
            # The first node migrates the shared database alone; the others
            # start together once the schema is there.
            first, *rest = self.nodes.values()
            first.start()
            for node in rest:
                node.launch()
            for node in rest:
                node.wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node, then Redis and PostgreSQL; idempotent."""
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop()
        for service in (self.redis, self.pg):
            with contextlib.suppress(Exception):
                service.stop()
        if self._own_workdir and not os.environ.get("SWITCHBOARD_KEEP_CLUSTER_LOGS"):
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
        with _live_lock:
            _live_clusters.discard(self)


    # -- nodes ------------------------------------------------------------------

    def node(self, name: str) -> NodeProcess:
        return self.nodes[name]

    def alive(self) -> dict[str, bool]:
        return {name: node.alive() for name, node in self.nodes.items()}

    def ensure_running(self) -> None:
        """Bring Redis and every node back (after a test that killed one)."""
        self.redis.start()
        for node in self.nodes.values():
            if not node.alive():
                node.start()

    def logs(self) -> str:
        """The tail of every node's log, for assertion messages."""
        return "\n".join(
            f"--- node {name} ({node!r}) ---\n{node.log_tail(25)}"
            for name, node in self.nodes.items()
        )

    # -- clients ----------------------------------------------------------------

    def token(self, user: str, roles: Iterable[str] = ("user",), **kw: Any) -> str:
        return mint_token(self.config, user, roles=tuple(roles), **kw)

    def client(
        self, node: str, user: str, namespace: str = "chat",
        roles: Iterable[str] = ("user",), **kw: Any,
    ) -> Client:  # fmt: skip
        """An unconnected :class:`Client` of ``user`` for ``node``."""
        return Client(self.node(node).url(namespace), self.token(user, roles), **kw)

    # -- HTTP ----------------------------------------------------------------------

    async def get(self, node: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """(status, body) of ``GET path`` on ``node`` (any status; raises if nothing answers)."""
        try:
            resp = await AsyncHTTPClient().fetch(
                self.node(node).http + path, raise_error=False, request_timeout=timeout
            )
        except HTTPClientError as exc:  # pragma: no cover - raise_error=False
            return exc.code, b""
        if resp.code == 599 and resp.error is not None:
            raise resp.error
        return resp.code, resp.body

    async def health(self, node: str, path: str = "/health/websocket") -> dict[str, Any]:
        """The health document (``status``, ``reasons``...) plus ``httpStatus``."""
        status, body = await self.get(node, path)
        doc: dict[str, Any] = orjson.loads(body) if body else {}
        doc["httpStatus"] = status
        return doc

    async def metrics(self, node: str) -> dict[str, float]:
        status, body = await self.get(node, "/metrics")
        if status != 200:
            raise AssertionError(f"/metrics on {node}: HTTP {status}")
        return parse_metrics(body.decode())

    async def metric(self, node: str, name: str) -> float:
        """One metric family's value (summed over labels), 0.0 when absent."""
        return (await self.metrics(node)).get(name, 0.0)

    # -- stores ----------------------------------------------------------------------

    def redis_key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of one query on the shared database, committed (psycopg2; call in a thread)."""
        import psycopg2

        conn = psycopg2.connect(self.database_url, connect_timeout=10)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    async def asql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """:meth:`sql` off the event loop."""
        return await asyncio.to_thread(self.sql, query, *params)


class Clients:
    """The clients one test opened on a :class:`Cluster`; :meth:`aclose` closes them all."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.opened: list[Client] = []

    async def connect(
        self, node: str, user: str, namespace: str = "chat",
        roles: Iterable[str] = ("user",), **kw: Any,
    ) -> Client:  # fmt: skip
        client = self.add(self.cluster.client(node, user, namespace, roles, **kw))
        await client.connect()
        return client

    def add(self, client: Client) -> Client:
        self.opened.append(client)
        return client

    async def aclose(self) -> None:
        for client in self.opened:
            with contextlib.suppress(Exception):
                await client.aclose(timeout=2.0)
        self.opened = []


def lock_rows(url: str, table: str, ids: Iterable[str]) -> Any:
    """A PostgreSQL transaction of the test's own holding ``table``'s rows ``ids``.

    ``SELECT ... FOR UPDATE``: a node's write to those rows (a room's seq
    bump) waits in the database until the returned connection's
    ``rollback()`` (or its death with the server). Blocking: call in a thread.
    """
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute(f"SELECT id FROM {table} WHERE id = ANY(%s) FOR UPDATE", (list(ids),))
        if cur.rowcount != len(set(ids)):
            conn.close()
            raise AssertionError(f"lock_rows: {cur.rowcount} of {table} {sorted(ids)} found")
    return conn


def lock_waiters(url: str) -> list[int]:
    """Backend pids of ``url``'s database waiting for a lock right now (blocking)."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock' ORDER BY pid"
            )
            return [int(row[0]) for row in cur.fetchall()]
    finally:
        conn.close()


async def waiting_for_locks(url: str, count: int) -> bool:
    """Whether exactly ``count`` sessions of ``url``'s database wait for a lock."""
    return len(await asyncio.to_thread(lock_waiters, url)) == count
