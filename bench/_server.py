"""A gateway node for the load tools, in its own process, with a choice of hub.

Run by ``bench/fanout.py`` and ``bench/idle.py`` (not by hand, though it can
be)::

    SWITCHBOARD_ENV=test .venv/bin/python -m bench._server --hub builtonce --port 0

It builds the real :class:`server.app.Node` from ``SWITCHBOARD_*`` variables
(nothing is mocked: the chat handler, SQLite in a worker thread, the hub),
with ``--hub``:

* ``node`` -- the node as it ships (its :class:`server.realtime.hub.Hub`, no
  counters: what ``bench/peers`` compares with the peers);
* ``builtonce`` -- the project's :class:`server.realtime.hub.Hub`: a broadcast is
  serialised and framed once and the same bytes go to every recipient.
* ``write_message`` -- :class:`WriteMessageHub`, the baseline: the same
  recipients, but each gets ``conn.write_message(json.dumps(payload))``,
  i.e. JSON serialised and framed per recipient through tornado's normal
  path (which also wraps every write in a Future and a Task).

When listening it prints one JSON line ``{"port", "pid", "hub"}`` to stdout,
then answers commands read from stdin, one JSON line per command:

* ``gc`` -- ``gc.collect()``; ``stats`` -- connection/room counts;
* ``snapshot`` / ``diff [N]`` -- with ``SWITCHBOARD_BENCH_TRACEMALLOC=1`` (set
  before start: tracemalloc must trace the connections from the beginning),
  a baseline snapshot, then the top ``N`` allocation sites grown since;
* ``lag`` -- with ``SWITCHBOARD_BENCH_LAG_MS=N``, the event-loop lag samples
  (seconds) taken every N ms since the previous ``lag``, and the node's
  background tasks alive at each sample (see :class:`LagSampler`);
* ``quit`` or end of stdin (the parent died) -- graceful stop, exit.

Logs go to stderr (the parent sends them to a file). RLIMIT_NOFILE is raised
to the hard limit so thousands of sockets fit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from server.cli import freeze_startup_heap, setup_logging
from server.core.config import Config
from server.ops.health import LoopMonitor
from server.realtime.hub import Connection, Hub

TRACEMALLOC_ENV = "SWITCHBOARD_BENCH_TRACEMALLOC"
LAG_ENV = "SWITCHBOARD_BENCH_LAG_MS"
ROOT = Path(__file__).resolve().parent.parent
#: The JWT secret the benchmark servers use (the clients mint with it).
BENCH_SECRET = "switchboard-bench-secret-not-for-production"


class TimedWrites(Hub):
    """Counts the CPU (this thread's) and wall time spent in ``_write`` and ``flush``.

    Together they are the broadcast loop itself: a delivery's cost without
    the chat path around it (envelope, schema, database, ack). With the
    node's coalescing hub ``_write`` queues and ``flush`` (once per loop
    iteration) makes one write per connection; ``flushes`` and
    ``flush_writes`` tell how many broadcasts shared a write. Two clock reads
    per broadcast or flush, not per recipient. The ``stats`` command reports
    the sums.
    """

    write_calls = 0
    write_deliveries = 0
    write_cpu = 0.0
    write_wall = 0.0
    flushes = 0
    flush_writes = 0

    def _write(self, conns: Any, frame: bytes, skip: Any) -> int:
        cpu, wall = time.thread_time(), time.perf_counter()
        delivered = super()._write(conns, frame, skip)
        self.write_cpu += time.thread_time() - cpu
        self.write_wall += time.perf_counter() - wall
        self.write_calls += 1
        self.write_deliveries += delivered
        return delivered

    def flush(self) -> int:
        cpu, wall = time.thread_time(), time.perf_counter()
        self.flushes += 1
        writes = super().flush()
        self.flush_writes += writes
        self.write_cpu += time.thread_time() - cpu
        self.write_wall += time.perf_counter() - wall
        return writes

    def counters(self) -> dict[str, Any]:
        return {
            "calls": self.write_calls,
            "deliveries": self.write_deliveries,
            "cpu": self.write_cpu,
            "wall": self.write_wall,
            "flushes": self.flushes,
            "flush_writes": self.flush_writes,
        }


class BuiltOnceHub(TimedWrites, Hub):
    """The project's hub as the node builds it (coalescing), with :class:`TimedWrites`."""


