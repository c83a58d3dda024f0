"""Switchboard against its peers, one client harness for all: see ``bench/README.md``.

Prints figures; asserts nothing. For each repetition, for each workload, for
each server (interleaved, so a noisy minute hits every server alike), a fresh
server process is started, driven by client processes on
``bench/_wsclient.py``'s lean framing (Switchboard's JSON envelope, or
``bench/peers/sio.py``'s Socket.IO v4 adapter), and stopped:

* ``fanout100`` / ``fanout1000`` -- one room of N members, 4 sending
  connections (one process, 8 sends in flight each), the members in two
  polling bulk processes and one eager probe process of 20 (the latency
  source, as in ``bench/fanout.py``): deliveries/s, publish->receive p50/p99;
* ``idle`` -- 5,000 authenticated connections after 100 warm-up ones: server
  RSS delta (after a collection in the server) per connection, KiB;
* ``latency`` -- 20 rooms of 10, every member sending on a fixed schedule,
  200 msg/s in all for 10 s: send->ack and send->deliver p50/p99 (ms). An ack
  is timed from the sender's frame handed to the kernel (after the client
  encoded and masked it) to the client's read that brought the ack (before
  its future's callbacks run, a loop turn later); a delivery from the stamp
  the sender put in the message to the read that brought it;
* ``connect`` -- 2,000 new connections, 200 handshakes in flight: accepted
  (authenticated) connections/s, connect->authenticated p50/p99.

Server and client CPU (psutil, seconds and microseconds per delivery,
message or connection) are printed for every workload. Switchboard persists
every message (SQLite) before its broadcast; the peers persist nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psutil

from bench._server import bench_config
from bench._wsclient import (
    LazySelector,
    LeanWS,
    Pipe,
    Tally,
    cpu_secs,
    open_many,
    process_cpu_secs,
    raise_nofile,
)
from bench._wsclient import run_lazy as _run_lazy
from bench.fanout import _exit_on_sigterm, _percentile
from bench.peers.servers import FAMILIES, Family
from server.core.auth import mint_token

HOST = "127.0.0.1"
CONTENT = "peer benchmark: a chat message of ordinary length, sixty-odd chars."
WORKLOADS = ("fanout100", "fanout1000", "idle", "latency", "connect")
#: Between a median's min and max in the table (the README's tables use it too).
EN_DASH = "\N{EN DASH}"
SERVERS = ("switchboard", "socketio-node", "socketio-py")
#: Also accepted by --servers: the ceiling reference (Node ``ws``, each broadcast framed
#: once), left out of the default run to keep it near 15 minutes on the 2-core box.
EXTRA_SERVERS = ("ws-node", "switchboard-memory")


class Sizes:
    """Workload sizes: the issue's, or tiny ones for a smoke run (``--quick``)."""

    def __init__(self, quick: bool) -> None:
        self.fanout = (
            {"fanout100": 20, "fanout1000": 50} if quick else {"fanout100": 100, "fanout1000": 1000}
        )
        self.deliveries = 1_000 if quick else 150_000  # per fan-out run (messages = this / N)
        self.publishers, self.window, self.probes = 4, 8, 5 if quick else 20
        self.idle, self.idle_warmup = (200, 20) if quick else (5_000, 100)
        self.rooms, self.room_size = (4, 5) if quick else (20, 10)
        self.rate, self.rate_secs = (40.0, 1.0) if quick else (200.0, 10.0)
        self.connects, self.in_flight = (100, 20) if quick else (2_000, 200)


# ---------------------------------------------------------------------------
# Client processes: one main, commands over a pipe
# ---------------------------------------------------------------------------


def _client_proc(conn: Any, family: str, port: int, sources: list[str]) -> None:
    raise_nofile()
    _run_lazy(lambda sel: _client_main(conn, FAMILIES[family], port, sources, sel))


