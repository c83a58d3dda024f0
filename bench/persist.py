"""Persisted chat messages through the public protocol: acked messages/s, latency, CPU.

Prints figures; it is not a test and asserts nothing about speed.

For each database (``--db sqlite``, ``postgres`` or both) and each variant
(``--variants``), a fresh node process (``bench/_server.py``: the real
:class:`server.app.Node`; SQLite in a temp dir, or a fresh database on a
throwaway PostgreSQL cluster started as the tests start one,
``tests/support/services.py``'s :class:`PostgresServer`) is driven through
``/ws/chat`` only:

* ``send`` phase -- S senders (``--senders``, 40) over R public rooms
  (``--rooms``, 10; sender i writes to room i mod R), each also a member of
  its room, plus ``--members`` receive-only members per room. Each sender
  keeps ``--window`` (8) ``message:send`` in flight for ``--secs`` (10)
  seconds, or, with ``--rate``, the senders together offer that many
  messages/s on a fixed schedule whatever the acks do (open loop: a slow
  node shows up as latency, not as a lower offered rate). A sender stamps
  ``time.monotonic()`` in ``metadata.bt``; every other member of the room
  (the node does not send a sender's own ``message:new`` back to its
  connection) computes send→deliver from it (one machine, one
  CLOCK_MONOTONIC). Send→ack is timed by the sender.
* ``connect`` phase -- C new authenticated connections (``--connections``,
  2,000; distinct users, each with a fresh JWT minted with the node's
  secret) opened as fast as the node admits them, ``--in-flight`` (200)
  handshakes at a time over the client processes: connections/s admitted
  (``system:welcome`` received) and connect→welcome p50/p99.

Variants, interleaved over ``--repeat`` rounds (medians and min-max spread
when more than one):

* ``batched`` -- the node's default write pipeline (group commit);
* ``unbatched`` -- ``SWITCHBOARD_WRITE_BATCH_MAX=1``: one transaction per
  message, the code before group commit.

Printed per run: sends acked/s; send→ack and send→deliver p50/p99;
deliveries/s (``message:new`` frames received by all members); errors by
code (ack errors, lost connections, sends never acked: 0 at normal
settings); the node's event-loop lag p50/p99/max (a
:class:`~server.ops.health.LoopMonitor` sampling every 10 ms on the node's loop,
``bench._server.LagSampler``); the node's CPU (psutil on its pid: % of one
core, its loop thread, CPU ms per acked message); the node's background
tasks alive (p99/max; mostly the notification follow-up of each message);
a notification queue depth if the node's ``/metrics`` exposes a gauge whose
name says queue/backlog/pending (``n/a`` otherwise); and the client
processes' CPU, to show they are not the limit. Then a summary with the
ratios batched / unbatched.

Node settings: ``bench._server.bench_env`` (env ``test``, every rate-limit
class 100000/1m, per-IP, per-user and per-IP TCP connection limits raised,
log level WARNING). Loopback only. Every loop is bounded (``--secs``, then
``--drain`` seconds for acks and deliveries) and every process started is
stopped at the end, on errors and on Ctrl-C/SIGTERM too.

Usage::

    .venv/bin/python -m bench.persist                        # SQLite, both variants
    .venv/bin/python -m bench.persist --db postgres
    .venv/bin/python -m bench.persist --rate 2000 --phases send --repeat 3
    .venv/bin/python -m bench.persist --window 1 --variants batched
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench._server import LAG_ENV, ServerProc, bench_config
from bench._wsclient import LeanWS, Pipe, Tally, open_many, raise_nofile
from bench.cluster import _metrics
from bench.fanout import Snap, _exit_on_sigterm, _percentile, _recv, stop_clients
from server.core.auth import mint_token
from server.core.config import Config

HOST = "127.0.0.1"
CONTENT = "persist benchmark: a chat message of ordinary length, sixty-odd chars"
#: Variant -> the node's extra settings (batched: the node's default).
VARIANTS: dict[str, dict[str, str]] = {
    "batched": {},
    "unbatched": {"SWITCHBOARD_WRITE_BATCH_MAX": "1"},
}
DATABASES = ("sqlite", "postgres")
#: Phases through the protocol, in the order a run takes them (connect last: it
#: adds 2,000 users). ``read`` follows ``send``: it marks read the seqs sent.
OP_PHASES = ("send", "react", "edit", "read")
PHASES = (*OP_PHASES, "connect", "checks")
LAG_SAMPLE_MS = 10
METRICS_SCRAPE_SECS = 1.0
#: A /metrics gauge whose family name matches this is reported as a queue depth.
QUEUE_SERIES = re.compile(r"queue|backlog|pending")
# Issue 11's targets, printed beside the figures (not asserted).
TARGET_ACKED = {"sqlite": 10_000, "postgres": 5_000}  # messages/s, 40 senders, 10 rooms, window 8
TARGET_ACK_P99_MS = 25.0  # at a steady TARGET_ACK_RATE messages/s offered
TARGET_ACK_RATE = 2_000.0
TARGET_CONNECTS = 1_500  # connections/s admitted
#: The checks phase: send batches of these sizes, each timed for CHECK_SECS (5 batches at least).
CHECK_BATCHES = (1, 16, 64, 256)
CHECK_SECS = 2.0


# ---------------------------------------------------------------------------
# Client processes
# ---------------------------------------------------------------------------


@dataclass
class SendTally:
    """One client process's sends: acks by room, send→ack latencies, errors by code."""

    acked: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    sent: int = 0
    last_ack: float = 0.0

    def on_ack(
        self, room: str, sent_at: float, window: asyncio.Semaphore | None, fut: asyncio.Future[Any]
    ) -> None:
        if window is not None:
            window.release()
        now = time.monotonic()
        if fut.cancelled():
            self.errors["NO_ACK"] += 1
        elif (exc := fut.exception()) is not None:
            self.errors[f"{type(exc).__name__}"] += 1
        elif (frame := fut.result()).get("ok"):
            self.acked[room] += 1
            self.latencies.append(now - sent_at)
            self.last_ack = max(self.last_ack, now)
        else:
            self.errors[str((frame.get("error") or {}).get("code"))] += 1