class DirectHub(TimedWrites, Hub):
    """The project's hub with ``coalesce`` off: every broadcast written at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["coalesce"] = False
        super().__init__(*args, **kwargs)


class _WriteMessage(Hub):
    """Baseline hub: per-recipient ``write_message(json.dumps(payload))``.

    Membership, targets, exclusion and held-back joins are the base class's;
    only the final write differs. ``publish``/``publish_many`` keep the
    payload dict at hand for ``_write`` (the base passes it a pre-built frame).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._payload: dict[str, Any] | None = None

    def publish(self, target: Any, event: str, data: dict[str, Any], **kwargs: Any) -> int:
        self._payload = {"event": event, "data": data}
        try:
            return super().publish(target, event, data, **kwargs)
        finally:
            self._payload = None

    def publish_many(self, targets: Any, event: str, data: dict[str, Any]) -> int:
        self._payload = {"event": event, "data": data}
        try:
            return super().publish_many(targets, event, data)
        finally:
            self._payload = None

    def _write(self, conns: Any, frame: bytes, skip: Any) -> int:
        payload = self._payload
        if payload is None:  # not from publish*: keep the base behaviour
            return super()._write(conns, frame, skip)
        delivered = 0
        for conn in conns:
            if (skip is None or conn not in skip) and _write_message(conn, payload):
                delivered += 1
        if self._on_delivered is not None and delivered:
            self._on_delivered(delivered, delivered * len(frame))
        return delivered


def _write_message(conn: Connection, payload: dict[str, Any]) -> bool:
    if getattr(conn, "_closing", False):
        return False
    try:
        conn.write_message(json.dumps(payload))  # type: ignore[attr-defined]
    except (WebSocketClosedError, StreamClosedError):
        return False
    return True


class WriteMessageHub(TimedWrites, _WriteMessage):
    """The baseline with :class:`TimedWrites`' counters.

    Its ``_write`` sum leaves out part of the baseline's cost: each
    ``write_message`` schedules a Task that runs later, outside ``_write``.
    The loop thread's CPU per delivery (``bench/fanout.py``) includes it.
    """


HUBS: dict[str, type[Hub]] = {
    # The node exactly as it ships: its own hub class, no counters around it.
    "node": Hub,
    "builtonce": BuiltOnceHub,
    "direct": DirectHub,
    "write_message": WriteMessageHub,
}
#: ``--hub`` names of a node that keeps no messages (:class:`MemoryStore`) -> its hub.
UNPERSISTED = {"unpersisted": "builtonce", "memory": "node"}


class MemoryStore:
    """The non-persisted baseline: ``models.chat.store_sends``' interface, no SQL.

    Seqs come from a counter per room and ids from one counter; nothing is
    checked (the handler still requires a joined room) and nothing stored.
    The node's batcher still runs it in the database worker (its job opens
    no transaction: ``store_sends`` opens its own), so the path differs from
    the real one by the SQL alone;
    the node's notification follow-up of each message is off as well (it
    reads the room's members from the database), as a plain room broadcast
    (Socket.IO's) has none.
    """

    def __init__(self) -> None:
        self._seqs: dict[str, int] = {}
        self._ids = 0

    def __call__(self, requests: list[Any]) -> list[Any]:
        from models import chat as chat_db
        from models import utcnow
        from server.core.protocol import iso

        created = iso(utcnow())
        out = []
        for r in requests:  # one batch at a time (the batcher's), in one worker thread
            self._ids += 1
            seq = self._seqs[r.room_id] = self._seqs.get(r.room_id, 0) + 1
            # The wire shape's one builder (private, but a copy here would drift from it).
            message = chat_db._wire_message(
                self._ids, r.room_id, seq, r.sender_id, r.sender_name, r.content, r.msg_type,
                r.parent_id, r.attachments, r.metadata, {}, created, None, False,
            )  # fmt: skip
            out.append(chat_db.Sent(message, False))
        return out


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class LagSampler:
    """The node's event-loop lag, sampled often enough for a p99.

    The node's own :class:`~server.ops.health.LoopMonitor` samples every 0.5 s
    and keeps only the latest value (the ``switchboard_event_loop_lag_seconds``
    gauge): a handful of samples per run. This is a second monitor of the
    same class on the node's loop, every ``interval_secs``, keeping every
    sample until :meth:`take`. With each sample it records how many of the
    node's background tasks are alive (``BackgroundTasks``: mostly the
    notification follow-up of each sent message), the nearest thing to a
    notification queue depth the node has.
    """

    def __init__(self, node: Any, interval_secs: float) -> None:
        self.node = node
        self.lags: list[float] = []
        self.tasks: list[int] = []
        self.monitor = LoopMonitor(interval_secs, on_lag=self._sample)

    def _sample(self, lag_secs: float) -> None:
        self.lags.append(lag_secs)
        self.tasks.append(len(self.node.tasks))

    def take(self) -> dict[str, Any]:
        out = {"lag": self.lags, "tasks": self.tasks}
        self.lags, self.tasks = [], []
        return out