async def _client_main(
    conn: Any, family: Family, port: int, sources: list[str], selector: LazySelector
) -> None:
    pipe = Pipe(conn)
    tally = Tally(clock=time.monotonic)
    held: list[tuple[LeanWS, str | None]] = []
    while True:
        msg = await pipe.get()
        cmd = msg[0]
        if cmd == "open":  # tokens, rooms (one per token, or None), concurrency, start_at
            tokens, rooms, concurrency, start_at = msg[1:]
            if (wait := start_at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            timings = array("d")
            by_room: dict[str | None, list[str]] = {}
            for i, token in enumerate(tokens):
                by_room.setdefault(rooms[i] if rooms else None, []).append(token)
            errors: list[str] = []
            t0 = time.monotonic()
            for room, toks in by_room.items():
                conns, errs = await open_many(
                    HOST,
                    port,
                    family.path,
                    toks,
                    tally,
                    sources=sources,
                    concurrency=concurrency,
                    join_room=room,
                    timings=timings,
                    cls=family.cls,
                )
                held += [(ws, room) for ws in conns]
                errors += errs
            pipe.send(
                (
                    "opened",
                    {
                        "ok": len(tokens) - len(errors),
                        "errors": Counter(errors),
                        "start": t0,
                        "done": time.monotonic(),
                        "latencies": timings.tobytes(),
                    },
                )
            )
        elif cmd == "arm":  # reset the tally; poll lazily (bulk) or not (probe, senders)
            tally.reset()
            selector.interval = msg[1] / 1000
            pipe.send(("armed", cpu_secs()))
        elif cmd == "collect":  # wait for the deliveries this process should see
            expected, timeout = _expected(msg[1], held), msg[2]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.expect(expected), timeout)
            selector.interval = 0.0
            pipe.send(
                (
                    "collected",
                    {
                        "count": tally.count,
                        "expected": expected,
                        "last_rx": tally.last_rx,
                        "cpu": cpu_secs(),
                        "latencies": tally.latencies.tobytes(),
                    },
                )
            )
        elif cmd == "send":  # messages per connection, window, interval, start_at, drain
            pipe.send(("sent", await _send(held, *msg[1:])))
        else:  # close / exit
            break
    for ws, _ in held:
        ws.abort()


def _expected(acked: dict[str, Any], held: list[tuple[LeanWS, str | None]]) -> int:
    """Deliveries this process's connections should get: every acked message of
    their room but their own (no server echoes a sender's message back)."""
    by_room, own = acked["by_room"], acked["by_conn"]
    return int(sum(by_room.get(room, 0) for _, room in held) - sum(own.values()))