def _op_maker(kind: str, room: str, own: str, target: str) -> Any:
    """``(n, sent_at) -> (event, data)``: a sender's n-th request of phase ``kind``.

    ``own`` is the sender's warm-up message, ``target`` the warm-up message of
    the first sender of its room in its process: every sender of a room
    reacts to that one (reactions come in bursts on one message), toggling
    its own emoji; each edits its own message; each marks the room read one
    seq further per request (a write while the send phase left seqs to read).
    """
    if kind == "react":
        return lambda n, _: ("message:react", {
            "messageId": target, "emoji": "👍", "action": "remove" if n % 2 else "add"})
    if kind == "edit":
        return lambda n, _: ("message:edit", {"messageId": own, "content": f"{CONTENT} {n}"})
    if kind == "read":
        return lambda n, _: ("room:read", {"roomId": room, "seq": n + 1})
    return lambda n, sent_at: ("message:send", {
        "roomId": room, "content": CONTENT, "metadata": {"bt": sent_at}})


async def _sender(
    ws: LeanWS,
    room: str,
    make: Any,
    tally: SendTally,
    futs: list[asyncio.Future[Any]],
    *,
    start: float,
    end: float,
    window: int,
    interval: float,
    offset: float,
) -> None:
    """Request ``make(n, sent_at)`` until ``end``: ``window`` in flight, or one every
    ``interval`` s (open loop)."""
    free = asyncio.Semaphore(window) if not interval else None
    n = 0
    while not ws.closed.done():
        if free is None:
            due = start + offset + n * interval
            if due >= end:
                break
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
        else:
            await free.acquire()
            if time.monotonic() >= end:
                break
        sent_at = time.monotonic()
        fut = ws.request_future(*make(n, sent_at))
        fut.add_done_callback(partial(tally.on_ack, room, sent_at, free))
        futs.append(fut)
        tally.sent += 1
        n += 1
    if ws.closed.done():
        tally.errors["CONNECTION_CLOSED"] += 1


def _client_proc(
    conn: Any, port: int, senders: list[tuple[str, str]], members: list[tuple[str, str]]
) -> None:
    raise_nofile()
    asyncio.run(_client_main(conn, port, senders, members))