class Commands:
    """Answers the parent's stdin commands on the event loop."""

    def __init__(self, node: Any, stop: asyncio.Event, lag: LagSampler | None = None) -> None:
        self.node = node
        self.stop = stop
        self.lag = lag
        self.baseline: tracemalloc.Snapshot | None = None

    def handle(self, line: str | None) -> None:
        if line is None:
            self.stop.set()
            return
        cmd, *args = line.split() or [""]
        try:
            if cmd == "gc":
                _reply({"ok": True, "collected": gc.collect()})
            elif cmd == "stats":
                hub = self.node.hub
                counters = hub.counters() if isinstance(hub, TimedWrites) else {}
                _reply(
                    {
                        "ok": True,
                        "connections": len(hub.connections),
                        "rooms": hub.active_rooms(),
                        "writes": counters,
                    }
                )
            elif cmd == "snapshot":
                gc.collect()
                self.baseline = _snapshot()
                _reply({"ok": True})
            elif cmd == "diff":
                _reply({"ok": True, **self._diff(int(args[0]) if args else 25)})
            elif cmd == "types":
                _reply({"ok": True, "types": _types()})
            elif cmd == "lag":
                if self.lag is None:
                    raise RuntimeError(f"no lag sampler: start with {LAG_ENV}=<ms>")
                _reply({"ok": True, **self.lag.take()})
            elif cmd == "quit":
                _reply({"ok": True})
                self.stop.set()
            else:
                _reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:
            _reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _diff(self, top: int) -> dict[str, Any]:
        if self.baseline is None:
            raise RuntimeError(f"no baseline: start with {TRACEMALLOC_ENV}=1 and send 'snapshot'")
        gc.collect()
        after = _snapshot()
        out: dict[str, Any] = {"traced": tracemalloc.get_traced_memory()[0]}
        for key in ("lineno", "traceback"):
            stats = after.compare_to(self.baseline, key)
            rows = []
            for st in stats[: top if key == "lineno" else 8]:
                frames = st.traceback.format(limit=6 if key == "traceback" else 1)
                rows.append({"size": st.size_diff, "count": st.count_diff, "where": frames})
            out[key] = rows
        by_file = after.compare_to(self.baseline, "filename")
        out["total_diff"] = sum(s.size_diff for s in by_file)
        out["filename"] = [
            {"size": s.size_diff, "count": s.count_diff, "where": [s.traceback[0].filename]}
            for s in by_file[:top]
        ]
        return out


def _types() -> dict[str, list[int]]:
    """Objects the collector tracks, by type: ``{name: [count, bytes]}`` (shallow sizes)."""
    gc.collect()
    out: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        row = out.setdefault(_type_name(obj), [0, 0])
        row[0] += 1
        row[1] += sys.getsizeof(obj)
    return out


def _type_name(obj: object) -> str:
    """The type's name, and what runs for coroutines, tasks, timers and bound methods."""
    name = type(obj).__qualname__
    detail: Any = None
    if isinstance(obj, types.CoroutineType):
        detail = obj.cr_code.co_qualname
    elif isinstance(obj, asyncio.Task):
        detail = obj.get_coro().__qualname__  # type: ignore[union-attr]
    elif isinstance(obj, asyncio.Handle):
        detail = getattr(getattr(obj, "_callback", None), "__qualname__", None)
    elif isinstance(obj, types.MethodType | types.FunctionType):
        detail = obj.__qualname__
    elif isinstance(obj, set | dict | list):
        detail = len(obj)
    return name if detail is None else f"{name} {detail}"


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


def _read_stdin(loop: asyncio.AbstractEventLoop, handle: Any) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(handle, line.strip())
    loop.call_soon_threadsafe(handle, None)