async def _send(
    held: list[tuple[LeanWS, str | None]],
    per_conn: int,
    window: int,
    interval: float,
    start_at: float,
    offsets: list[float],
    drain: float,
) -> dict[str, Any]:
    """Each held connection posts ``per_conn`` stamped messages to its room: ``window``
    in flight, or (``interval`` > 0) one every ``interval`` s from its offset (open loop)."""
    acked: Counter[str] = Counter()
    own: Counter[int] = Counter()
    lat = array("d")
    failed: Counter[str] = Counter()
    if (wait := start_at - time.monotonic()) > 0:
        await asyncio.sleep(wait)
    t_first = time.monotonic()
    last_ack = t_first

    async def one(k: int, ws: LeanWS, room: str) -> None:
        nonlocal last_ack
        sem = asyncio.Semaphore(window)
        ws.stamp_acks = True
        futs = []
        for n in range(per_conn):
            if interval:
                if (wait := t_first + offsets[k] + n * interval - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
            else:
                await sem.acquire()
            fut = ws.post(room, CONTENT, time.monotonic())
            # From the frame handed to the kernel to the read that brought its ack:
            # the client's encoding before and its loop's turn after stay out.
            sent_at = ws.wrote_at

            def done(f: asyncio.Future[Any], sent_at: float = sent_at, ws: LeanWS = ws) -> None:
                nonlocal last_ack
                sem.release()
                read_at = ws.ack_read_at.pop(f, None)
                if f.cancelled() or f.exception() is not None:
                    failed["NO_ACK" if f.cancelled() else "closed"] += 1
                elif f.result().get("ok"):
                    now = time.monotonic()
                    lat.append((read_at or now) - sent_at)
                    acked[room] += 1
                    own[k] += 1
                    last_ack = max(last_ack, now)
                else:
                    failed[str(f.result().get("error"))] += 1

            fut.add_done_callback(done)
            futs.append(fut)
        _, late = await asyncio.wait(futs, timeout=drain) if futs else (None, [])
        for f in late:
            f.cancel()

    await asyncio.gather(*(one(k, ws, room or "") for k, (ws, room) in enumerate(held)))
    await asyncio.sleep(0)
    return {
        "t_first": t_first,
        "last_ack": last_ack,
        "by_room": dict(acked),
        "by_conn": dict(own),
        "failed": dict(failed),
        "latencies": lat.tobytes(),
        "cpu": cpu_secs(),
    }


# ---------------------------------------------------------------------------
# Parent: one run of one workload on one server
# ---------------------------------------------------------------------------


class Clients:
    """The client processes of one run, addressed by index."""

    def __init__(self, family: Family, port: int, n: int, sources: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_client_proc, args=(child, family.name, port, sources), daemon=True
            )
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.ps = [psutil.Process(p.pid) for p in self.procs]

    def ask(self, i: int, *msg: Any) -> None:
        self.pipes[i].send(msg)

    def reply(self, i: int, timeout: float = 300.0) -> Any:
        if not self.pipes[i].poll(timeout):
            raise TimeoutError(f"client process {i} silent for {timeout:.0f}s")
        return self.pipes[i].recv()[1]

    def all(self, msgs: list[tuple[Any, ...]], timeout: float = 300.0) -> list[Any]:
        for i, m in enumerate(msgs):
            self.ask(i, *m)
        return [self.reply(i, timeout) for i in range(len(msgs))]

    def cpu(self) -> float:
        total = 0.0
        for p in self.ps:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def close(self) -> None:
        for p in self.pipes:
            with contextlib.suppress(OSError):
                p.send(("close",))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def _tokens(prefix: str, n: int) -> list[str]:
    config = bench_config()
    return [mint_token(config, f"{prefix}-{i}", ttl_secs=7200) for i in range(n)]


def _cpu(unit: str, units: int, server_secs: float, client_secs: float) -> dict[str, float]:
    """Server and client CPU seconds, and microseconds per ``unit`` (delivery, message...)."""
    return {
        "server_cpu_s": server_secs,
        "client_cpu_s": client_secs,
        f"server_us_per_{unit}": 1e6 * server_secs / max(units, 1),
        f"client_us_per_{unit}": 1e6 * client_secs / max(units, 1),
    }


def _open_all(
    cl: Clients,
    chunks: Sequence[tuple[list[str], list[str] | None]],
    conc: int,
    start_at: float = 0.0,
) -> list[dict[str, Any]]:
    got = cl.all([("open", toks, rooms, conc, start_at) for toks, rooms in chunks])
    for g in got:
        if g["errors"]:
            print(f"    [!] connect errors: {dict(g['errors'].most_common(3))}", file=sys.stderr)
    return got


def run_fanout(family: Family, server: Any, n: int, sz: Sizes) -> dict[str, float]:
    users = _tokens("fan", min(n, 100))  # connections share users (fanout.py: O(N^2) joins)
    pubs = _tokens("pub", sz.publishers)
    room = asyncio.run(family.make_rooms(server.port, pubs[0], ["fan-out"]))[0]
    probes = min(sz.probes, n)
    subs = [users[i % len(users)] for i in range(n)]
    chunks = [(pubs, [room] * len(pubs)), (subs[:probes], [room] * probes)]
    chunks += [(subs[probes + i :: 2], [room] * len(subs[probes + i :: 2])) for i in range(2)]
    cl = Clients(family, server.port, len(chunks), [HOST])
    try:
        _open_all(cl, chunks, 64)
        cl.ask(0, "send", 5, sz.window, 0.0, 0.0, [], 30.0)  # warm-up
        warm = {"by_room": cl.reply(0)["by_room"], "by_conn": {}}  # members sent nothing
        for i in range(1, 4):  # let the warm-up drain before the tallies reset
            cl.ask(i, "collect", warm, 30.0)
            cl.reply(i)
        sproc = psutil.Process(server.pid)
        cl.all([("arm", 0.0), ("arm", 0.0), ("arm", 20.0), ("arm", 20.0)])
        s0, c0 = process_cpu_secs(sproc), cl.cpu()
        per_conn = max(1, round(sz.deliveries / n / sz.publishers))
        cl.ask(0, "send", per_conn, sz.window, 0.0, 0.0, [], 60.0)
        sent = cl.reply(0)
        for i in range(1, 4):
            cl.ask(i, "collect", {"by_room": sent["by_room"], "by_conn": {}}, 120.0)
        got = [cl.reply(i) for i in range(1, 4)]
        s1, c1 = process_cpu_secs(sproc), cl.cpu()
    finally:
        cl.close()
    deliveries = sum(g["count"] for g in got)
    expected = sum(g["expected"] for g in got)
    if deliveries < expected:
        print(f"    [!] only {deliveries}/{expected} delivered", file=sys.stderr)
    lat = array("d")
    lat.frombytes(got[0]["latencies"])
    secs = max(g["last_rx"] for g in got) - sent["t_first"]
    return {
        "deliveries_per_s": deliveries / max(secs, 1e-9),
        "p50_ms": _percentile(lat, 0.5),
        "p99_ms": _percentile(lat, 0.99),
        **_cpu("delivery", deliveries, s1 - s0, c1 - c0),
    }


def run_idle(family: Family, server: Any, sz: Sizes) -> dict[str, float]:
    tokens = _tokens("idle", sz.idle_warmup + sz.idle)
    warm, measured = tokens[: sz.idle_warmup], tokens[sz.idle_warmup :]
    sources = [f"127.0.0.{i + 1}" for i in range(4)]
    cl = Clients(family, server.port, 2, sources)
    sproc = psutil.Process(server.pid)
    try:
        _open_all(cl, [(warm[i::2], None) for i in range(2)], 64)
        time.sleep(0.5)
        server.command("gc")
        before = sproc.memory_info().rss
        s0, c0 = process_cpu_secs(sproc), cl.cpu()
        got = _open_all(cl, [(measured[i::2], None) for i in range(2)], 64)
        s1, c1 = process_cpu_secs(sproc), cl.cpu()
        time.sleep(1.0)
        server.command("gc")
        after = sproc.memory_info().rss
    finally:
        cl.close()
    ok = sum(g["ok"] for g in got)
    return {
        "kib_per_conn": (after - before) / max(ok, 1) / 1024,
        **_cpu("conn", ok, s1 - s0, c1 - c0),
    }


def run_latency(family: Family, server: Any, sz: Sizes) -> dict[str, float]:
    n = sz.rooms * sz.room_size
    tokens = _tokens("lat", n)
    names = [f"lat-{r}" for r in range(sz.rooms)]
    rooms = asyncio.run(family.make_rooms(server.port, tokens[0], names))
    member_rooms = [rooms[i % sz.rooms] for i in range(n)]
    chunks = [(tokens[i::2], member_rooms[i::2]) for i in range(2)]
    cl = Clients(family, server.port, 2, [HOST])
    sproc = psutil.Process(server.pid)
    try:
        _open_all(cl, chunks, 64)
        interval = n / sz.rate  # every member sends once per interval: sz.rate msg/s in all
        per_conn = max(1, round(sz.rate_secs / interval))
        cl.all([("arm", 0.0)] * 2)
        s0, c0 = process_cpu_secs(sproc), cl.cpu()
        start = time.monotonic() + 0.3
        offsets = [[(2 * k + i) / sz.rate for k in range(len(chunks[i][0]))] for i in range(2)]
        sent = cl.all([("send", per_conn, 1, interval, start, offsets[i], 30.0) for i in range(2)])
        by_room: Counter[str] = Counter()
        for s in sent:
            by_room.update(s["by_room"])
        got = cl.all(
            [("collect", {"by_room": by_room, "by_conn": s["by_conn"]}, 30.0) for s in sent]
        )
        s1, c1 = process_cpu_secs(sproc), cl.cpu()
    finally:
        cl.close()
    ack, deliver = array("d"), array("d")
    for s, g in zip(sent, got, strict=True):
        ack.frombytes(s["latencies"])
        deliver.frombytes(g["latencies"])
        if s["failed"]:
            print(f"    [!] failed sends: {s['failed']}", file=sys.stderr)
    messages = len(ack)
    return {
        "ack_p50_ms": _percentile(ack, 0.5),
        "ack_p99_ms": _percentile(ack, 0.99),
        "deliver_p50_ms": _percentile(deliver, 0.5),
        "deliver_p99_ms": _percentile(deliver, 0.99),
        **_cpu("message", messages, s1 - s0, c1 - c0),
    }


def run_connect(family: Family, server: Any, sz: Sizes) -> dict[str, float]:
    tokens = _tokens("conn", sz.connects)
    cl = Clients(family, server.port, 2, [HOST])
    sproc = psutil.Process(server.pid)
    try:
        cl.all([("arm", 0.0)] * 2)  # the processes are up and idle before the clock starts
        s0, c0 = process_cpu_secs(sproc), cl.cpu()
        start = time.monotonic() + 0.2
        got = _open_all(cl, [(tokens[i::2], None) for i in range(2)], sz.in_flight // 2, start)
        s1, c1 = process_cpu_secs(sproc), cl.cpu()
    finally:
        cl.close()
    ok = sum(g["ok"] for g in got)
    lat = array("d")
    for g in got:
        lat.frombytes(g["latencies"])
    secs = max(g["done"] for g in got) - min(g["start"] for g in got)
    return {
        "conn_per_s": ok / max(secs, 1e-9),
        "p50_ms": _percentile(lat, 0.5),
        "p99_ms": _percentile(lat, 0.99),
        **_cpu("conn", ok, s1 - s0, c1 - c0),
    }


def run_one(workload: str, family: Family, sz: Sizes) -> dict[str, float]:
    server = family.start()
    try:
        if workload in sz.fanout:
            return run_fanout(family, server, sz.fanout[workload], sz)
        return {"idle": run_idle, "latency": run_latency, "connect": run_connect}[workload](
            family, server, sz
        )
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

#: (workload, metric, row label, format) in table order.
ROWS = [
    ("fanout1000", "deliveries_per_s", "room of {n1000}, 4 senders: deliveries/s", ",.0f"),
    ("fanout1000", "p50_ms", "room of {n1000}: publish→receive p50 ms", ",.1f"),
    ("fanout1000", "p99_ms", "room of {n1000}: publish→receive p99 ms", ",.1f"),
    ("fanout1000", "server_us_per_delivery", "room of {n1000}: server CPU µs / delivery", ",.1f"),
    ("fanout1000", "client_us_per_delivery", "room of {n1000}: client CPU µs / delivery", ",.1f"),
    ("fanout100", "deliveries_per_s", "room of {n100}, 4 senders: deliveries/s", ",.0f"),
    ("fanout100", "p50_ms", "room of {n100}: publish→receive p50 ms", ",.1f"),
    ("fanout100", "p99_ms", "room of {n100}: publish→receive p99 ms", ",.1f"),
    ("fanout100", "server_us_per_delivery", "room of {n100}: server CPU µs / delivery", ",.1f"),
    ("fanout100", "client_us_per_delivery", "room of {n100}: client CPU µs / delivery", ",.1f"),
    ("idle", "kib_per_conn", "idle authenticated connection ({idle}): KiB", ",.1f"),
    ("latency", "ack_p50_ms", "{rate} msg/s, {rooms} rooms of {size}: send→ack p50 ms", ".2f"),
    ("latency", "ack_p99_ms", "same: send→ack p99 ms", ",.1f"),
    ("latency", "deliver_p50_ms", "same: send→deliver p50 ms", ".2f"),
    ("latency", "deliver_p99_ms", "same: send→deliver p99 ms", ",.1f"),
    ("latency", "server_us_per_message", "same: server CPU µs / message", ",.0f"),
    ("latency", "client_us_per_message", "same: client CPU µs / message", ",.0f"),
    (
        "connect",
        "conn_per_s",
        "connections accepted per second ({connects}, {inflight} in flight)",
        ",.0f",
    ),
    ("connect", "p50_ms", "connect→authenticated p50 ms", ",.1f"),
    ("connect", "p99_ms", "connect→authenticated p99 ms", ",.1f"),
    ("connect", "server_us_per_conn", "server CPU µs / accepted connection", ",.0f"),
    ("connect", "client_us_per_conn", "client CPU µs / accepted connection", ",.0f"),
]


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return EN_DASH
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), fmt)}{EN_DASH}{format(max(values), fmt)})"