async def _client_main(
    conn: Any, port: int, senders: list[tuple[str, str]], members: list[tuple[str, str]]
) -> None:
    """Open and join this process's senders and members, then obey the parent."""
    pipe = Pipe(conn)
    tally = Tally(clock=time.monotonic)
    sending: list[tuple[LeanWS, str]] = []  # (connection, room)
    joined: list[tuple[LeanWS, str]] = []
    errors: list[str] = []
    for role, pairs in (("send", senders), ("member", members)):
        by_room: dict[str, list[str]] = {}
        for token, room in pairs:
            by_room.setdefault(room, []).append(token)
        for room, tokens in by_room.items():
            conns, errs = await open_many(
                HOST, port, "/ws/chat", tokens, tally, sources=[HOST], join_room=room
            )
            errors += errs
            joined += [(ws, room) for ws in conns]
            if role == "send":
                sending += [(ws, room) for ws in conns]
    pipe.send(("ready", len(joined), errors[:3]))
    admitted: list[LeanWS] = []
    own = 0  # messages this process's senders had acked: the node does not echo them back
    warm: list[str] = []  # each sender's warm-up message id (the react/edit phases' targets)
    while True:
        msg = await pipe.get()
        if msg[0] == "warmup":  # not stamped: the tallies do not count these
            results = await asyncio.gather(
                *(
                    ws.request("message:send", {"roomId": room, "content": "warm-up"})
                    for ws, room in sending
                ),
                return_exceptions=True,
            )
            warm = [r["data"]["message"]["id"] if isinstance(r, dict) else "" for r in results]
            pipe.send(("warm", [repr(r) for r in results if isinstance(r, BaseException)][:3]))
        elif msg[0] == "go":
            kind, rest = msg[1], msg[2:]
            first: dict[str, str] = {}
            for (_, room), own_id in zip(sending, warm, strict=True):
                first.setdefault(room, own_id)
            makers = [_op_maker(kind, room, own_id, first[room])
                      for (_, room), own_id in zip(sending, warm, strict=True)]  # fmt: skip
            result = await _send_phase(sending, makers, tally, *rest)
            if kind == "send":
                own = sum(result["acked"].values())
            pipe.send(("sent", result))
        elif msg[0] == "drain":
            acked_by_room, timeout = msg[1], msg[2]
            expected = sum(acked_by_room.get(room, 0) for _, room in joined) - own
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.expect(expected), timeout)
            pipe.send(
                (
                    "delivered",
                    {
                        "count": tally.count,
                        "expected": expected,
                        "last_rx": tally.last_rx,
                        "latencies": tally.latencies.tobytes(),
                        "closed": sum(1 for ws, _ in joined if ws.closed.done()),
                    },
                )
            )
        elif msg[0] == "connect":
            tokens, concurrency, start = msg[1], msg[2], msg[3]
            if (wait := start - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            timings = array("d")
            conns, errs = await open_many(
                HOST, port, "/ws/chat", tokens, Tally(), sources=[HOST],
                concurrency=concurrency, timings=timings,
            )  # fmt: skip
            done = time.monotonic()
            admitted += conns
            pipe.send(
                (
                    "admitted",
                    {"ok": len(conns), "errors": Counter(errs), "done": done,
                     "latencies": timings.tobytes()},
                )
            )  # fmt: skip
        else:  # close / exit
            break
    for ws, _ in joined:
        ws.abort()
    for ws in admitted:
        ws.abort()


async def _send_phase(
    sending: list[tuple[LeanWS, str]],
    makers: list[Any],
    tally: Tally,
    start: float,
    secs: float,
    window: int,
    interval: float,
    offsets: list[float],
    drain: float,
) -> dict[str, Any]:
    """Run every sender of this process from ``start`` for ``secs``; wait for the acks.

    ``interval`` (0: window mode) is each sender's time between sends at the
    fixed rate; ``offsets`` stagger the senders' first sends.
    """
    sends = SendTally()
    futs: list[asyncio.Future[Any]] = []
    if (wait := start - time.monotonic()) > 0:
        await asyncio.sleep(wait)
    tally.reset()
    end = start + secs
    await asyncio.gather(
        *(
            _sender(ws, room, make, sends, futs, start=start, end=end, window=window,
                    interval=interval, offset=offset)
            for (ws, room), make, offset in zip(sending, makers, offsets, strict=False)
        )
    )  # fmt: skip
    pending = [f for f in futs if not f.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=max(0.1, end + drain - time.monotonic()))
        for fut in late:
            fut.cancel()  # counted as NO_ACK by its callback
    await asyncio.sleep(0)  # let the cancelled futures' callbacks run
    return {
        "sent": sends.sent,
        "acked": dict(sends.acked),
        "errors": sends.errors,
        "last_ack": sends.last_ack,
        "latencies": sends.latencies.tobytes(),
    }


async def _create_rooms(port: int, tokens: list[str]) -> list[str]:
    """One public room per token, created by that user (a sender of the room)."""
    rooms = []
    for i, token in enumerate(tokens):
        ws = await LeanWS.connect(HOST, port, "/ws/chat", token, Tally())
        try:
            await asyncio.wait_for(ws.welcome, 30)
            ack = await ws.request("room:create", {"name": f"persist-{i}", "type": "public"})
            rooms.append(ack["data"]["room"]["id"])
        finally:
            ws.abort()
    return rooms


# ---------------------------------------------------------------------------
# Parent: one run, figures
# ---------------------------------------------------------------------------


@dataclass
class Acks:
    """The acks of one phase over every client process."""

    by_room: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    secs: float = 0.0  # go -> last ack

    @classmethod
    def of(cls, sent: list[dict[str, Any]], start: float) -> Acks:
        acks = cls()
        for s in sent:
            acks.by_room.update(s["acked"])
            acks.errors.update(s["errors"])
            acks.sent += s["sent"]
            acks.latencies.frombytes(s["latencies"])
        last_ack = max((s["last_ack"] for s in sent), default=0.0)
        acks.secs = max(1e-9, last_ack - start)
        return acks


@dataclass
class OpFigures:
    """A react, edit or read phase: requests acked/s, latency, the node's CPU and loop lag."""

    sent: int = 0
    acked: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    per_s: float = 0.0
    p50: float = math.nan
    p99: float = math.nan
    cpu_ms: float = math.nan  # node CPU per acked request
    lag_p99: float = math.nan

    def line(self, kind: str) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.most_common()) or "none"
        return (
            f"    {kind}: {self.acked:,}/{self.sent:,} acked = {self.per_s:,.0f}/s; ack p50 "
            f"{self.p50:.1f} ms p99 {self.p99:.1f} ms; node CPU {self.cpu_ms:.2f} ms per "
            f"request; loop lag p99 {self.lag_p99:.1f} ms; errors: {errors}"
        )


