"""Room fan-out through the real chat path: deliveries/s, latency, CPU.

Prints figures; it is not a test and asserts nothing about speed.

For each subscriber count N (``--subscribers 100,1000``) and each hub
(``--hubs``), a fresh server process (``bench/_server.py``: the real
:class:`server.app.Node`, SQLite in a temp dir) gets:

* N subscribers -- WebSockets that received ``system:welcome`` and joined one
  public room, spread over ``--users`` users (default 100: at N=1000 that is
  10 connections per user; fan-out cost is per connection, and with one user
  per connection every ``room:join`` returns the whole member list, which
  makes set-up O(N^2)) and over the client processes (below);
* a publisher process (``--publishers`` connections, default 4, same room)
  sending ``message:send`` frames over its WebSockets. Each message takes the
  whole chat path: envelope, rate limit, schema, SQLite commit in the DB
  worker thread, then ``hub.publish`` of ``message:new`` to the room, the
  ack, and the notification service's follow-up. The publisher puts
  ``time.time()`` in ``metadata.bt``.

Why several publishing connections: the server handles one connection's
frames in order, one at a time (tornado delivers the next message when
``on_message`` is done; clients rely on that order), so a single sender's
rate is 1 / (its message's whole round through the chat path, database
included), whatever the hub does. A room with 1,000 members has many
senders; with four, database commits and broadcasts overlap, and broadcasts
that finish in the same loop iteration share a socket write (below).
``--publishers 1`` measures the single-sender case.

Hubs compared in the same run:

* ``builtonce`` -- the project's hub as the node runs it: one ``orjson``
  encode and one frame per broadcast, the same bytes for every recipient,
  and write coalescing: each recipient's frames of one event-loop iteration
  go out in one ``send()`` (``frames per write`` says how many on average);
* ``direct`` (only when asked for in ``--hubs``) -- the same hub with
  coalescing off: one ``send()`` per recipient per broadcast;
* ``write_message`` -- baseline, :class:`bench._server.WriteMessageHub`:
  ``conn.write_message(json.dumps(payload))`` per recipient (JSON and
  framing per recipient, tornado's normal path with its Future + Task);
* ``unpersisted`` (only when asked for in ``--hubs``) -- the non-persisted
  baseline: the built-once hub on a node whose message store is
  :class:`bench._server.MemoryStore` (seqs in memory, no SQL, no
  notification follow-up), for issue 11's row "in rooms of 100 members with
  4 senders, deliveries/s through the persisted chat path at least those of
  a non-persisted room broadcast":
  ``--subscribers 100 --hubs unpersisted,builtonce``.

Each run has two phases on the same connections:

1. ``max`` -- M messages as fast as the server takes them (each publisher
   keeps ``--window`` sends in flight): deliveries/s = message:new frames
   received by all subscribers / (last receive - first send). Latency here
   includes the queueing that saturation causes.
2. ``steady`` -- M/4 messages at a fixed rate (``--steady-fraction`` of the
   first hub's max msgs/s for that N, the same rate for every hub so their
   latencies compare): p50/p99 publish -> receive latency at a load the
   server sustains.

Latency is measured by receivers from the embedded send time (one machine,
one clock). Server CPU is psutil's cpu_times delta of the server process over
the phase's wall time, in % of one core; "loop" is the event-loop thread
alone (the rest is mostly the DB thread). Per delivery, the CPU the loop
thread spent in the hub's writes (``Hub._write`` + ``Hub.flush``: the
broadcast loop, measured with ``time.thread_time`` around each call by the
``bench._server`` hubs) and the loop thread's CPU overall are printed too:
unlike deliveries/s they do not depend on how much CPU the shared machine
left to the server. Each phase also prints the whole machine's busy CPU and
the share of processes that are not this benchmark's.

The clients are not the bottleneck -- how that was checked:

* they are lean (``bench/_wsclient.py``): raw asyncio Protocol, handshake by
  hand, frame headers parsed, no JSON decode of ``message:new`` (one
  ``bytes.find`` + ``float`` for the latency sample);
* the bulk subscriber processes poll every ``--lazy-ms`` (20 ms) during a
  phase, so one wake-up drains many sockets and a read often carries several
  frames; a separate eager "probe" process holds ``--probes`` (20) of the N
  subscribers and is the latency source, so polling adds nothing to latency;
* every phase prints each client process's CPU%: at N=1000 the bulk ones run
  at ~25-45% of a core each and the probe at ~5%, none near saturation;
* deliveries/s does not move with the number of client processes
  (``--procs 1``, ``2``, ``4`` gave 36.8k, 35.0k, 33.7k/s in one sitting);
* all-eager clients (``--lazy-ms 0``) used 52+53% against 9+38+39% and got
  46.6k against 58.4k deliveries/s in one pair: on 2 cores, CPU the clients
  burn is CPU the server does not get, which is why the bulk ones poll.

The machine has 2 cores: the server (one loop thread + the DB thread, one
GIL) can use one, the clients most of the other, and other tenants take what
they take -- hence the CPU-per-delivery figures.

Usage::

    .venv/bin/python -m bench.fanout                       # N=100,1000, both hubs
    .venv/bin/python -m bench.fanout --subscribers 1000 --messages 500 --procs 3
    .venv/bin/python -m bench.fanout --hubs builtonce --profile /tmp/fanout.txt
    .venv/bin/python -m bench.fanout --subscribers 100 --hubs unpersisted,builtonce --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench._server import ServerProc, bench_config
from bench._wsclient import (
    LazySelector,
    LeanWS,
    Pipe,
    Tally,
    cpu_secs,
    open_many,
    raise_nofile,
    run_lazy,
)
from server.core.auth import mint_token

HUBS = ("write_message", "builtonce")  # the default run
#: Also accepted by --hubs: the project's hub with write coalescing off, and the
#: non-persisted baseline (the chat path with the message store in memory).
EXTRA_HUBS = ("direct", "unpersisted")
TARGET_DELIVERIES = 100_000  # per second, at 1,000 subscribers, built-once hub
TARGET_RATIO = 2.5  # built-once / write_message
CONTENT = "fan-out benchmark: a chat message of ordinary length, sixty-odd chars"
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------
# Client processes
# ---------------------------------------------------------------------------


def _subscriber_proc(
    conn: Any, port: int, tokens: list[str], room: str, sources: list[str], lazy_ms: float
) -> None:
    raise_nofile()
    run_lazy(lambda sel: _subscriber_main(conn, port, tokens, room, sources, lazy_ms, sel))


async def _subscriber_main(
    conn: Any,
    port: int,
    tokens: list[str],
    room: str,
    sources: list[str],
    lazy_ms: float,
    selector: LazySelector,
) -> None:
    pipe = Pipe(conn)
    tally = Tally()
    started = time.monotonic()
    conns, errors = await open_many(
        HOST, port, "/ws/chat", tokens, tally, sources=sources, join_room=room
    )
    pipe.send(("ready", len(conns), errors[:3], time.monotonic() - started))
    while True:
        msg = await pipe.get()
        if msg[0] == "run":
            per_conn, timeout = msg[1], msg[2]
            tally.reset()
            cpu0 = cpu_secs()
            selector.interval = lazy_ms / 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.expect(per_conn * len(conns)), timeout)
            selector.interval = 0.0
            pipe.send(
                (
                    "done",
                    {
                        "count": tally.count,
                        "first_rx": tally.first_rx,
                        "last_rx": tally.last_rx,
                        "latencies": tally.latencies.tobytes(),
                        "cpu": cpu_secs() - cpu0,
                        "closed": sum(1 for c in conns if c.closed.done()),
                    },
                )
            )
        else:  # close / exit
            break
    for ws in conns:
        ws.abort()


def _publisher_proc(conn: Any, port: int, tokens: list[str], sources: list[str]) -> None:
    raise_nofile()
    asyncio.run(_publisher_main(conn, port, tokens, sources))


async def _publisher_main(conn: Any, port: int, tokens: list[str], sources: list[str]) -> None:
    pipe = Pipe(conn)
    pubs, errors = await open_many(HOST, port, "/ws/chat", tokens, Tally(), sources=sources)
    if errors:
        pipe.send(("error", errors[:3]))
        return
    created = await pubs[0].request("room:create", {"name": "fan-out bench", "type": "public"})
    room = created["data"]["room"]["id"]
    for ws in pubs:
        await ws.request("room:join", {"roomId": room})
    pipe.send(("ready", room))
    while True:
        msg = await pipe.get()
        if msg[0] == "warmup":
            for i in range(msg[1]):
                await pubs[i % len(pubs)].request(
                    "message:send", {"roomId": room, "content": "warm-up"}
                )
            pipe.send(("warm",))
        elif msg[0] == "go":
            pipe.send(("sent", await _publish(pubs, room, *msg[1:])))
        else:
            break
    for ws in pubs:
        ws.abort()


async def _publish(
    pubs: list[LeanWS], room: str, messages: int, rate: float, window: int
) -> dict[str, Any]:
    """Send ``messages`` over the publishers; ``rate`` msgs/s (0: as fast as acked)."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    t_first = time.time()
    cpu0 = cpu_secs()

    async def one_publisher(k: int, ws: LeanWS) -> None:
        sem = asyncio.Semaphore(window)
        futs = []
        mine = range(k, messages, len(pubs))
        start = loop.time()
        for n, i in enumerate(mine):
            if rate:
                delay = start + (n * len(pubs) + k) / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await sem.acquire()
            data = {"roomId": room, "content": CONTENT, "metadata": {"bt": time.time()}}
            fut = ws.request_future("message:send", data)
            if not rate:
                fut.add_done_callback(lambda _f: sem.release())
            futs.append(fut)
            del i
        for result in await asyncio.gather(*futs, return_exceptions=True):
            if isinstance(result, BaseException):
                errors.append(f"{type(result).__name__}: {result}")
            elif not result.get("ok"):
                errors.append(str(result.get("error")))

    t_last_send = 0.0
    await asyncio.gather(*(one_publisher(k, ws) for k, ws in enumerate(pubs)))
    t_last_send = time.time()
    return {
        "t_first": t_first,
        "t_last_ack": t_last_send,
        "errors": errors[:3],
        "failed": len(errors),
        "cpu": cpu_secs() - cpu0,
    }


