"""Memory of idle chat connections: server RSS per connection.

Prints figures; it is not a test and asserts nothing about memory.

A fresh server process (``bench/_server.py``: the real :class:`server.app.Node`,
SQLite in a temp dir) gets ``--connections`` authenticated ``/ws/chat``
connections (default 5,000, one user each), opened from ``--procs`` client
processes (lean clients, ``bench/_wsclient.py``) over ``--source-ips``
loopback source addresses (127.0.0.1, .2, ...; ephemeral ports). A connection
counts once it has received ``system:welcome``. Nothing is sent afterwards;
the clients answer the server's pings.

Measured with psutil on the server process:

1. RSS fresh (listening, no connection);
2. ``--warmup`` connections opened and kept (code paths, caches and pools
   that exist once per process are paid here, not per connection), then
   ``gc.collect()`` in the server: RSS *before*;
3. the N connections opened, ``gc.collect()`` again: RSS *after*.

bytes per connection = (after - before) / N, also for USS (private memory).
Kernel socket buffers are not in RSS (nothing is queued on idle sockets).

``--tracemalloc`` starts the server with ``SWITCHBOARD_BENCH_TRACEMALLOC=1``:
a snapshot at *before*, and the allocation sites that grew by *after* are
printed (Python objects only; tracemalloc's own bookkeeping inflates the
RSS of such a run, so its RSS figures are not the ones to quote).

``--types``: the objects the server's garbage collector tracks, counted by
type at *before* and *after* (shallow sizes; coroutines, tasks and timers
named by what they run): what a connection holds, where tracemalloc says
where it was allocated.

Usage::

    .venv/bin/python -m bench.idle                     # 5,000 connections
    .venv/bin/python -m bench.idle --connections 2000 --tracemalloc
    .venv/bin/python -m bench.idle --connections 2000 --types
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench._server import TRACEMALLOC_ENV, ServerProc, bench_config
from bench._wsclient import LeanWS, Pipe, Tally, open_many, raise_nofile
from server.core.auth import mint_token

TARGET_BYTES = 12 * 1024  # per idle connection (issue 16: below Node Socket.IO)
HOST = "127.0.0.1"


def _client_proc(conn: Any, port: int, sources: list[str], concurrency: int) -> None:
    raise_nofile()
    asyncio.run(_client_main(conn, port, sources, concurrency))


async def _client_main(conn: Any, port: int, sources: list[str], concurrency: int) -> None:
    pipe = Pipe(conn)
    tally = Tally()
    held: list[LeanWS] = []
    while True:
        msg = await pipe.get()
        if msg[0] != "open":
            break
        started = time.monotonic()
        conns, errors = await open_many(
            HOST, port, "/ws/chat", msg[1], tally, sources=sources, concurrency=concurrency
        )
        held += conns
        lost = sum(1 for c in held if c.closed.done())
        pipe.send(("opened", len(conns), errors[:3], time.monotonic() - started, lost))
    for ws in held:
        ws.abort()


def _mem(proc: psutil.Process) -> tuple[int, int]:
    info = proc.memory_full_info()
    return info.rss, info.uss


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Server memory per idle authenticated chat connection "
        "(prints figures, asserts nothing).",
        epilog=f"Target: <= {TARGET_BYTES // 1024} KiB per connection.",
    )
    parser.add_argument(
        "--connections", type=int, default=5000, help="connections to measure (default 5000)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=100,
        help="connections opened (and kept) before the baseline (default 100)",
    )
    parser.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    parser.add_argument(
        "--source-ips", type=int, default=4, help="spread connections over 127.0.0.1..N (default 4)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="handshakes in flight per client process (default 64)",
    )
    parser.add_argument(
        "--users", type=int, default=0, help="distinct users (default 0: one per connection)"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="report the server's Python allocation sites that grew",
    )
    parser.add_argument(
        "--types",
        action="store_true",
        help="report the objects the server's collector tracks that grew, by type",
    )
    parser.add_argument("--top", type=int, default=15, help="tracemalloc rows (default 15)")
    parser.add_argument(
        "--frames",
        type=int,
        default=4,
        help="tracemalloc stack depth (default 4; deeper is much slower)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds opening connections may take (default 180)",
    )
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the clean-up still runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    nofile = raise_nofile()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    print(
        f"idle-connection benchmark: {os.cpu_count()} cores, RLIMIT_NOFILE {nofile} "
        f"(hard {hard}), {args.connections:,} connections + {args.warmup} warm-up, "
        f"{args.procs} client process(es), {args.source_ips} source IP(s)",
        flush=True,
    )
    per_proc = (args.connections + args.warmup) / args.procs
    if per_proc + 100 > nofile:
        print(
            f"  [!] {per_proc:.0f} sockets per client process is near RLIMIT_NOFILE; raise --procs",
            file=sys.stderr,
        )

    config = bench_config()
    total = args.warmup + args.connections
    n_users = args.users or total
    users = [mint_token(config, f"idle-{u}", ttl_secs=7200) for u in range(n_users)]
    tokens = [users[i % n_users] for i in range(total)]
    warm, measured = tokens[: args.warmup], tokens[args.warmup :]
    sources = [f"127.0.0.{i + 1}" for i in range(args.source_ips)]

    env = {}
    if args.tracemalloc:
        env = {TRACEMALLOC_ENV: "1", TRACEMALLOC_ENV + "_FRAMES": str(args.frames)}
    server = ServerProc("builtonce", env=env)
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        server.start()
        sproc = psutil.Process(server.pid)
        print(f"  server pid {server.pid}, RLIMIT_NOFILE {server.hello['nofile']}")
        for _ in range(args.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_client_proc,
                args=(child, server.port, sources, args.concurrency),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
            pipes.append(parent)

        def open_all(chunks: list[list[str]]) -> tuple[int, float]:
            for pipe, chunk in zip(pipes, chunks, strict=True):
                pipe.send(("open", chunk))
            ok, secs = 0, 0.0
            for pipe in pipes:
                if not pipe.poll(args.timeout):
                    raise TimeoutError(f"connections not open within {args.timeout:.0f}s")
                _, n, errors, took, lost = pipe.recv()
                ok, secs = ok + n, max(secs, took)
                if errors:
                    print(f"  [!] connect errors: {errors}", file=sys.stderr)
                if lost:
                    print(f"  [!] {lost} connections closed by the server", file=sys.stderr)
            return ok, secs

        server.command("gc")
        fresh = _mem(sproc)
        ok_warm, _ = open_all([warm[i :: args.procs] for i in range(args.procs)])
        time.sleep(0.5)
        server.command("gc")
        before = _mem(sproc)
        types_before = server.command("types")["types"] if args.types else {}
        if args.tracemalloc:
            server.command("snapshot")
        ok, secs = open_all([measured[i :: args.procs] for i in range(args.procs)])
        time.sleep(1.0)
        server.command("gc")
        after = _mem(sproc)
        stats = server.command("stats")
        print(
            f"  opened {ok:,}/{args.connections:,} in {secs:.1f}s "
            f"({ok / max(secs, 1e-9):,.0f}/s); server holds {stats['connections']:,} "
            f"connections (incl. {ok_warm} warm-up)"
        )
        print(
            f"  server RSS fresh {fresh[0] / 2**20:,.1f} MiB, before {before[0] / 2**20:,.1f} "
            f"MiB, after {after[0] / 2**20:,.1f} MiB (USS {before[1] / 2**20:,.1f} -> "
            f"{after[1] / 2**20:,.1f} MiB)"
        )
        if ok:
            rss_per, uss_per = (after[0] - before[0]) / ok, (after[1] - before[1]) / ok
            verdict = "met" if rss_per <= TARGET_BYTES else "NOT met"
            print(
                f"  per connection: RSS {_kib(rss_per)} ({rss_per:,.0f} bytes), "
                f"USS {_kib(uss_per)}  (target <= {TARGET_BYTES // 1024} KiB: {verdict})"
                + ("  [tracemalloc on: RSS inflated]" if args.tracemalloc else "")
            )
        if args.types and ok:
            _print_types(types_before, server.command("types")["types"], ok, args.top)
        if args.tracemalloc and ok:
            _print_diff(server.command(f"diff {args.top}", timeout=600), ok)
    finally:
        server.stop()
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(("close",))
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    return 0


def _print_diff(diff: dict[str, Any], n: int) -> None:
    if not diff.get("ok"):
        print(f"  tracemalloc: {diff.get('error')}")
        return
    print(
        f"\n  tracemalloc: Python allocations grew {_kib(diff['total_diff'])} = "
        f"{diff['total_diff'] / n:,.0f} bytes per connection; top sites (bytes/conn, "
        f"objects/conn):"
    )
    for row in diff["lineno"]:
        where = row["where"][0].strip() if row["where"] else "?"
        print(f"    {row['size'] / n:8,.0f} B {row['count'] / n:6.1f}  {where}")
    print("  by file:")
    for row in diff.get("filename", [])[:10]:
        where = row["where"][0].replace(str(Path(__file__).resolve().parent.parent) + "/", "")
        print(f"    {row['size'] / n:8,.0f} B {row['count'] / n:6.1f}  {where}")
    print("  largest by call stack:")
    for row in diff["traceback"][:6]:
        print(f"    {row['size'] / n:8,.0f} B {row['count'] / n:6.1f}")
        for line in row["where"]:
            print(f"        {line.rstrip()}")


def _print_types(
    before: dict[str, list[int]], after: dict[str, list[int]], n: int, top: int
) -> None:
    grew = {
        name: (count - before.get(name, [0, 0])[0], size - before.get(name, [0, 0])[1])
        for name, (count, size) in after.items()
    }
    rows = sorted(grew.items(), key=lambda kv: -kv[1][1])[:top]
    total = sum(size for _, size in grew.values())
    print(
        f"\n  tracked objects grew {total / n:,.0f} bytes per connection (shallow sizes; "
        f"strings, bytes and numbers are not tracked); by type (bytes/conn, objects/conn):"
    )
    for name, (count, size) in rows:
        print(f"    {size / n:8,.0f} B {count / n:6.2f}  {name}")


def _exit_on_sigterm(*_: object) -> None:
    # Once: `timeout` signals the process and then its group, and a second
    # SystemExit would cut the clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


if __name__ == "__main__":
    raise SystemExit(main())