@dataclass
class Run:
    db: str
    variant: str
    round: int
    sent: int = 0
    acked: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    secs: float = 0.0  # go -> last ack
    acked_per_s: float = 0.0
    ack_p50: float = math.nan
    ack_p99: float = math.nan
    deliveries: int = 0
    expected: int = 0
    delivered_per_s: float = 0.0
    deliver_p50: float = math.nan
    deliver_p99: float = math.nan
    closed: int = 0
    persisted: float = 0.0  # the node's switchboard_messages_persisted_total delta
    mean_batch: float = math.nan  # sends per group-commit transaction (the node's histogram)
    server_cpu: float = 0.0  # % of one core, go -> last ack
    loop_cpu: float = 0.0
    cpu_ms_per_msg: float = math.nan
    client_cpu: list[float] = field(default_factory=list)
    box_cpu: float = 0.0
    others_cpu: float = 0.0
    lag_p50: float = math.nan
    lag_p99: float = math.nan
    lag_max: float = math.nan
    tasks_p99: float = math.nan
    tasks_max: float = math.nan
    queues: dict[str, float] | None = None  # queue-like gauge -> max seen; None: no such metric
    admitted: int = 0
    conn_errors: Counter[str] = field(default_factory=Counter)
    conn_per_s: float = math.nan
    conn_p50: float = math.nan
    conn_p99: float = math.nan
    conn_cpu_ms: float = math.nan  # server CPU per admitted connection
    ops: dict[str, OpFigures] = field(default_factory=dict)  # react/edit/read phases

    def lines(self, args: argparse.Namespace) -> list[str]:
        out = [f"  {self.db} {self.variant} (round {self.round + 1}):"]
        if "send" in args.phase_list:
            offered = f"{args.rate:,.0f}/s offered" if args.rate else f"window {args.window}"
            errors = ", ".join(f"{k} {v}" for k, v in self.errors.most_common()) or "none"
            warn = ""
            if self.deliveries < self.expected:
                warn += f"  [!] only {self.deliveries:,}/{self.expected:,} delivered"
            if self.closed:
                warn += f"  [!] {self.closed} connections closed"
            queues = (
                ", ".join(f"{k} max {v:,.0f}" for k, v in self.queues.items())
                if self.queues
                else "n/a (no queue gauge in /metrics)"
            )
            out += [
                f"    send ({offered}): {self.acked:,}/{self.sent:,} acked in {self.secs:.2f}s = "
                f"{self.acked_per_s:,.0f} msg/s (node persisted {self.persisted:,.0f}, "
                f"{self.mean_batch:.1f} per transaction); "
                f"send->ack p50 {self.ack_p50:.1f} ms p99 {self.ack_p99:.1f} ms",
                f"      {self.deliveries:,} deliveries = {self.delivered_per_s:,.0f}/s; "
                f"send->deliver p50 {self.deliver_p50:.1f} ms p99 {self.deliver_p99:.1f} ms; "
                f"errors: {errors}{warn}",
                f"      node: CPU {self.server_cpu:.0f}% (loop {self.loop_cpu:.0f}%) = "
                f"{self.cpu_ms_per_msg:.2f} ms per acked message; loop lag p50 "
                f"{self.lag_p50:.1f} p99 {self.lag_p99:.1f} max {self.lag_max:.1f} ms; "
                f"background tasks p99 {self.tasks_p99:.0f} max {self.tasks_max:.0f}; "
                f"notification queue {queues}",
                f"      clients {'+'.join(f'{c:.0f}' for c in self.client_cpu)}%; machine "
                f"{self.box_cpu:.0f}% of {100 * (os.cpu_count() or 1)}%, other processes "
                f"{self.others_cpu:.0f}%",
            ]
        out += [self.ops[kind].line(kind) for kind in OP_PHASES if kind in self.ops]
        if "connect" in args.phase_list:
            errors = ", ".join(f"{k} {v}" for k, v in self.conn_errors.most_common()) or "none"
            out.append(
                f"    connect: {self.admitted:,}/{args.connections:,} admitted = "
                f"{self.conn_per_s:,.0f}/s; connect->welcome p50 {self.conn_p50:.1f} ms "
                f"p99 {self.conn_p99:.1f} ms; node CPU {self.conn_cpu_ms:.2f} ms per "
                f"connection; errors: {errors}"
            )
        return out