# ---------------------------------------------------------------------------
# Parent: orchestration and figures
# ---------------------------------------------------------------------------


@dataclass
class Phase:
    hub: str
    n: int
    phase: str
    messages: int
    rate: float  # offered msgs/s (0 = max)
    deliveries: int = 0
    expected: int = 0
    secs: float = 0.0
    msgs_per_s: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    server_cpu: float = 0.0
    loop_cpu: float = 0.0
    client_cpu: list[float] = field(default_factory=list)  # [probe process,] bulk processes
    probes: int = 0
    box_cpu: float = 0.0  # whole machine, % of one core (2 cores = 200%)
    others_cpu: float = 0.0  # the part not used by this benchmark's processes
    publisher_cpu: float = 0.0
    failed: int = 0
    closed: int = 0
    server_deliveries: int = 0
    hub_cpu_us: float = math.nan  # loop-thread CPU in Hub._write + flush, per delivery
    hub_wall_us: float = math.nan  # wall time in Hub._write + flush, per delivery
    loop_cpu_us: float = math.nan  # all loop-thread CPU, per delivery
    per_write: float = math.nan  # frames per socket write (coalescing hub; else 1)

    @property
    def per_s(self) -> float:
        return self.deliveries / self.secs if self.secs else 0.0

    def line(self) -> str:
        clients = _clients(self)
        offered = "max" if not self.rate else f"{self.rate:.0f}/s"
        warn = ""
        if self.deliveries < self.expected:
            warn += f"  [!] only {self.deliveries}/{self.expected} received"
        if self.failed or self.closed:
            warn += f"  [!] {self.failed} sends failed, {self.closed} subscribers closed"
        return (
            f"  {self.hub:<13} N={self.n:<5} {self.phase:<6} offered {offered:>7}: "
            f"{self.deliveries:>8,} deliveries in {self.secs:6.2f}s = {self.per_s:>9,.0f}/s "
            f"({self.msgs_per_s:,.0f} msg/s)  latency p50 {self.p50_ms:7.1f} ms "
            f"p99 {self.p99_ms:7.1f} ms  server CPU {self.server_cpu:3.0f}% "
            f"(loop {self.loop_cpu:3.0f}%)  clients {clients} pub {self.publisher_cpu:.0f}%"
            f"\n{'':<31}frames per write {self.per_write:.2f}; "
            f"per delivery: hub writes {self.hub_cpu_us:.1f} us CPU "
            f"({self.hub_wall_us:.1f} us wall) = {1e6 / self.hub_cpu_us:,.0f}/s per core; "
            f"loop thread {self.loop_cpu_us:.1f} us = {1e6 / self.loop_cpu_us:,.0f}/s per core; "
            f"machine {self.box_cpu:.0f}% of {100 * (os.cpu_count() or 1)}%, "
            f"other processes {self.others_cpu:.0f}%"
            f"{warn}"
        )


