"""Room fan-out across the Redis mirror vs on one node, in the same run.

Prints figures; it is not a test and asserts nothing about speed.

One cluster (tests/support/cluster.py: a redis-server, a PostgreSQL, gateway nodes
``a`` and ``b`` as real ``python -m server serve`` processes) serves both
modes, one after the other, with fresh connections and a fresh room each:

* ``local`` -- the publisher and all N subscribers on node a;
* ``cross`` -- the publisher on node a, all N subscribers on node b, so every
  delivery crosses Redis: a stores the message, delivers to nobody locally,
  PUBLISHes once, b receives it and fans it out.

The load is bench/fanout.py's (its publisher and subscriber processes, on
bench/_wsclient.py's lean client, are reused as they are): N subscribers over
``--users`` users in ``--procs`` lazy bulk processes plus one eager probe
process (the latency source), a publisher sending ``message:send`` with
``time.time()`` in the metadata. Two phases per mode:

1. ``max`` -- M messages as fast as acks come back (``--window`` in flight);
2. ``steady`` -- M/2 messages at ``--steady-fraction`` of the *local* max
   msgs/s, the same rate for both modes, so their latencies compare.

Per phase: deliveries/s, p50/p99 publish → receive latency, CPU % of one core
of node a, node b, redis-server, the publisher and the subscriber processes
(psutil), and Redis traffic per broadcast: node a's
``switchboard_redis_published_total``, Redis' own ``PUBLISH`` count
(``INFO commandstats``, includes the nodes' liveness pings) and, from a
pattern subscription on the cluster's prefix, publishes per channel kind
(``room`` must be 1 per message: one per broadcast, not per recipient).

Targets (printed, not asserted): cross >= 0.8 x local deliveries/s at 1,000
subscribers; cross p99 < 50 ms.

Usage::

    .venv/bin/python -m bench.cluster                    # N=1000
    .venv/bin/python -m bench.cluster --subscribers 100,1000 --messages 200
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from bench._wsclient import process_cpu_secs, raise_nofile
from bench.fanout import _recv, collect_phase, start_clients, stop_clients
from tests.support.cluster import Cluster, parse_metrics

TARGET_RATIO = 0.8  # cross-node / local deliveries/s at 1,000 subscribers
TARGET_P99_MS = 50.0
MODES = {"local": ("a", "a"), "cross": ("a", "b")}  # mode -> (publisher node, subscriber node)
BENCH_NODE_ENV = {
    "SWITCHBOARD_RATE_LIMITS": "messages=100000/1m,joins=100000/1m,typing=100000/1m,"
    "other=100000/1m",
    "SWITCHBOARD_MAX_CONNECTIONS_PER_IP": "100000",
    "SWITCHBOARD_MAX_CONNECTIONS_PER_USER": "100000",
    "SWITCHBOARD_LOG_LEVEL": "WARNING",
}
DB_SERIES = "switchboard_db_query_duration_seconds"
# The benchmark is not about heartbeats: a slow sweep keeps pings out of the figures.
BENCH_HEARTBEAT_SECS = 10.0


@dataclass
class Phase:
    mode: str
    n: int
    phase: str
    messages: int
    rate: float  # offered msgs/s, 0 = max
    deliveries: int = 0
    expected: int = 0
    secs: float = 0.0
    msgs_per_s: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> % of one core
    published_a: float = 0.0  # node a's switchboard_redis_published_total delta
    received_b: float = 0.0
    redis_publish_calls: float = 0.0  # INFO commandstats cmdstat_publish delta
    by_kind: Counter[str] = field(default_factory=Counter)
    db_send_ms: float = math.nan  # node a: mean message.send transaction
    db_jobs_a: float = 0.0  # node a: database jobs (all operations) in the phase
    failed: int = 0

    @property
    def per_s(self) -> float:
        return self.deliveries / self.secs if self.secs else 0.0

    def line(self) -> str:
        offered = "max" if not self.rate else f"{self.rate:.0f}/s"
        warn = ""
        if self.deliveries < self.expected:
            warn += f"  [!] only {self.deliveries}/{self.expected} received"
        if self.failed:
            warn += f"  [!] {self.failed} sends failed"
        cpu = " ".join(f"{k} {v:.0f}%" for k, v in self.cpu.items())
        per_msg = max(1, self.messages)
        kinds = " ".join(f"{k} {v / per_msg:.2f}" for k, v in sorted(self.by_kind.items()))
        return (
            f"  {self.mode:<5} N={self.n:<5} {self.phase:<6} offered {offered:>7}: "
            f"{self.deliveries:>8,} deliveries in {self.secs:6.2f}s = {self.per_s:>9,.0f}/s "
            f"({self.msgs_per_s:,.0f} msg/s)  latency p50 {self.p50_ms:6.1f} ms "
            f"p99 {self.p99_ms:6.1f} ms{warn}\n"
            f"        CPU: {cpu}\n"
            f"        Redis per message: a published {self.published_a / per_msg:.2f}, "
            f"b received {self.received_b / per_msg:.2f}, PUBLISH commands "
            f"{self.redis_publish_calls / per_msg:.2f}; by channel kind: {kinds or '-'}\n"
            f"        node a database: message.send {self.db_send_ms:.1f} ms mean, "
            f"{self.db_jobs_a / per_msg:.1f} jobs per message (all operations)"
        )


class ChannelTally:
    """Counts every message published under the cluster's prefix, by channel kind.

    A pattern subscription on its own connection, read by a thread: Redis sends
    it one copy of each PUBLISH (``{p}:room:…`` → ``room``), which costs Redis
    one more write per message and the nodes nothing.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self.counts: Counter[str] = Counter()
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.psubscribe(f"{prefix}:*")
        self._prefix_len = len(prefix) + 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="channel-tally")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError, OSError):
                message = self._pubsub.get_message(timeout=0.2)
                if message is not None and message["type"] == "pmessage":
                    channel = message["channel"].decode()[self._prefix_len :]
                    self.counts[channel.split(":", 1)[0]] += 1

    def snapshot(self) -> Counter[str]:
        return Counter(self.counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
            self._client.close()


def _publish_calls(client: redis.Redis) -> float:
    stats = client.info("commandstats")
    entry = stats.get("cmdstat_publish") or {}
    return float(entry.get("calls", 0))


def _metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return parse_metrics(resp.read().decode())


def _delta(before: dict[str, float], after: dict[str, float], series: str) -> float:
    return after.get(series, 0.0) - before.get(series, 0.0)


def run_mode(
    cluster: Cluster,
    mode: str,
    n: int,
    args: argparse.Namespace,
    steady_rate: float | None,
    tally: ChannelTally | None,
    rclient: redis.Redis,
) -> list[Phase]:
    """N subscribers on the mode's node, the publisher on a: max phase, then steady."""
    pub_node, sub_node = (cluster.node(x) for x in MODES[mode])
    tag = f"{mode}{n}-{os.getpid()}"
    users = [cluster.token(f"sub-{tag}-{u}", ttl_secs=3600) for u in range(min(n, args.users))]
    tokens = [users[i % len(users)] for i in range(n)]
    pub_tokens = [cluster.token(f"pub-{tag}-{k}", ttl_secs=3600) for k in range(args.publishers)]
    procs: list[Any] = []
    pipes: list[Any] = []
    phases: list[Phase] = []
    try:
        probes = min(args.probes, n)
        ready, setup = start_clients(
            procs, pipes, pub_port=pub_node.port, sub_port=sub_node.port, pub_tokens=pub_tokens,
            tokens=tokens, sources=["127.0.0.1"], probes=probes, args=args,
        )  # fmt: skip
        pub_pipe, sub_pipes = pipes[0], pipes[1:]
        pub_pipe.send(("warmup", args.warmup))
        _recv(pub_pipe, args.timeout, "warm-up")
        time.sleep(0.5)  # let the warm-up fan-out (and its notifications) drain
        watched = {
            "node a": psutil.Process(cluster.node("a").pid),
            "node b": psutil.Process(cluster.node("b").pid),
            "redis": psutil.Process(cluster.redis.pid),
            "pub": psutil.Process(procs[0].pid),
        }
        for i, proc in enumerate(procs[1:]):
            watched[f"sub{i}{'(probe)' if probes and i == 0 else ''}"] = psutil.Process(proc.pid)
        plan = [("max", args.messages_for(n), 0.0)]
        if args.steady_fraction > 0:
            plan.append(("steady", max(1, args.messages_for(n) // 2), steady_rate or 0.0))
        for name, messages, rate in plan:
            if name == "steady" and not rate:
                rate = args.steady_fraction * phases[0].msgs_per_s
            ph = Phase(mode, n, name, messages, rate, expected=messages * ready)
            for p in sub_pipes:
                p.send(("run", messages, args.timeout))
            m_a0, m_b0 = _metrics(cluster.node("a").port), _metrics(cluster.node("b").port)
            calls0 = _publish_calls(rclient)
            kinds0 = tally.snapshot() if tally is not None else Counter()
            cpu0 = {k: process_cpu_secs(p) for k, p in watched.items()}
            wall0 = time.monotonic()
            pub_pipe.send(("go", messages, rate, args.window))
            collect_phase(ph, pipes, messages, probes, args.timeout)
            wall = time.monotonic() - wall0
            cpu1 = {k: process_cpu_secs(p) for k, p in watched.items()}
            time.sleep(0.3)  # background work of the last messages (notifications) lands
            m_a1, m_b1 = _metrics(cluster.node("a").port), _metrics(cluster.node("b").port)
            ph.redis_publish_calls = _publish_calls(rclient) - calls0
            if tally is not None:
                ph.by_kind = tally.snapshot() - kinds0
            ph.published_a = m_a1.get("switchboard_redis_published_total", 0.0) - m_a0.get(
                "switchboard_redis_published_total", 0.0
            )
            ph.received_b = m_b1.get("switchboard_redis_received_total", 0.0) - m_b0.get(
                "switchboard_redis_received_total", 0.0
            )
            ph.cpu = {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in watched}
            ph.db_jobs_a = _delta(m_a0, m_a1, f"{DB_SERIES}_count")
            sends = _delta(m_a0, m_a1, f'{DB_SERIES}_count{{operation="message.send"}}')
            if sends:
                send_secs = _delta(m_a0, m_a1, f'{DB_SERIES}_sum{{operation="message.send"}}')
                ph.db_send_ms = 1000 * send_secs / sends
            phases.append(ph)
            print(ph.line() + (f"  (setup {setup:.1f}s)" if name == "max" else ""), flush=True)
    finally:
        stop_clients(procs, pipes, join_secs=10)
    return phases


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fan-out across the Redis mirror vs one node (prints figures only).",
        epilog=f"Targets: cross >= {TARGET_RATIO}x local deliveries/s at 1,000 subscribers, "
        f"cross p99 < {TARGET_P99_MS:g} ms.",
    )
    parser.add_argument("--subscribers", default="1000", help="comma-separated (default 1000)")
    parser.add_argument("--messages", type=int, default=0,
                        help="messages per max phase (default: 100,000 deliveries' worth, "
                        "clamped to 50..2000)")  # fmt: skip
    parser.add_argument("--users", type=int, default=100,
                        help="distinct subscriber users (default 100)")  # fmt: skip
    parser.add_argument("--procs", type=int, default=2, help="bulk subscriber processes")
    parser.add_argument("--probes", type=int, default=20,
                        help="subscribers in the eager probe process (latency source)")  # fmt: skip
    parser.add_argument("--lazy-ms", type=float, default=20.0,
                        help="bulk processes poll every this many ms (default 20)")  # fmt: skip
    parser.add_argument("--publishers", type=int, default=2,
                        help="publishing connections (users), one process (default 2)")  # fmt: skip
    parser.add_argument("--window", type=int, default=8,
                        help="sends in flight per publisher (max phase)")  # fmt: skip
    parser.add_argument("--steady-fraction", type=float, default=0.5,
                        help="steady rate as a fraction of local max msgs/s (0: skip)")  # fmt: skip
    parser.add_argument("--modes", default="local,cross", help="order of the modes")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-tally", action="store_true",
                        help="no pattern subscription counting publishes")  # fmt: skip
    args = parser.parse_args(argv)
    args.ns = [int(x) for x in args.subscribers.split(",") if x.strip()]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.mode_list:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    fixed = args.messages
    args.messages_for = lambda n: fixed or max(50, min(2000, math.ceil(100_000 / n)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    nofile = raise_nofile()
    print(f"cluster fan-out benchmark: {os.cpu_count()} cores, load average "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}, RLIMIT_NOFILE {nofile}; "
          f"publisher on node a, subscribers on a (local) or b (cross)", flush=True)  # fmt: skip
    results: dict[tuple[str, int, str], Phase] = {}
    cluster = Cluster(("a", "b"), heartbeat_interval=BENCH_HEARTBEAT_SECS, node_env=BENCH_NODE_ENV)
    with cluster:
        rclient = redis.Redis.from_url(cluster.redis.url)
        tally = None if args.no_tally else ChannelTally(cluster.redis.url, cluster.prefix)
        try:
            for n in args.ns:
                steady_rate: float | None = None
                for mode in args.mode_list:
                    for ph in run_mode(cluster, mode, n, args, steady_rate, tally, rclient):
                        results[(mode, n, ph.phase)] = ph
                        if ph.phase == "steady" and steady_rate is None:
                            steady_rate = ph.rate
        finally:
            if tally is not None:
                tally.close()
            rclient.close()
        alive = cluster.alive()
    _summary(results, args, alive)
    return 0


def _summary(
    results: dict[tuple[str, int, str], Phase], args: argparse.Namespace, alive: dict[str, bool]
) -> None:
    print("\nsummary")
    print(f"  {'N':>5}  {'mode':<5} {'deliveries/s':>12} {'msg/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'steady p50/p99 ms':>20}  {'room pub/msg':>12}  CPU (max phase)")  # fmt: skip
    for n in args.ns:
        for mode in args.mode_list:
            ph = results.get((mode, n, "max"))
            if ph is None:
                continue
            st = results.get((mode, n, "steady"))
            steady = f"{st.p50_ms:.1f}/{st.p99_ms:.1f} @{st.rate:.0f}/s" if st else "-"
            room = ph.by_kind.get("room", 0) / max(1, ph.messages)
            cpu = " ".join(f"{k} {v:.0f}%" for k, v in ph.cpu.items() if not k.startswith("sub"))
            print(f"  {n:>5}  {mode:<5} {ph.per_s:>12,.0f} {ph.msgs_per_s:>8,.0f} "
                  f"{ph.p50_ms:>7.1f} {ph.p99_ms:>7.1f} {steady:>20}  "
                  f"{room:>12.2f}  {cpu}")  # fmt: skip
        local, cross = results.get(("local", n, "max")), results.get(("cross", n, "max"))
        if local and cross:
            ratio = cross.per_s / max(1e-9, local.per_s)
            verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
            print(
                f"  {n:>5}  ratio cross / local deliveries/s: {ratio:.2f}x "
                f"(target >= {TARGET_RATIO}x{' at N=1000' if n != 1000 else ''}: {verdict})"
            )
            st = results.get(("cross", n, "steady"))
            if st is not None:
                verdict = "met" if st.p99_ms < TARGET_P99_MS else "NOT met"
                print(
                    f"  {n:>5}  cross p99 at the steady rate: {st.p99_ms:.1f} ms "
                    f"(target < {TARGET_P99_MS:g} ms: {verdict}); at max: {cross.p99_ms:.1f} ms"
                )
            per_node = cross.by_kind.get("room", 0) / max(1, cross.messages)
            print(f"  {n:>5}  Redis room publishes per broadcast (cross): {per_node:.2f} "
                  f"(1 receiving node; must be 1, not 1 per recipient = {n})")  # fmt: skip
    print(f"  nodes alive at the end: {alive}")


if __name__ == "__main__":
    raise SystemExit(main())