class Scraper:
    """Reads the node's ``/metrics`` every ``METRICS_SCRAPE_SECS`` in a thread.

    Keeps the largest value seen of every gauge series whose family name
    matches :data:`QUEUE_SERIES` (none today: then :attr:`queues` is None).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.queues: dict[str, float] | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-scraper")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(METRICS_SCRAPE_SECS):
            try:
                metrics = _metrics(self.port)
            except OSError:
                self.failures += 1
                continue
            for series, value in metrics.items():
                name = series.split("{", 1)[0]
                if QUEUE_SERIES.search(name) and not name.endswith(("_total", "_bucket")):
                    queues = self.queues if self.queues is not None else {}
                    queues[series] = max(value, queues.get(series, value))
                    self.queues = queues

    def stop(self) -> dict[str, float] | None:
        self._stop.set()
        self._thread.join(5)
        return self.queues


def _node_env(db: str, variant: str, pg: Any, tag: str) -> dict[str, str]:
    env = {LAG_ENV: str(LAG_SAMPLE_MS), **VARIANTS[variant]}
    if db == "postgres":
        env["SWITCHBOARD_DATABASE_URL"] = pg.create_database(tag)
    return env


def run_one(db: str, variant: str, rnd: int, args: argparse.Namespace, pg: Any) -> Run:
    """A fresh node and database: the send phase, then the connect phase."""
    config = bench_config()
    tag = f"persist_{variant}_{rnd}_{os.getpid()}"
    run = Run(db, variant, rnd)
    sending = any(kind in args.phase_list for kind in OP_PHASES)
    n_senders = args.senders if sending else 0
    sender_tokens = [mint_token(config, f"s{i}-{tag}", ttl_secs=3600) for i in range(n_senders)]
    n_members = args.members * args.rooms if sending else 0
    member_tokens = [mint_token(config, f"m{j}-{tag}", ttl_secs=3600) for j in range(n_members)]
    server = ServerProc(env=_node_env(db, variant, pg, tag))
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        server.start()
        rooms = (
            asyncio.run(_create_rooms(server.port, sender_tokens[: args.rooms])) if sending else []
        )
        # Sender i writes to room i mod R; consecutive blocks of R senders (and
        # of R members) alternate between processes, so each room's members
        # are spread over them.
        senders = [(t, rooms[i % args.rooms]) for i, t in enumerate(sender_tokens)]
        members = [(t, rooms[j % args.rooms]) for j, t in enumerate(member_tokens)]
        ctx = mp.get_context("spawn")
        mine: list[list[int]] = [[] for _ in range(args.procs)]
        for i in range(n_senders):
            mine[(i // args.rooms) % args.procs].append(i)
        for p in range(args.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_client_proc,
                args=(
                    child, server.port, [senders[i] for i in mine[p]],
                    [m for j, m in enumerate(members) if (j // args.rooms) % args.procs == p],
                ),
                daemon=True,
            )  # fmt: skip
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        ready = [_recv(pipe, args.drain + 60, "clients ready") for pipe in pipes]
        joined = sum(r[1] for r in ready)
        if joined < n_senders + n_members:
            errors = [e for r in ready for e in r[2]]
            raise RuntimeError(f"only {joined}/{n_senders + n_members} joined: {errors}")
        sproc = psutil.Process(server.pid)
        clients = [psutil.Process(p.pid) for p in procs]
        if sending:
            _warm_up(pipes, args)
        for kind in OP_PHASES:
            if kind == "send" and kind in args.phase_list:
                _send_run(run, server, sproc, clients, pipes, mine, args)
            elif kind in args.phase_list:
                _op_run(run, kind, server, sproc, clients, pipes, mine, args)
        if "connect" in args.phase_list:
            _connect_run(run, config, tag, sproc, clients, pipes, args)
    finally:
        stop_clients(procs, pipes)
        server.stop()
        if db == "postgres":
            try:
                pg.drop_database(tag)
            except Exception as exc:  # the cluster goes at the end anyway: say so, go on
                print(f"    [!] could not drop database {tag}: {exc}", file=sys.stderr)
    return run


def _warm_up(pipes: list[Any], args: argparse.Namespace) -> None:
    """One unstamped send per sender: its message is what the react and edit phases touch."""
    for pipe in pipes:
        pipe.send(("warmup",))
    for pipe in pipes:
        warm = _recv(pipe, args.drain + 30, "warm-up")
        if warm[1]:
            raise RuntimeError(f"warm-up sends failed: {warm[1]}")
    time.sleep(0.3)  # warm-up deliveries and their notification work settle


def _drive(
    kind: str,
    server: ServerProc,
    sproc: psutil.Process,
    clients: list[psutil.Process],
    pipes: list[Any],
    mine: list[list[int]],
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], Snap, Snap, dict[str, Any], float]:
    """Every sender runs phase ``kind`` at once: (their results, CPU before/after, lag, start)."""
    # Fixed rate: sender i's first request is i/rate after the start, then every S/rate.
    interval = args.senders / args.rate if args.rate else 0.0
    offsets = [[i / args.rate if args.rate else 0.0 for i in ids] for ids in mine]
    server.command("lag")  # drop the samples taken before
    start = time.monotonic() + 0.2  # every process starts at the same moment
    for pipe, offs in zip(pipes, offsets, strict=True):
        pipe.send(("go", kind, start, args.secs, args.window, interval, offs, args.drain))
    time.sleep(max(0.0, start - time.monotonic()))
    before = Snap(sproc, clients)
    sent = [_recv(pipe, args.secs + args.drain + 30, f"{kind} results")[1] for pipe in pipes]
    after = Snap(sproc, clients)
    return sent, before, after, server.command("lag"), start


def _op_run(
    run: Run,
    kind: str,
    server: ServerProc,
    sproc: psutil.Process,
    clients: list[psutil.Process],
    pipes: list[Any],
    mine: list[list[int]],
    args: argparse.Namespace,
) -> None:
    """A react, edit or read phase: the senders' requests as fast as acked (or ``--rate``)."""
    sent, before, after, lag, start = _drive(kind, server, sproc, clients, pipes, mine, args)
    acks = Acks.of(sent, start)
    figures = OpFigures(sent=acks.sent, acked=sum(acks.by_room.values()), errors=acks.errors)
    figures.per_s = figures.acked / acks.secs
    figures.p50 = _percentile(acks.latencies, 0.50)
    figures.p99 = _percentile(acks.latencies, 0.99)
    if figures.acked:
        figures.cpu_ms = 1000 * (after.server - before.server) / figures.acked
    figures.lag_p99 = _percentile(array("d", lag.get("lag", [])), 0.99)
    run.ops[kind] = figures