def _clients(ph: Phase) -> str:
    cpu = ph.client_cpu
    bulk = "+".join(f"{c:.0f}" for c in cpu[1 if ph.probes else 0 :]) + "%"
    return f"probe {cpu[0]:.0f}% bulk {bulk}" if ph.probes else bulk


class Snap:
    """CPU counters of the server (whole process and loop thread) and clients."""

    def __init__(self, server: psutil.Process, clients: list[psutil.Process]) -> None:
        self.wall = time.monotonic()
        times = server.cpu_times()
        self.server = times.user + times.system
        self.loop = next(
            (t.user_time + t.system_time for t in server.threads() if t.id == server.pid), 0.0
        )
        self.clients = []
        for proc in clients:
            try:
                c = proc.cpu_times()
                self.clients.append(c.user + c.system)
            except psutil.Error:
                self.clients.append(0.0)
        box = psutil.cpu_times()
        self.box_busy = sum(box) - box.idle - getattr(box, "iowait", 0.0)


def _recv(conn: Any, timeout: float, what: str) -> tuple[Any, ...]:
    if not conn.poll(timeout):
        raise TimeoutError(f"no {what} within {timeout:.0f}s")
    msg: tuple[Any, ...] = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"client process failed: {msg[1]}")
    return msg


def _percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of seconds, in milliseconds; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def start_clients(
    procs: list[Any],
    pipes: list[Any],
    *,
    pub_port: int,
    sub_port: int,
    pub_tokens: list[str],
    tokens: list[str],
    sources: list[str],
    probes: int,
    args: argparse.Namespace,
) -> tuple[int, float]:
    """Start the publisher, then the probe and bulk subscriber processes.

    Each process and its pipe is appended to ``procs``/``pipes`` as it starts
    (the publisher first), so :func:`stop_clients` can end them whatever
    happens. The probe process holds the first ``probes`` tokens and reads
    eagerly (the latency source); the ``args.procs`` bulk ones read lazily
    (cheap). Returns (subscribers connected, set-up seconds).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    pub = ctx.Process(
        target=_publisher_proc, args=(child, pub_port, pub_tokens, sources), daemon=True
    )
    pub.start()
    procs.append(pub)
    pipes.append(parent)
    room = _recv(parent, 60, "publisher ready")[1]
    t_setup = time.monotonic()
    chunks = [(tokens[:probes], 0.0)] if probes else []
    chunks += [(tokens[probes + i :: args.procs], args.lazy_ms) for i in range(args.procs)]
    for chunk, lazy_ms in chunks:
        if not chunk:
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_subscriber_proc,
            args=(child, sub_port, chunk, room, sources, lazy_ms),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
        pipes.append(parent)
    ready = 0
    for p in pipes[1:]:
        msg = _recv(p, args.timeout, "subscribers ready")
        ready += msg[1]
        if msg[2]:
            print(f"    subscriber errors: {msg[2]}", file=sys.stderr)
    if ready < len(tokens):
        print(f"    [!] only {ready}/{len(tokens)} subscribers connected", file=sys.stderr)
    return ready, time.monotonic() - t_setup


def collect_phase(
    ph: Any, pipes: list[Any], messages: int, probes: int, timeout: float
) -> tuple[dict[str, Any], list[dict[str, Any]], array[float]]:
    """After ``go``: the publisher's and subscribers' results of one phase.

    Fills ``ph`` (either benchmark's Phase) with deliveries, secs, msgs/s,
    p50/p99 and failed sends; returns (publisher result, subscriber results,
    latencies) for the figures only the caller keeps.
    """
    sent = _recv(pipes[0], timeout + 30, "publisher result")[1]
    done = [_recv(p, timeout + 30, "subscriber result")[1] for p in pipes[1:]]
    lat = array("d")
    for d in done[:1] if probes else done:
        lat.frombytes(d["latencies"])
    last_rx = max((d["last_rx"] for d in done), default=0.0)
    ph.deliveries = sum(d["count"] for d in done)
    ph.secs = max(1e-9, last_rx - sent["t_first"])
    ph.msgs_per_s = messages / max(1e-9, sent["t_last_ack"] - sent["t_first"])
    ph.p50_ms, ph.p99_ms = _percentile(lat, 0.50), _percentile(lat, 0.99)
    ph.failed = sent["failed"]
    if sent["errors"]:
        print(f"    send errors: {sent['errors']}", file=sys.stderr)
    return sent, done, lat


def stop_clients(procs: list[Any], pipes: list[Any], join_secs: float = 5.0) -> None:
    """Tell every client process to close, then end it (terminate if it lingers)."""
    for p in pipes:
        with contextlib.suppress(OSError):
            p.send(("close",))
    for proc in procs:
        proc.join(join_secs)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


def run_one(hub: str, n: int, args: argparse.Namespace, steady_rate: float | None) -> list[Phase]:
    """One server, N subscribers: the max phase, then (optionally) the steady phase."""
    config = bench_config()
    tag = f"{hub[:2]}{n}"
    users = [mint_token(config, f"sub-{tag}-{u}", ttl_secs=3600) for u in range(args.users_for(n))]
    tokens = [users[i % len(users)] for i in range(n)]
    pub_tokens = [
        mint_token(config, f"pub-{tag}-{k}", ttl_secs=3600) for k in range(args.publishers)
    ]
    sources = [f"127.0.0.{i + 1}" for i in range(args.source_ips)]
    server = ServerProc(hub)
    procs: list[Any] = []
    pipes: list[Any] = []
    phases: list[Phase] = []
    try:
        server.start()
        sproc = psutil.Process(server.pid)
        # Without lazy bulk readers every subscriber is eager: no probe process.
        probes = min(args.probes, n) if args.lazy_ms > 0 else 0
        ready, setup = start_clients(
            procs, pipes, pub_port=server.port, sub_port=server.port, pub_tokens=pub_tokens,
            tokens=tokens, sources=sources, probes=probes, args=args,
        )  # fmt: skip
        pub_pipe, sub_pipes = pipes[0], pipes[1:]
        pub_pipe.send(("warmup", args.warmup))
        _recv(pub_pipe, args.timeout, "warm-up")
        time.sleep(0.3)  # let the warm-up fan-out drain
        clients = [psutil.Process(p.pid) for p in procs]
        plan = [("max", args.messages_for(n), 0.0)]
        if args.steady_fraction > 0:
            plan.append(("steady", max(1, args.messages_for(n) // 4), steady_rate or 0.0))
        for name, messages, rate in plan:
            if name == "steady" and not rate:
                rate = args.steady_fraction * phases[0].msgs_per_s
            ph = Phase(hub, n, name, messages, rate, expected=messages * ready, probes=probes)
            for p in sub_pipes:
                p.send(("run", messages, args.timeout))
            spy = None
            if args.profile and name == "max":
                p = Path(args.profile)
                spy = server.profile(str(p.with_name(f"{p.stem}-{hub}-{n}{p.suffix}")))
            w0 = server.command("stats")["writes"]
            before = Snap(sproc, clients)
            pub_pipe.send(("go", messages, rate, args.window))
            _, done, lat = collect_phase(ph, pipes, messages, probes, args.timeout)
            after = Snap(sproc, clients)
            w1 = server.command("stats")["writes"]
            if spy is not None:
                print(f"    profile: {spy.stop()}", flush=True)
            wall = after.wall - before.wall
            ph.max_ms = _percentile(lat, 1.0)
            ph.server_cpu = 100 * (after.server - before.server) / wall
            ph.loop_cpu = 100 * (after.loop - before.loop) / wall
            cpu = [100 * (a - b) / wall for a, b in zip(after.clients, before.clients, strict=True)]
            ph.publisher_cpu, ph.client_cpu = cpu[0], cpu[1:]
            ph.box_cpu = 100 * (after.box_busy - before.box_busy) / wall
            ph.others_cpu = ph.box_cpu - ph.server_cpu - sum(cpu)
            ph.server_deliveries = w1["deliveries"] - w0["deliveries"]
            if ph.server_deliveries:
                ph.hub_cpu_us = 1e6 * (w1["cpu"] - w0["cpu"]) / ph.server_deliveries
                ph.hub_wall_us = 1e6 * (w1["wall"] - w0["wall"]) / ph.server_deliveries
                ph.loop_cpu_us = 1e6 * (after.loop - before.loop) / ph.server_deliveries
                writes = w1["flush_writes"] - w0["flush_writes"]
                ph.per_write = ph.server_deliveries / writes if writes else 1.0
            ph.closed = sum(d["closed"] for d in done)
            phases.append(ph)
            print(ph.line() + (f"  (setup {setup:.1f}s)" if name == "max" else ""), flush=True)
    finally:
        server.stop()
        stop_clients(procs, pipes)
    return phases


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Room fan-out through the real chat path (prints figures, asserts nothing).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Targets: >= {TARGET_DELIVERIES:,} deliveries/s at 1,000 subscribers "
        f"(built-once hub), >= {TARGET_RATIO}x the write_message baseline.",
    )
    parser.add_argument(
        "--subscribers",
        default="100,1000",
        help="comma-separated subscriber counts (default 100,1000)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=0,
        help="messages per max phase (default: 150,000 deliveries' worth, clamped to 100..3000)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=100,
        help="distinct subscriber users; connections are spread over them "
        "(default 100: N=1000 is 10 connections per user; 0 = one user per "
        "connection, slow set-up: every join returns the member list)",
    )
    parser.add_argument("--procs", type=int, default=2, help="subscriber processes (default 2)")
    parser.add_argument(
        "--probes",
        type=int,
        default=20,
        help="subscribers in the eager probe process, the latency source (default 20)",
    )
    parser.add_argument(
        "--lazy-ms",
        type=float,
        default=20.0,
        help="bulk subscriber processes poll every this many ms during a "
        "phase, so one wake-up reads many frames (default 20; 0 = all eager, "
        "all measure latency, no probe process)",
    )
    parser.add_argument(
        "--publishers",
        type=int,
        default=4,
        help="publishing connections, one process (default 4; see the module docstring)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=8,
        help="sends in flight per publisher in the max phase (default 8)",
    )
    parser.add_argument(
        "--steady-fraction",
        type=float,
        default=0.5,
        help="steady phase rate as a fraction of the first hub's max msgs/s "
        "(default 0.5; 0 skips the phase)",
    )
    parser.add_argument(
        "--hubs",
        default=",".join(HUBS),
        help=f"comma-separated, run in this order (default {','.join(HUBS)})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per (N, hub); the summary takes the median (default 1)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="warm-up messages (default 20)")
    parser.add_argument(
        "--source-ips", type=int, default=1, help="spread connections over 127.0.0.1..N (default 1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds any phase may take before giving up (default 120)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy the server during each max phase into FILE-<hub>-<N>.<ext> "
        "(.svg flame graph, .json speedscope, else raw stacks); py-spy "
        "competes for the 2 cores, so figures from such runs are lower",
    )
    args = parser.parse_args(argv)
    args.ns = [int(x) for x in args.subscribers.split(",") if x.strip()]
    args.hub_list = [h.strip() for h in args.hubs.split(",") if h.strip()]
    for hub in args.hub_list:
        if hub not in HUBS + EXTRA_HUBS:
            parser.error(f"unknown hub {hub!r} (one of {', '.join(HUBS + EXTRA_HUBS)})")
    args.users_for = lambda n: min(n, args.users) if args.users > 0 else n
    fixed = args.messages
    args.messages_for = lambda n: fixed or max(100, min(3000, math.ceil(150_000 / n)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the clean-up still runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    nofile = raise_nofile()
    print(
        f"fan-out benchmark: {os.cpu_count()} cores, load average "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}, RLIMIT_NOFILE {nofile}, "
        f"{args.procs} subscriber process(es), {args.publishers} publisher(s)",
        flush=True,
    )
    results: dict[tuple[str, int, str], list[Phase]] = {}
    for n in args.ns:
        steady_rate: float | None = None
        for _ in range(args.repeat):
            for hub in args.hub_list:
                phases = run_one(hub, n, args, steady_rate)
                for ph in phases:
                    results.setdefault((hub, n, ph.phase), []).append(ph)
                    if ph.phase == "steady" and steady_rate is None:
                        steady_rate = ph.rate
    _summary(results, args)
    return 0


def _median(phases: list[Phase], attr: str) -> float:
    return float(statistics.median(getattr(p, attr) for p in phases))


def _ratio(top: list[Phase], bottom: list[Phase], attr: str) -> float:
    return _median(top, attr) / max(1e-9, _median(bottom, attr))


def _summary(results: dict[tuple[str, int, str], list[Phase]], args: argparse.Namespace) -> None:
    print("\nsummary (median of runs; max phase unless noted; us = CPU microseconds per delivery)")
    print(
        f"  {'N':>5}  {'hub':<13} {'deliveries/s':>12} {'msg/s':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'steady p50/p99 ms':>20} {'server':>6} {'loop':>5} "
        f"{'write us':>9} {'loop us':>7}  clients"
    )
    for n in args.ns:
        for hub in args.hub_list:
            runs = results.get((hub, n, "max"))
            if not runs:
                continue
            steady = results.get((hub, n, "steady"))
            sp = "-"
            if steady:
                sp = (
                    f"{_median(steady, 'p50_ms'):.1f}/{_median(steady, 'p99_ms'):.1f}"
                    f" @{steady[0].rate:.0f}/s"
                )
            print(
                f"  {n:>5}  {hub:<13} {_median(runs, 'per_s'):>12,.0f} "
                f"{_median(runs, 'msgs_per_s'):>6,.0f} {_median(runs, 'p50_ms'):>7.1f} "
                f"{_median(runs, 'p99_ms'):>7.1f} {sp:>20} "
                f"{_median(runs, 'server_cpu'):>5.0f}% {_median(runs, 'loop_cpu'):>4.0f}% "
                f"{_median(runs, 'hub_cpu_us'):>9.1f} {_median(runs, 'loop_cpu_us'):>7.1f}  "
                f"{_clients(runs[0])}"
            )
        built, base = results.get(("builtonce", n, "max")), results.get(("write_message", n, "max"))
        if built and base:
            ratio = _ratio(built, base, "per_s")
            print(
                f"  {n:>5}  ratio built-once / write_message: deliveries/s {ratio:.2f}x "
                f"(target >= {TARGET_RATIO}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'}); "
                f"CPU per delivery in hub writes {_ratio(base, built, 'hub_cpu_us'):.2f}x, "
                f"in the loop thread {_ratio(base, built, 'loop_cpu_us'):.2f}x"
            )
        unpersisted = results.get(("unpersisted", n, "max"))
        if built and unpersisted:
            ratio = _ratio(built, unpersisted, "per_s")
            print(
                f"  {n:>5}  ratio persisted (builtonce) / non-persisted (unpersisted): "
                f"deliveries/s {ratio:.2f}x (issue 11: >= 1x: {'met' if ratio >= 1 else 'NOT met'})"
                f"; msg/s {_ratio(built, unpersisted, 'msgs_per_s'):.2f}x"
            )
        direct = results.get(("direct", n, "max"))
        if built and direct:
            print(
                f"  {n:>5}  ratio coalescing (builtonce) / direct: deliveries/s "
                f"{_ratio(built, direct, 'per_s'):.2f}x, CPU per delivery in hub writes "
                f"{_ratio(direct, built, 'hub_cpu_us'):.2f}x at "
                f"{_median(built, 'per_write'):.2f} frames per write"
            )
        if built and n == 1000:
            rate = _median(built, "per_s")
            per_core = 1e6 / max(1e-9, _median(built, "hub_cpu_us"))
            print(
                f"  {n:>5}  built-once deliveries/s {rate:,.0f} (target >= "
                f"{TARGET_DELIVERIES:,}/s: {'met' if rate >= TARGET_DELIVERIES else 'NOT met'}); "
                f"broadcast path alone (hub writes CPU): {per_core:,.0f}/s per core"
            )


def _exit_on_sigterm(*_: object) -> None:
    # Once: `timeout` signals the process and then its group, and a second
    # SystemExit would cut the clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


if __name__ == "__main__":
    raise SystemExit(main())