def table(
    results: dict[str, dict[str, list[dict[str, float]]]], servers: list[str], sz: Sizes
) -> str:
    names = {
        "n1000": f"{sz.fanout['fanout1000']:,}",
        "n100": f"{sz.fanout['fanout100']:,}",
        "idle": f"{sz.idle:,}",
        "rate": f"{sz.rate:,.0f}",
        "rooms": sz.rooms,
        "size": sz.room_size,
        "connects": f"{sz.connects:,}",
        "inflight": sz.in_flight,
    }
    head = "| workload | " + " | ".join(FAMILIES[s].label for s in servers) + " |"
    lines = [head, "|---|" + "---:|" * len(servers)]
    for workload, metric, label, fmt in ROWS:
        if workload not in results:
            continue
        cells = [cell([r[metric] for r in results[workload].get(s, [])], fmt) for s in servers]
        lines.append(f"| {label.format(**names)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description="Switchboard beside Node Socket.IO and python-socketio, same client harness "
        "(prints figures, asserts nothing).",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, in this order (default {','.join(SERVERS)}; "
        f"also {','.join(EXTRA_SERVERS)})",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated (default {','.join(WORKLOADS)})",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repetition: smoke run"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    args = parser.parse_args(argv)
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in args.server_list:
        if s not in FAMILIES:
            parser.error(f"unknown server {s!r} (one of {', '.join(FAMILIES)})")
    for w in args.workload_list:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r} (one of {', '.join(WORKLOADS)})")
    if args.quick and "--repeat" not in " ".join(argv or sys.argv[1:]):
        args.repeat = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise_nofile()
    sz = Sizes(args.quick)
    started = time.monotonic()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"peer benchmark: {os.cpu_count()} cores, load average {load}, "
        f"{args.repeat} repetition(s){' (quick sizes)' if args.quick else ''}; "
        "Switchboard persists every message (SQLite), the peers persist nothing",
        flush=True,
    )
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rep in range(args.repeat):
        for workload in args.workload_list:
            for name in args.server_list:
                figures = run_one(workload, FAMILIES[name], sz)
                results.setdefault(workload, {}).setdefault(name, []).append(figures)
                shown = ", ".join(f"{k} {v:,.2f}" for k, v in figures.items())
                print(f"  rep {rep + 1} {workload:<10} {name:<13} {shown}", flush=True)
    took = time.monotonic() - started
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nmedian (min{EN_DASH}max) of {args.repeat} run(s); {took / 60:.1f} min; "
        f"load average at the end {load}; {time.strftime('%Y-%m-%d')}\n"
    )
    print(table(results, args.server_list, sz))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "secs": took,
                    "quick": args.quick,
                    "results": results,
                },
                fh,
                indent=1,
            )
    return 0