def _send_run(
    run: Run,
    server: ServerProc,
    sproc: psutil.Process,
    clients: list[psutil.Process],
    pipes: list[Any],
    mine: list[list[int]],
    args: argparse.Namespace,
) -> None:
    before_metrics = _metrics(server.port)
    scraper = Scraper(server.port)
    sent, before, after, lag, start = _drive("send", server, sproc, clients, pipes, mine, args)
    run.queues = scraper.stop()
    acks = Acks.of(sent, start)
    run.errors, run.sent, run.secs = acks.errors, acks.sent, acks.secs
    run.acked = sum(acks.by_room.values())
    run.acked_per_s = run.acked / run.secs if run.acked else 0.0
    run.ack_p50 = _percentile(acks.latencies, 0.50)
    run.ack_p99 = _percentile(acks.latencies, 0.99)
    for pipe in pipes:
        pipe.send(("drain", dict(acks.by_room), args.drain))
    delivered = [_recv(pipe, args.drain + 30, "deliveries")[1] for pipe in pipes]
    deliver_lat = array("d")
    for d in delivered:
        deliver_lat.frombytes(d["latencies"])
    run.deliveries = sum(d["count"] for d in delivered)
    run.expected = sum(d["expected"] for d in delivered)
    run.closed = sum(d["closed"] for d in delivered)
    last_rx = max((d["last_rx"] for d in delivered), default=0.0)
    run.delivered_per_s = run.deliveries / max(1e-9, last_rx - start)
    run.deliver_p50 = _percentile(deliver_lat, 0.50)
    run.deliver_p99 = _percentile(deliver_lat, 0.99)
    after_metrics = _metrics(server.port)

    def grew(series: str) -> float:
        return after_metrics.get(series, 0.0) - before_metrics.get(series, 0.0)

    run.persisted = grew("switchboard_messages_persisted_total")
    batches = grew("switchboard_write_batch_size_count")
    run.mean_batch = grew("switchboard_write_batch_size_sum") / batches if batches else math.nan
    wall = after.wall - before.wall
    run.server_cpu = 100 * (after.server - before.server) / wall
    run.loop_cpu = 100 * (after.loop - before.loop) / wall
    if run.acked:
        run.cpu_ms_per_msg = 1000 * (after.server - before.server) / run.acked
    run.client_cpu = [
        100 * (a - b) / wall for a, b in zip(after.clients, before.clients, strict=True)
    ]
    run.box_cpu = 100 * (after.box_busy - before.box_busy) / wall
    run.others_cpu = run.box_cpu - run.server_cpu - sum(run.client_cpu)
    lags = array("d", lag.get("lag", []))
    run.lag_p50, run.lag_p99 = _percentile(lags, 0.50), _percentile(lags, 0.99)
    run.lag_max = _percentile(lags, 1.0)
    tasks = array("d", lag.get("tasks", []))  # counts: undo _percentile's seconds -> ms
    run.tasks_p99, run.tasks_max = _percentile(tasks, 0.99) / 1000, _percentile(tasks, 1.0) / 1000