async def _main(hub_name: str, port: int) -> int:
    from server.app import Node

    config = Config.from_env(os.environ, port=port)
    setup_logging(config)
    if hub_name in UNPERSISTED:
        from models import chat as chat_db

        chat_db.store_sends = MemoryStore()  # the node's sends batcher takes it at build
    node = Node(config, hub_class=HUBS[UNPERSISTED.get(hub_name, hub_name)])
    if hub_name in UNPERSISTED:
        node.notifications.message_sent = lambda message: None  # type: ignore[method-assign]
    await node.start()
    freeze_startup_heap()  # as server/cli.py does: the bench measures the node as deployed
    lag_ms = float(os.environ.get(LAG_ENV) or 0)
    lag = LagSampler(node, lag_ms / 1000) if lag_ms > 0 else None
    if lag is not None:
        lag.monitor.start()
    stop = asyncio.Event()
    commands = Commands(node, stop, lag)
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_stdin, args=(loop, commands.handle), daemon=True).start()
    _reply(
        {
            "port": node.port,
            "pid": os.getpid(),
            "hub": hub_name,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        }
    )
    await stop.wait()
    if lag is not None:
        await lag.monitor.stop()
    await node.stop(grace_secs=3.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hub", choices=sorted([*HUBS, *UNPERSISTED]), default="builtonce")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    raise_nofile()
    if os.environ.get(TRACEMALLOC_ENV) == "1":
        tracemalloc.start(int(os.environ.get("SWITCHBOARD_BENCH_TRACEMALLOC_FRAMES", "8")))
    if stages := os.environ.get("BENCH_STAGES_FILE"):
        from bench.stages import install

        install(stages)  # bench.stages: timestamp probes on the send path
    return asyncio.run(_main(args.hub, args.port))


# ---------------------------------------------------------------------------
# The parent's side: start, drive and stop a server process.
# ---------------------------------------------------------------------------


def bench_env(**extra: str) -> dict[str, str]:
    """``SWITCHBOARD_*`` settings for a benchmark node (roomy limits, quiet logs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        {
            "SWITCHBOARD_ENV": "test",
            "SWITCHBOARD_NODE_ID": "bench",
            "SWITCHBOARD_JWT_SECRET": BENCH_SECRET,
            "SWITCHBOARD_RATE_LIMITS": ",".join(
                f"{c}=100000/1m" for c in ("messages", "joins", "typing", "other")
            ),
            "SWITCHBOARD_MAX_CONNECTIONS_PER_IP": "100000",
            "SWITCHBOARD_MAX_CONNECTIONS_PER_USER": "100000",
            # Open TCP connections per address (checked at accept, before any HTTP):
            # derived from the per-IP limit when unset; spelt out so a change to
            # the derivation cannot make the benchmark refuse its own clients.
            "SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP": "200000",
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra)
    return env


def bench_config() -> Config:
    """A :class:`Config` matching :func:`bench_env` (for minting tokens)."""
    return Config.from_env(bench_env())


class ServerProc:
    """One ``bench._server`` process: its port, pid, commands and clean stop.

    The SQLite database and the log live in a temporary directory removed by
    :meth:`stop`.
    """

    def __init__(self, hub: str = "builtonce", *, env: dict[str, str] | None = None) -> None:
        self.hub = hub
        self.tmp = tempfile.mkdtemp(prefix="switchboard-bench-")
        self.log_path = os.path.join(self.tmp, "server.log")
        self.env = bench_env(SWITCHBOARD_DATABASE_URL=f"sqlite:///{self.tmp}/bench.db")
        self.env.update(env or {})
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.pid = 0

    def start(self, timeout: float = 60.0) -> ServerProc:
        cmd = [sys.executable, "-m", "bench._server", "--hub", self.hub, "--port", "0"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.hello = hello = self._read_json(timeout)
        self.port, self.pid = hello["port"], hello["pid"]
        return self

    def _read_json(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"benchmark server not answering; log:\n{self.log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("{"):
                    reply: dict[str, Any] = json.loads(line)
                    return reply

    def command(self, cmd: str, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read_json(timeout)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError), open(self.log_path) as fh:
            return "".join(fh.readlines()[-lines:])
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (``quit``), then SIGTERM, then SIGKILL; remove the temp dir."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def profile(self, path: str) -> Profiler:
        """``py-spy record`` attached to the server until the returned object is stopped."""
        return Profiler(self.pid, path)

    def __enter__(self) -> ServerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Profiler:
    """``py-spy record --pid`` for a stretch of a run (attaching needs ptrace rights).

    The format follows the file's extension: ``.svg`` flame graph, ``.json``
    speedscope, anything else py-spy's raw collapsed stacks (greppable).
    """

    def __init__(self, pid: int, path: str) -> None:
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy"
        )
        if spy is None:
            raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(path).suffix, "raw")
        self.path = path
        self.proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--nonblocking",
                "--threads",
                "--format",
                fmt,
                "--output",
                path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)  # let it attach
        if self.proc.poll() is not None:
            assert self.proc.stderr is not None
            raise RuntimeError(f"py-spy failed: {self.proc.stderr.read().strip()}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.path


if __name__ == "__main__":
    raise SystemExit(main())
