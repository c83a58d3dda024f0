"""Database access from the event loop: thread pool vs ``playhouse.pwasyncio``.

Prints figures; it is not a test and asserts nothing about speed.

Two ways to run the chat's peewee code without blocking the loop:

* ``pool``: what the project ships, :class:`server.store.db.Database` -- sync
  peewee in a ``ThreadPoolExecutor``, one transaction per executor job
  (SQLite: 1 worker; PostgreSQL: 8 workers, a pooled psycopg2 connection each).
* ``pwasyncio``: peewee 4's asyncio module -- the same sync peewee code runs
  in greenlets on the loop thread, every query awaited through aiosqlite
  (one thread per connection) or asyncpg. A transaction is
  ``async with db.atomic(): await db.run(fn, ...)`` and the task's connection
  goes back to the pool after every operation (``await db.aclose()``);
  otherwise a long-lived task -- a WebSocket connection -- would pin one.
  ``pwasyncio-1run`` (opt-in) runs the whole transaction in one
  ``db.run`` call, pwasyncio's cheapest form.

Both run the project's real code on the real schema: ``models.chat.send_message``
(dedup lookup, membership check, ``UPDATE room SET last_seq=last_seq+1``,
select seq, insert) and ``models.chat.get_messages`` (a 50-row history page).
The schema is made by the project's migration runner (``Database.start()``).

For every backend x operation x concurrency C, C asyncio tasks share K
operations; each task acts as one member of one of ``--rooms`` rooms. Reported:
throughput, per-op latency (p50/p99, includes queueing), event-loop lateness
of a 1 ms ticker coroutine running alongside (p99/max: how long the loop
could not run anything else), this process's CPU (all threads: % of one core
and ms per op) and, for PostgreSQL, the server's CPU per op. Each cell runs
``--repeat`` times with the approaches interleaved; the table shows the
median of the repeats (the machine is noisy). pwasyncio's drivers
(``aiosqlite``, ``asyncpg``) are not the product's: the first run that needs
them installs them into the running interpreter's environment.

Usage::

    .venv/bin/python -m bench.db                 # SQLite + PostgreSQL (if installed)
    .venv/bin/python -m bench.db --backends sqlite --repeat 5
    .venv/bin/python -m bench.db --backends postgres --pg-workers 2   # pool sizing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peewee as pw

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import MODELS
from models import chat as chat_db
from server.store import db as server_db

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the test extras
    psutil = None

PAGE = 50
APPROACHES = ("pool", "pwasyncio", "pwasyncio-1run")
DEFAULT_APPROACHES = ("pool", "pwasyncio")


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Ticker:
    """A coroutine that wants to run every ``period`` s and records how late it was."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.lateness: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        due = time.perf_counter() + self.period
        while True:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            now = time.perf_counter()
            self.lateness.append(now - due)
            due = now + self.period

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def server_cpu(pid: int | None) -> float:
    """CPU seconds of process ``pid`` and its children (PostgreSQL backends)."""
    if psutil is None or pid is None:
        return 0.0
    try:
        proc = psutil.Process(pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total
    except psutil.Error:
        return 0.0


@dataclass
class Result:
    ops: int
    errors: int
    wall: float
    latencies: list[float]
    lateness: list[float]
    cpu: float
    server_cpu: float
    first_error: str = ""

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall if self.wall else 0.0

    def figures(self) -> dict[str, float]:
        return {
            "ops/s": self.ops_per_s,
            "p50": pct(self.latencies, 0.50) * 1e3,
            "p99": pct(self.latencies, 0.99) * 1e3,
            "lag p99": pct(self.lateness, 0.99) * 1e3,
            "lag max": max(self.lateness, default=0.0) * 1e3,
            "cpu %": 100 * self.cpu / self.wall if self.wall else 0.0,
            "cpu ms/op": 1e3 * self.cpu / max(1, self.ops),
            "srv ms/op": 1e3 * self.server_cpu / max(1, self.ops),
            "errors": float(self.errors),
        }


# --------------------------------------------------------------------------
# The two approaches
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    room_id: str
    user_id: str


class Approach:
    name = ""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def bind(self) -> None:
        """Bind the project's models to this approach's database."""

    async def send(self, actor: Actor) -> Any:
        raise NotImplementedError

    async def page(self, actor: Actor) -> Any:
        raise NotImplementedError


def send_args(actor: Actor) -> tuple[Any, ...]:
    # What handlers/chat.py passes: clients send a client_msg_id for dedup.
    return (
        actor.room_id, actor.user_id, f"User {actor.user_id}",
        "hello from the benchmark, a message of a typical chat length " + uuid.uuid4().hex,
        "text", None, [], {}, uuid.uuid4().hex,
    )  # fmt: skip


def page_args(actor: Actor) -> tuple[Any, ...]:
    return (actor.room_id, actor.user_id, PAGE, None, None)


# --pg-workers, read when the thread-pool approach opens its Database.
PG_WORKERS = [0]


class ThreadPool(Approach):
    """The shipped design: ``server.store.db.Database`` (sync peewee, executor)."""

    name = "pool"

    def __init__(self, url: str) -> None:
        self.db = server_db.Database(url, workers=PG_WORKERS[0])

    async def start(self) -> None:
        await self.db.start()  # migrations, as the server does

    def bind(self) -> None:
        self.db.db.bind(MODELS)

    async def send(self, actor: Actor) -> Any:
        return await self.db.run("message.send", chat_db.send_message, *send_args(actor))

    async def page(self, actor: Actor) -> Any:
        return await self.db.run("message.page", chat_db.get_messages, *page_args(actor))

    async def close(self) -> None:
        await self.db.close()


class PwAsyncio(Approach):
    """``playhouse.pwasyncio``: greenlets on the loop, aiosqlite / asyncpg."""

    name = "pwasyncio"

    def __init__(self, make_db: Callable[[], Any], *, one_run: bool = False) -> None:
        self._make_db = make_db
        self.db: Any = None
        self.one_run = one_run
        if one_run:
            self.name = "pwasyncio-1run"

    async def start(self) -> None:
        self.db = self._make_db()

    def bind(self) -> None:
        self.db.bind(MODELS)

    async def _txn(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        db = self.db
        try:
            if self.one_run:
                return await db.run(self._sync_txn, fn, args)
            async with db.atomic():
                return await db.run(fn, *args)
        finally:
            # Give the connection back, as Database.run does per job; a task
            # otherwise keeps it until the task ends.
            await db.aclose()

    def _sync_txn(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with self.db.atomic():
            return fn(*args)

    async def send(self, actor: Actor) -> Any:
        return await self._txn(chat_db.send_message, send_args(actor))

    async def page(self, actor: Actor) -> Any:
        return await self._txn(chat_db.get_messages, page_args(actor))

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close_pool()


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    url: str
    approaches: list[Approach] = field(default_factory=list)
    server_pid: Callable[[], int | None] = lambda: None
    note: str = ""


def sqlite_backend(tmp: str, names: list[str], async_pool: int) -> Backend:
    from playhouse.pwasyncio import AsyncSqliteDatabase

    path = os.path.join(tmp, "bench.db")
    url = f"sqlite:///{path}"

    def make() -> Any:
        # Same pragmas as server/store/db.py (WAL, synchronous=normal, busy_timeout).
        return AsyncSqliteDatabase(path, pragmas=server_db._SQLITE_PRAGMAS, pool_size=async_pool)

    backend = Backend("sqlite", url, note=f"WAL file in {tmp}; pwasyncio pool_size={async_pool}")
    backend.approaches = build_approaches(names, url, make)
    return backend


def postgres_backend(pg: Any, names: list[str], async_pool: int) -> Backend:
    from playhouse.pwasyncio import AsyncPostgresqlDatabase

    def make() -> Any:
        return AsyncPostgresqlDatabase(
            pg.dbname, host=pg.host, port=pg.port, user=pg.user, pool_size=async_pool,
            pool_min_size=async_pool,
        )  # fmt: skip

    backend = Backend(
        "postgres", pg.url, server_pid=lambda: pg.pid,
        note=f"{pg.url}; pool: {PG_WORKERS[0] or server_db.default_workers()} workers; "
        f"pwasyncio pool_size={async_pool}",
    )  # fmt: skip
    backend.approaches = build_approaches(names, pg.url, make)
    return backend


def build_approaches(names: list[str], url: str, make: Callable[[], Any]) -> list[Approach]:
    out: list[Approach] = []
    for name in names:
        if name == "pool":
            out.append(ThreadPool(url))
        else:
            out.append(PwAsyncio(make, one_run=name == "pwasyncio-1run"))
    return out


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def actors(rooms: int, users: int) -> list[Actor]:
    """Task i acts as user i (mod users) in room i (mod rooms)."""
    return [Actor(f"bench-{i % rooms}", f"u{i % users}") for i in range(users)]


def seed(rooms: int, users: int, messages: int) -> None:
    """Rooms with every user a member, each with ``messages`` messages (one transaction)."""
    member_ids = [f"u{i}" for i in range(users)]
    for r in range(rooms):
        room_id = f"bench-{r}"
        chat_db.create_room(room_id, "u0", f"Bench {r}", "public", "", "", None, member_ids)
        for n in range(messages):
            chat_db.send_message(
                room_id, member_ids[n % users], "seed", f"seed message {n}", "text",
                None, [], {}, None,
            )  # fmt: skip


async def run_cell(
    approach: Approach,
    op: str,
    concurrency: int,
    k: int,
    cast: list[Actor],
    tick: float,
    pid: int | None,
) -> Result:
    approach.bind()
    call: Callable[[Actor], Awaitable[Any]] = approach.send if op == "send" else approach.page
    counter = itertools.count()
    latencies: list[float] = []
    errors: list[BaseException] = []

    async def worker(actor: Actor) -> None:
        while next(counter) < k:
            started = time.perf_counter()
            try:
                await call(actor)
            except Exception as exc:
                errors.append(exc)
                continue
            latencies.append(time.perf_counter() - started)

    gc.collect()
    with Ticker(tick) as ticker:
        await asyncio.sleep(tick * 5)  # let the ticker settle
        ticker.lateness.clear()
        srv0, cpu0, t0 = server_cpu(pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(cast[i % len(cast)]) for i in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        srv = server_cpu(pid) - srv0
    first = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
    return Result(len(latencies), len(errors), wall, latencies, ticker.lateness, cpu, srv, first)


async def idle_lateness(tick: float, seconds: float) -> tuple[list[float], float]:
    """The ticker's lateness on an idle loop, and its own CPU share (%)."""
    cpu0 = time.process_time()
    with Ticker(tick) as ticker:
        await asyncio.sleep(seconds)
    return ticker.lateness, 100 * (time.process_time() - cpu0) / seconds


def check_rooms(rooms: int) -> str:
    """Every send committed as a whole: per room, last_seq == max(seq) == count."""
    from models import Message, Room

    bad = []
    total = 0
    for r in range(rooms):
        room_id = f"bench-{r}"
        last_seq = Room.get_by_id(room_id).last_seq
        query = Message.select().where(Message.room == room_id)
        count = query.count()
        top = query.select(pw.fn.MAX(Message.seq)).scalar()
        total += count
        if not last_seq == top == count:
            bad.append(f"{room_id}: last_seq={last_seq} max(seq)={top} rows={count}")
    return f"{total} messages, seqs gap-free" if not bad else "INCONSISTENT " + "; ".join(bad)


COLUMNS = (
    ("ops/s", "{:>8.0f}"), ("p50", "{:>7.2f}"), ("p99", "{:>7.2f}"),
    ("lag p99", "{:>8.2f}"), ("lag max", "{:>8.2f}"), ("cpu %", "{:>6.0f}"),
    ("cpu ms/op", "{:>9.3f}"), ("srv ms/op", "{:>9.3f}"), ("errors", "{:>6.0f}"),
)  # fmt: skip


def header() -> str:
    cells = [f"{name:>{len(fmt.format(0))}}" for name, fmt in COLUMNS]
    return f"{'backend':<9}{'op':<8}{'C':>4}  {'approach':<15}" + " ".join(cells)


def row(backend: str, op: str, c: int, approach: str, figures: dict[str, float]) -> str:
    cells = [fmt.format(figures[name]) for name, fmt in COLUMNS]
    return f"{backend:<9}{op:<8}{c:>4}  {approach:<15}" + " ".join(cells)


def median_figures(results: list[Result]) -> dict[str, float]:
    per = [r.figures() for r in results]
    out = {key: statistics.median(f[key] for f in per) for key in per[0]}
    out["errors"] = sum(f["errors"] for f in per)
    return out


async def bench_backend(backend: Backend, args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    print(f"\n== {backend.name}: {backend.note}", flush=True)
    # Schema by the migration runner (Database.start()), then the seed data.
    setup = ThreadPool(backend.url)
    await setup.start()
    setup.bind()
    await setup.db.run("seed", seed, args.rooms, args.users, args.seed_messages)
    await setup.close()
    for approach in backend.approaches:
        await approach.start()
    cast = actors(args.rooms, args.users)
    pid = backend.server_pid()
    try:
        # Warm every approach: connections, pools, caches.
        for approach in backend.approaches:
            for op in ("send", "page"):
                await run_cell(approach, op, max(args.concurrency), 100, cast, args.tick, pid)
        results: dict[tuple[str, int, str], list[Result]] = {}
        for rep in range(args.repeat):
            for op in ("send", "page"):
                k = args.k_send if op == "send" else args.k_page
                for c in args.concurrency:
                    order = backend.approaches if rep % 2 == 0 else backend.approaches[::-1]
                    for approach in order:
                        res = await run_cell(approach, op, c, k, cast, args.tick, pid)
                        results.setdefault((op, c, approach.name), []).append(res)
                        if args.verbose:
                            print(row(backend.name, op, c, approach.name, res.figures()))
                        if res.errors:
                            print(
                                f"  {backend.name} {op} C={c} {approach.name}: "
                                f"{res.errors} errors, first: {res.first_error}",
                                flush=True,
                            )
            print(f"  repeat {rep + 1}/{args.repeat} done", flush=True)
        for op in ("send", "page"):
            for c in args.concurrency:
                for approach in backend.approaches:
                    figs = median_figures(results[(op, c, approach.name)])
                    lines.append(row(backend.name, op, c, approach.name, figs))
        checker = backend.approaches[0]
        checker.bind()
        if isinstance(checker, ThreadPool):
            verdict = await checker.db.run("check", check_rooms, args.rooms)
        else:
            assert isinstance(checker, PwAsyncio)
            verdict = await checker.db.run(check_rooms, args.rooms)
            await checker.db.aclose()
        print(f"  consistency after all runs: {verdict}", flush=True)
    finally:
        for approach in backend.approaches:
            with contextlib.suppress(Exception):
                await approach.close()
    return lines


async def main_async(args: argparse.Namespace) -> int:
    lateness, ticker_cpu = await idle_lateness(args.tick, 1.0)
    print(
        f"idle loop, {args.tick * 1e3:g} ms ticker: lateness p99 "
        f"{pct(lateness, 0.99) * 1e3:.2f} ms, max {max(lateness) * 1e3:.2f} ms "
        f"(the floor for 'lag' below); the ticker alone uses {ticker_cpu:.0f}% CPU"
    )
    lines: list[str] = []
    if "sqlite" in args.backends:
        with tempfile.TemporaryDirectory(prefix="bench-db-", dir=args.tmpdir) as tmp:
            backend = sqlite_backend(tmp, args.approaches, args.sqlite_async_pool)
            lines += await bench_backend(backend, args)
    if "postgres" in args.backends:
        lines += await bench_postgres(args)
    print(
        f"\nmedian of {args.repeat} runs; K={args.k_send} sends / {args.k_page} pages per run;"
        f" {args.rooms} rooms, {args.users} users, {args.seed_messages} seeded messages/room."
    )
    print(
        "latency and lag in ms; cpu = this process, all threads; srv = PostgreSQL server;"
        f" GIL switch interval {sys.getswitchinterval() * 1e3:g} ms."
    )
    print(header())
    for line in lines:
        print(line)
    return 0


async def bench_postgres(args: argparse.Namespace) -> list[str]:
    try:
        from tests.support.services import PostgresServer, ServiceError, find_binary
    except Exception as exc:
        print(f"\n== postgres: skipped, tests/support/services.py failed to import: {exc!r}")
        return []
    if find_binary("initdb") is None:
        print("\n== postgres: skipped, PostgreSQL is not installed (initdb not found)")
        return []
    loop = asyncio.get_running_loop()
    pg = PostgresServer("switchboard_bench")
    try:
        await loop.run_in_executor(None, pg.start)
    except (ServiceError, OSError) as exc:
        print(f"\n== postgres: skipped, PostgresServer failed to start: {exc}")
        await loop.run_in_executor(None, pg.stop)
        return []
    try:
        backend = postgres_backend(pg, args.approaches, args.pg_async_pool)
        return await bench_backend(backend, args)
    finally:
        await loop.run_in_executor(None, pg.stop)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.db",
        description=(
            "Compare the project's thread-pool database access (server.store.db.Database) "
            "with playhouse.pwasyncio on the chat send transaction and a 50-row "
            "history page: throughput, latency, event-loop lateness, CPU."
        ),
    )

    def int_list(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    def str_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
        def parse(text: str) -> list[str]:
            items = [x for x in text.split(",") if x]
            bad = [x for x in items if x not in choices]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
            return items

        return parse

    parser.add_argument(
        "--backends",
        type=str_list(("sqlite", "postgres")),
        default=["sqlite", "postgres"],
        help="comma list (default: sqlite,postgres); postgres is skipped when it cannot start",
    )
    parser.add_argument(
        "--approaches",
        type=str_list(APPROACHES),
        default=list(DEFAULT_APPROACHES),
        help=f"comma list of {', '.join(APPROACHES)} (default: pool,pwasyncio)",
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int_list,
        default=[1, 50],
        help="comma list of concurrent task counts (default: 1,50)",
    )
    parser.add_argument(
        "--k-send", type=int, default=600, help="sends per run (default: %(default)s)"
    )
    parser.add_argument(
        "--k-page", type=int, default=400, help="history pages per run (default: %(default)s)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per cell, the median is shown (default: %(default)s)",
    )
    parser.add_argument(
        "--rooms", type=int, default=8, help="rooms the tasks spread over (default: %(default)s)"
    )
    parser.add_argument(
        "--users",
        type=int,
        default=50,
        help="distinct users, members of every room (default: %(default)s)",
    )
    parser.add_argument(
        "--seed-messages",
        type=int,
        default=200,
        help="seeded messages per room (default: %(default)s)",
    )
    parser.add_argument(
        "--tick", type=float, default=0.001, help="ticker period in seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--sqlite-async-pool",
        type=int,
        default=1,
        help="pwasyncio SQLite connections; more than 1 gives 'database is locked' "
        "errors under concurrency (default: %(default)s, like the pool's 1 worker)",
    )
    parser.add_argument(
        "--pg-workers",
        type=int,
        default=0,
        help="thread-pool workers on PostgreSQL (SWITCHBOARD_DB_WORKERS; "
        "default 0 = the project's default, one per core, at least 2)",
    )
    parser.add_argument(
        "--pg-async-pool",
        type=int,
        default=None,
        help="pwasyncio PostgreSQL connections (default: --pg-workers)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval() in seconds (default: Python's, 0.005): how often "
        "a thread holding the GIL is asked to hand it over",
    )
    parser.add_argument(
        "--tmpdir", default=None, help="where the SQLite file goes (default: the system temp dir)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    args = parser.parse_args(argv)
    if args.pg_async_pool is None:
        args.pg_async_pool = args.pg_workers
    if args.users < max(args.concurrency):
        args.users = max(args.concurrency)
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit unwinds like Ctrl-C: temp dirs go, PostgresServer stops (and
    # tests/support/services.py's atexit hook catches whatever is left).
    raise SystemExit(128 + signum)


#: What ``playhouse.pwasyncio`` needs per backend and is not the product's to ship:
#: installed into this interpreter's environment on first use (``ensure_drivers``).
ASYNC_DRIVERS = {
    "sqlite": ("aiosqlite", "aiosqlite>=0.20"),
    "postgres": ("asyncpg", "asyncpg>=0.29"),
}


def missing_drivers(
    approaches: list[str],
    backends: list[str],
    find: Callable[[str], object] = importlib.util.find_spec,
) -> list[str]:
    """The pip specs of the drivers the pwasyncio approaches need and ``find`` cannot import."""
    if not any(a.startswith("pwasyncio") for a in approaches):
        return []
    return [spec for b in backends for module, spec in [ASYNC_DRIVERS[b]] if find(module) is None]


def ensure_drivers(approaches: list[str], backends: list[str]) -> None:
    """``pip install`` the asyncio drivers the pwasyncio approaches need, when missing."""
    if wanted := missing_drivers(approaches, backends):
        print(f"  installing {', '.join(wanted)} for pwasyncio (first use)...", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", *wanted]
        subprocess.run(pip, check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_drivers(args.approaches, args.backends)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    PG_WORKERS[0] = args.pg_workers
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