def _connect_run(
    run: Run,
    config: Any,
    tag: str,
    sproc: psutil.Process,
    clients: list[psutil.Process],
    pipes: list[Any],
    args: argparse.Namespace,
) -> None:
    tokens = [mint_token(config, f"c{k}-{tag}", ttl_secs=3600) for k in range(args.connections)]
    per_proc = max(1, args.in_flight // len(pipes))
    start = time.monotonic() + 0.2
    for p, pipe in enumerate(pipes):
        pipe.send(("connect", tokens[p :: len(pipes)], per_proc, start))
    time.sleep(max(0.0, start - time.monotonic()))
    before = Snap(sproc, clients)
    admitted = [_recv(pipe, args.drain + 120, "connect results")[1] for pipe in pipes]
    after = Snap(sproc, clients)
    lat = array("d")
    for a in admitted:
        lat.frombytes(a["latencies"])
        run.admitted += a["ok"]
        run.conn_errors.update(a["errors"])
    done = max(a["done"] for a in admitted)
    run.conn_per_s = run.admitted / max(1e-9, done - start)
    run.conn_p50, run.conn_p99 = _percentile(lat, 0.50), _percentile(lat, 0.99)
    if run.admitted:
        run.conn_cpu_ms = 1000 * (after.server - before.server) / run.admitted


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

#: Summary columns: (heading, Run attribute, format).
COLUMNS = (
    ("acked msg/s", "acked_per_s", "{:,.0f}"),
    ("ack p50 ms", "ack_p50", "{:.1f}"),
    ("ack p99 ms", "ack_p99", "{:.1f}"),
    ("deliver p50", "deliver_p50", "{:.1f}"),
    ("deliver p99", "deliver_p99", "{:.1f}"),
    ("deliveries/s", "delivered_per_s", "{:,.0f}"),
    ("lag p99 ms", "lag_p99", "{:.1f}"),
    ("CPU ms/msg", "cpu_ms_per_msg", "{:.2f}"),
    ("conn/s", "conn_per_s", "{:,.0f}"),
    ("conn p99 ms", "conn_p99", "{:.1f}"),
)
SEND_ATTRS = {c[1] for c in COLUMNS[:8]}
CONNECT_ATTRS = {c[1] for c in COLUMNS[8:]}


def _median(runs: list[Run], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def _cell(runs: list[Run], attr: str, fmt: str) -> str:
    text = fmt.format(_median(runs, attr))
    if len(runs) > 1:
        values = [getattr(r, attr) for r in runs]
        text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text


def _summary(results: dict[tuple[str, str], list[Run]], args: argparse.Namespace) -> None:
    shown = [
        c for c in COLUMNS
        if (c[1] in SEND_ATTRS and "send" in args.phase_list)
        or (c[1] in CONNECT_ATTRS and "connect" in args.phase_list)
    ]  # fmt: skip
    spread = " (min-max)" if args.repeat > 1 else ""
    print(f"\nsummary (median of {args.repeat} round(s){spread})")
    for db in args.db_list:
        for variant in args.variant_list:
            runs = results.get((db, variant))
            if not runs:
                continue
            errors = sum(sum(r.errors.values()) + sum(r.conn_errors.values()) for r in runs)
            cells = "  ".join(f"{h} {_cell(runs, a, f)}" for h, a, f in shown)
            print(f"  {db:<8} {variant:<9} {cells}  errors {errors}")
        top, bottom = results.get((db, "batched")), results.get((db, "unbatched"))
        if top and bottom:
            ratios = "  ".join(
                f"{h} {_median(top, a) / _median(bottom, a):.2f}x"
                for h, a, _ in shown
                if _median(bottom, a)
            )
            print(f"  {db:<8} ratio batched / unbatched: {ratios}")
        for kind in OP_PHASES[1:]:
            if kind in args.phase_list:
                for line in _op_summary(db, kind, results, args):
                    print(f"  {db:<8} {line}")
        runs = top or next((results[k] for k in results if k[0] == db), None)
        for line in _verdicts(db, runs or [], args):
            print(f"  {db:<8} {runs[0].variant if runs else ''} {line}")


def _op_summary(
    db: str, kind: str, results: dict[tuple[str, str], list[Run]], args: argparse.Namespace
) -> list[str]:
    """Medians of a react/edit/read phase per variant, and the batched / unbatched ratios."""
    out, medians = [], {}
    for variant in args.variant_list:
        figures = [r.ops[kind] for r in results.get((db, variant), []) if kind in r.ops]
        if not figures:
            continue
        m = {a: statistics.median(getattr(f, a) for f in figures)
             for a in ("per_s", "p50", "p99", "cpu_ms", "lag_p99")}  # fmt: skip
        medians[variant] = m
        errors = sum(sum(f.errors.values()) for f in figures)
        out.append(
            f"{variant:<9} {kind}: {m['per_s']:,.0f}/s  ack p50 {m['p50']:.1f} ms  p99 "
            f"{m['p99']:.1f} ms  CPU {m['cpu_ms']:.2f} ms/request  lag p99 {m['lag_p99']:.1f} ms"
            f"  errors {errors}"
        )
    top, bottom = medians.get("batched"), medians.get("unbatched")
    if top and bottom and bottom["per_s"] and bottom["cpu_ms"]:
        out.append(
            f"{kind} ratio batched / unbatched: {top['per_s'] / bottom['per_s']:.2f}x "
            f"requests/s, {top['cpu_ms'] / bottom['cpu_ms']:.2f}x CPU per request"
        )
    return out


def _verdicts(db: str, runs: list[Run], args: argparse.Namespace) -> list[str]:
    """Issue 11's targets against the medians, for the load shapes they are stated for."""
    if not runs:
        return []
    out = []
    standard = (args.senders, args.rooms, args.window, args.members) == (40, 10, 8, 0)
    if "send" in args.phase_list and not args.rate and standard:
        rate, target = _median(runs, "acked_per_s"), TARGET_ACKED[db]
        out.append(
            f"acked {rate:,.0f} msg/s (target >= {target:,}/s at 40 senders, 10 rooms, "
            f"window 8: {'met' if rate >= target else 'NOT met'})"
        )
    if "send" in args.phase_list and args.rate == TARGET_ACK_RATE:
        p99 = _median(runs, "ack_p99")
        out.append(
            f"send->ack p99 {p99:.1f} ms at {args.rate:,.0f}/s offered (target <= "
            f"{TARGET_ACK_P99_MS:g} ms: {'met' if p99 <= TARGET_ACK_P99_MS else 'NOT met'})"
        )
    if "connect" in args.phase_list:
        rate = _median(runs, "conn_per_s")
        out.append(
            f"admitted {rate:,.0f} connections/s (target >= {TARGET_CONNECTS:,}/s: "
            f"{'met' if rate >= TARGET_CONNECTS else 'NOT met'})"
        )
    return out


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Persisted chat messages and connection admission through the public "
        "protocol, group commit on and off (prints figures, asserts nothing).",
    )
    parser.add_argument("--db", default="sqlite", help="sqlite, postgres or both, comma-separated")
    parser.add_argument(
        "--variants",
        default="batched,unbatched",
        help="comma-separated, run in this order each round "
        "(batched: the node's default; unbatched: SWITCHBOARD_WRITE_BATCH_MAX=1)",
    )
    parser.add_argument(
        "--phases", "--phase", default="send,connect", help="send, connect or both (default both)"
    )
    parser.add_argument("--senders", type=int, default=40, help="sending connections (40)")
    parser.add_argument("--rooms", type=int, default=10, help="public rooms (10)")
    parser.add_argument("--window", type=int, default=8, help="sends in flight per sender (8)")
    parser.add_argument("--secs", type=float, default=10.0, help="seconds of sending (10)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered messages/s over all senders, open loop (default 0: "
        "as fast as acked, --window in flight)",
    )
    parser.add_argument(
        "--members",
        type=int,
        default=0,
        help="receive-only members per room besides the senders (0)",
    )
    parser.add_argument("--procs", type=int, default=2, help="client processes (2)")
    parser.add_argument(
        "--connections",
        type=int,
        default=2000,
        help="connections opened by the connect phase (2000)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=200,
        help="handshakes in flight in the connect phase, over all processes (200)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all variants (1)")
    parser.add_argument(
        "--drain",
        type=float,
        default=30.0,
        help="seconds acks and deliveries may take after sending stops (30)",
    )
    args = parser.parse_args(argv)
    args.db_list = [x.strip() for x in args.db.split(",") if x.strip()]
    args.variant_list = [x.strip() for x in args.variants.split(",") if x.strip()]
    args.phase_list = [x.strip() for x in args.phases.split(",") if x.strip()]
    for name, given, known in (
        ("--db", args.db_list, DATABASES),
        ("--variants", args.variant_list, tuple(VARIANTS)),
        ("--phases", args.phase_list, PHASES),
    ):
        for x in given:
            if x not in known:
                parser.error(f"{name}: unknown {x!r} (one of {', '.join(known)})")
    if args.senders < args.rooms or args.rooms < 1:
        parser.error("--senders must be at least --rooms (every room has a sender)")
    if min(args.procs, args.window, args.repeat) < 1 or args.secs <= 0:
        parser.error("--procs, --window, --repeat and --secs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the clean-up still runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    nofile = raise_nofile()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    load_shape = f"{args.rate:,.0f} msg/s offered" if args.rate else f"window {args.window}"
    print(
        f"persist benchmark: {os.cpu_count()} cores, load average {load}, RLIMIT_NOFILE "
        f"{nofile}; {args.senders} senders over {args.rooms} rooms (+{args.members} members "
        f"each), {load_shape}, {args.secs:g}s; {args.connections:,} connections, "
        f"{args.in_flight} in flight; {args.procs} client processes",
        flush=True,
    )
    for variant in args.variant_list:
        settings = " ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()) or "defaults"
        print(f"  {variant}: {settings}")
    if "write_batch_max" not in Config.__dataclass_fields__:
        print(
            "  [!] this node's Config has no write_batch_max: SWITCHBOARD_WRITE_BATCH_MAX is "
            "ignored and every variant runs the same code",
            flush=True,
        )
    results: dict[tuple[str, str], list[Run]] = {}
    for db in args.db_list:
        with contextlib.ExitStack() as stack:
            pg = stack.enter_context(_postgres()) if db == "postgres" else None
            if "checks" in args.phase_list:
                print("\n".join(_checks(db, pg, args)), flush=True)
            through_protocol = any(kind in args.phase_list for kind in (*OP_PHASES, "connect"))
            for rnd in range(args.repeat if through_protocol else 0):
                for variant in args.variant_list:
                    run = run_one(db, variant, rnd, args, pg)
                    results.setdefault((db, variant), []).append(run)
                    print("\n".join(run.lines(args)), flush=True)
    _summary(results, args)
    return 0


def _checks(db: str, pg: Any, args: argparse.Namespace) -> list[str]:
    """The share of a send batch's database time its membership and mute checks take.

    Issue 11 item 3 asks for those checks to cost no round trip per message:
    known in memory, or shown as cheap inside the batch. This times, in this
    process on a fresh database (the node's own settings: ``server.store.db``),
    ``models.chat._facts`` (the batch's check queries: live rooms,
    memberships, mutes; the parents query runs only for replies) right
    before ``send_messages`` in the same transaction, and the whole batch
    from there to its commit. Batches are ``--senders`` senders over
    ``--rooms`` rooms, one message each in turn, as the send phase sends.
    ``_facts`` is private: this is a measurement of that one function, and
    an in-memory cache would save at most its time.
    """
    from models import chat as chat_db
    from models import utcnow
    from server.store.db import Database

    tag = f"persist_checks_{os.getpid()}"
    out = [f"  {db} checks (models.chat._facts inside send_messages' transaction):"]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/checks.db" if db == "sqlite" else pg.create_database(tag)
        database = Database(url)
        try:
            asyncio.run(database.start())  # the migrations
            pdb = database.db
            pdb.connect(reuse_if_open=True)
            senders = [f"s{i}" for i in range(args.senders)]
            rooms = [f"room{r}" for r in range(args.rooms)]
            with pdb.atomic():
                for r, room_id in enumerate(rooms):
                    members = [u for i, u in enumerate(senders) if i % args.rooms == r]
                    chat_db.create_room(
                        room_id, members[0], room_id, "public", "", "", None, members
                    )
            for size in CHECK_BATCHES:
                requests = [
                    chat_db.SendRequest(
                        rooms[(i % args.senders) % args.rooms], senders[i % args.senders],
                        senders[i % args.senders], CONTENT, "text", None, [], {}, None,
                    )
                    for i in range(size)
                ]  # fmt: skip
                checks = whole = 0.0
                batches = 0
                deadline = time.perf_counter() + CHECK_SECS
                while batches < 5 or time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    with pdb.atomic():
                        chat_db._facts(requests, list(range(size)), utcnow())
                        t1 = time.perf_counter()
                        chat_db.send_messages(requests)
                    t2 = time.perf_counter()
                    checks, whole, batches = checks + t1 - t0, whole + t2 - t1, batches + 1
                per_msg = 1000 / (batches * size)
                out.append(
                    f"    batch of {size:>3}: {per_msg * whole:.3f} ms per message for the batch "
                    f"to its commit, of which the checks {per_msg * checks:.3f} ms "
                    f"({100 * checks / whole:.0f}%); {batches} batches"
                )
        finally:
            pdb.close()
            asyncio.run(database.close())
            if db == "postgres":
                pg.drop_database(tag)
    return out


@contextlib.contextmanager
def _postgres() -> Any:
    """A throwaway PostgreSQL cluster (as the tests start one), stopped on the way out."""
    from tests.support.services import PostgresServer, find_binary

    if find_binary("initdb") is None:
        raise SystemExit("--db postgres: PostgreSQL is not installed (initdb not found)")
    pg = PostgresServer("switchboard_bench", settings={"max_connections": "200"})
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the finally blocks have stopped everything by now
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
