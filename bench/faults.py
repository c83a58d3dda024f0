"""Delivery under faults: acked vs stored vs delivered, holes and duplicates.

Prints figures; it asserts nothing (tests/test_faults.py holds the quick
subset that does).

Each scenario runs on a fresh tests/support/cluster.py :class:`Cluster`: a
real redis-server, a real PostgreSQL and gateway nodes ``a`` and ``b`` as
``python -m server serve`` processes. The load, all through
:class:`switchboard_client.Client` with ``reconnect=True``:

* ``--rooms`` public rooms; in each room one sender on each node, together
  ``--rate`` messages/s offered at a steady pace whatever happens (queued by
  the sender, :data:`SEND_WINDOW` in flight each). Every send
  carries a ``clientMsgId`` and is retried with the same id, with backoff
  (0.1 s doubling to 2 s), after ``SERVICE_UNAVAILABLE`` (or any error with
  ``retryable``), a lost connection or an ack timeout, for up to
  :data:`GIVE_UP_SECS`; the harness does this (the client has no send queue).
* one receiver per room on each node, counting every live ``message:new``
  frame before the client's de-duplication (``raw``) and every one its
  callbacks saw (``delivered``; hole repair and reconnect recovery included).

Reconnection: a node that is killed comes back on a new port, so a client
cannot find it at its old URL. The harness points a disconnected client at
the surviving node ``a`` in its ``client:disconnected`` callback (the client
reads :attr:`Client.url` on every attempt); it then re-joins its room from
its contiguous ``seq``. Clients of the restarted node therefore end up on
``a``.

Scenarios (the fault comes ``--fault-at`` seconds into the traffic):

* ``kill9``    -- node b SIGKILLed, then started again at once;
* ``redis``    -- redis-server SIGKILLed, started again (empty, same port) after ``--outage`` s;
* ``postgres`` -- PostgreSQL stopped (``pg_ctl -m immediate``), started after ``--outage`` s;
* ``sigterm``  -- node b stopped gracefully (SIGTERM), then started again.

After ``--seconds`` of traffic every send either got its ack or gave up,
the receivers get :data:`DRAIN_SECS` to catch up, and the database is read.
Counted per scenario: ``acked`` sends, ``stored`` rows, ``lost`` (acked and
not stored, by room, seq and clientMsgId), for each receiver the stored seqs
of its window (every seq after its join) it was ``delivered`` and never
(``holes``), those the live path lost and the client recovered (``repaired``
by its hole repair, ``rejoined`` from a reconnect's ``missed``: without the
client's repair the ``repaired`` ones would be holes), duplicate live frames
(``raw dups``) and duplicates its callbacks saw (``dups``). The bar: 0 lost,
0 holes, 0 dups.

Usage::

    .venv/bin/python -m bench.faults
    .venv/bin/python -m bench.faults --scenario redis --seconds 30 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster import BENCH_NODE_ENV
from switchboard_client import Client, ClientError, ConnectionClosed, Frame
from tests.support.cluster import Cluster
from tests.support.waiting import eventually

SCENARIOS = ("kill9", "redis", "postgres", "sigterm")
#: A send still unacked this long after the traffic stopped is given up (counted ``unacked``).
GIVE_UP_SECS = 30.0
#: Receivers get this long after the last ack to receive everything stored.
DRAIN_SECS = 15.0
ACK_TIMEOUT_SECS = 10.0
#: Sends in flight per sender; more wait in its queue (unbounded concurrency
#: turns an outage into a retry storm that outlives it).
SEND_WINDOW = 16
RETRY_FIRST_SECS = 0.1
RETRY_MAX_SECS = 2.0
#: A reconnecting client's longest pause between attempts.
RECONNECT_MAX_BACKOFF_SECS = 1.0
SURVIVOR = "a"
#: Errors after which a send is retried with the same clientMsgId.
RETRYABLE_CODES = frozenset({"SERVICE_UNAVAILABLE"})


class CountingClient(Client):
    """A :class:`Client` that also counts live ``message:new`` frames before its de-duplication.

    It overrides the client's internal ``_on_event`` (every parsed event frame
    from the server, before hole-holding and de-duplication): the only place
    raw frames can be counted without parsing them twice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: Counter[int] = Counter()

    def _on_event(self, frame: Frame) -> None:
        data = frame.get("data")
        message = data.get("message") if isinstance(data, dict) else None
        if frame.get("event") == "message:new" and isinstance(message, dict):
            self.raw[int(message.get("seq") or 0)] += 1
        super()._on_event(frame)


@dataclass
class Receiver:
    name: str
    room: str
    client: CountingClient
    since: int = 0  # the room's last seq when it joined: its window starts after
    delivered: list[int] = field(default_factory=list)
    repaired: int = 0  # delivered by the client's hole repair
    rejoined: int = 0  # delivered by a reconnect's recovery
    away: bool = False  # between client:disconnected and client:reconnected

    def on_message(self, frame: Frame) -> None:
        self.delivered.append(frame["data"]["message"]["seq"])
        if frame.get("recovered"):
            if self.away:
                self.rejoined += 1
            else:
                self.repaired += 1

    def on_connection(self, frame: Frame) -> None:
        self.away = frame["event"] == "client:disconnected"


@dataclass
class SendStats:
    offered: int = 0
    acked: dict[tuple[str, str], int] = field(default_factory=dict)  # (room, cmid) -> seq
    duplicate_acks: int = 0
    retries: int = 0
    unacked: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Result:
    scenario: str
    stats: SendStats
    stored: int
    lost: int
    receivers: list[dict[str, Any]]
    fault_secs: float
    reconnects: int


def _retry_reason(exc: BaseException) -> str | None:
    """Why a failed send is retried, or ``None`` when it is not."""
    if isinstance(exc, ClientError):
        if exc.code in RETRYABLE_CODES or exc.details.get("retryable") is True:
            return exc.code
        return None
    if isinstance(exc, ConnectionClosed):
        return "CONNECTION_LOST"
    if isinstance(exc, TimeoutError):
        return "TIMEOUT"
    return None


async def send_one(
    client: Client, room: str, cmid: str, stats: SendStats, give_up_at: float
) -> None:
    """One message, retried with its clientMsgId until acked, refused or ``give_up_at``."""
    loop = asyncio.get_running_loop()
    delay = RETRY_FIRST_SECS
    payload = {"roomId": room, "content": f"m {cmid[:8]}", "clientMsgId": cmid}
    while True:
        try:
            ack = await client.emit("message:send", payload, timeout=ACK_TIMEOUT_SECS)
        except (ClientError, ConnectionClosed, TimeoutError) as exc:
            reason = _retry_reason(exc)
            if reason is None:
                stats.errors[getattr(exc, "code", type(exc).__name__)] += 1
                return
            stats.errors[reason] += 1
            if loop.time() > give_up_at:
                stats.unacked += 1
                return
            stats.retries += 1
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, RETRY_MAX_SECS)
            continue
        stats.acked[(room, cmid)] = ack["message"]["seq"]
        stats.duplicate_acks += bool(ack.get("duplicate"))
        return


async def offer(client: Client, room: str, rate: float, until: float, stats: SendStats) -> None:
    """Queue a message every ``1/rate`` s until ``until``; :data:`SEND_WINDOW` of them in flight.

    The offered load stays steady whatever happens; while sends fail,
    messages wait in the sender's queue, as in a client with a send queue.
    Returns once every message was acked, refused or given up.
    """
    loop = asyncio.get_running_loop()
    give_up_at = until + GIVE_UP_SECS
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def work() -> None:
        while True:
            cmid = await queue.get()
            if loop.time() > give_up_at:
                stats.unacked += 1
            else:
                await send_one(client, room, cmid, stats, give_up_at)
            queue.task_done()

    workers = [loop.create_task(work()) for _ in range(SEND_WINDOW)]
    due = loop.time()
    while due < until:
        queue.put_nowait(uuid.uuid4().hex)
        stats.offered += 1
        due += 1.0 / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
    await queue.join()
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


def _follow_survivor(cluster: Cluster, client: Client) -> None:
    """On a lost connection, point ``client`` at the surviving node (a restarted one moves)."""

    def on_disconnected(_frame: Frame) -> None:
        client.url = cluster.node(SURVIVOR).url()

    client.on("client:disconnected", on_disconnected)


async def inject(cluster: Cluster, scenario: str, outage: float) -> float:
    """Cause ``scenario``'s fault and undo it; the seconds it took."""
    started = time.monotonic()
    if scenario == "kill9":
        await asyncio.to_thread(cluster.node("b").kill)
        await asyncio.to_thread(cluster.node("b").start)
    elif scenario == "sigterm":
        await asyncio.to_thread(cluster.node("b").stop)
        await asyncio.to_thread(cluster.node("b").start)
    elif scenario == "redis":
        await asyncio.to_thread(cluster.redis.kill)
        await asyncio.sleep(outage)
        await asyncio.to_thread(cluster.redis.start)
    elif scenario == "postgres":
        await asyncio.to_thread(cluster.pg.kill)
        await asyncio.sleep(outage)
        await asyncio.to_thread(cluster.pg.start)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return time.monotonic() - started


async def _stored(cluster: Cluster, rooms: list[str]) -> dict[str, dict[int, str | None]]:
    rows = await cluster.asql(
        "SELECT room_id, seq, client_msg_id FROM message WHERE room_id = ANY(%s)", rooms
    )
    stored: dict[str, dict[int, str | None]] = {room: {} for room in rooms}
    for room_id, seq, cmid in rows:
        stored[room_id][int(seq)] = cmid
    return stored


def _ranges(seqs: set[int]) -> str:
    """``{3, 4, 5, 9}`` -> ``"3-5,9"``: where a receiver's holes are."""
    out: list[str] = []
    for seq in sorted(seqs):
        if out and int(out[-1].rpartition("-")[2]) == seq - 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{seq}"
        else:
            out.append(str(seq))
    return ",".join(out)


def _missing(receiver: Receiver, stored: dict[str, dict[int, str | None]]) -> set[int]:
    return _window(receiver, stored) - set(receiver.delivered)


def _window(receiver: Receiver, stored: dict[str, dict[int, str | None]]) -> set[int]:
    """The stored seqs the receiver should get: every one after its join."""
    return {seq for seq in stored[receiver.room] if seq > receiver.since}


async def run_scenario(
    scenario: str,
    *,
    seconds: float,
    rate: float,
    rooms: int,
    fault_at: float,
    outage: float,
) -> Result:
    with Cluster(("a", "b"), node_env=BENCH_NODE_ENV) as cluster:
        run = uuid.uuid4().hex[:6]
        room_ids = [f"faults-{run}-{i}" for i in range(rooms)]
        opened: list[Client] = []

        async def open_client(node: str, user: str, cls: type[Client] = Client) -> Client:
            client = cls(
                cluster.node(node).url(), cluster.token(user), reconnect=True,
                max_backoff=RECONNECT_MAX_BACKOFF_SECS, keep_history=False, buffer_events=False,
            )  # fmt: skip
            opened.append(client)
            _follow_survivor(cluster, client)
            await client.connect()
            return client

        try:
            owner = await open_client("a", "owner")
            for room in room_ids:
                await owner.emit("room:create", {"roomId": room, "name": room, "type": "public"})
            receivers: list[Receiver] = []
            senders: list[tuple[Client, str]] = []
            for room in room_ids:
                for node in cluster.names:
                    name = f"r-{node}-{room[-1]}"
                    client = await open_client(node, name, CountingClient)
                    assert isinstance(client, CountingClient)
                    receiver = Receiver(name, room, client)
                    client.on("message:new", receiver.on_message)
                    client.on("client:disconnected", receiver.on_connection)
                    client.on("client:reconnected", receiver.on_connection)
                    joined = await client.emit("room:join", {"roomId": room})
                    receiver.since = int(joined["room"].get("lastSeq") or 0)
                    receivers.append(receiver)
                    sender = await open_client(node, f"s-{node}-{room[-1]}")
                    await sender.emit("room:join", {"roomId": room})
                    senders.append((sender, room))

            stats = SendStats()
            loop = asyncio.get_running_loop()
            until = loop.time() + seconds
            traffic = [
                loop.create_task(offer(client, room, rate / len(senders), until, stats))
                for client, room in senders
            ]
            await asyncio.sleep(fault_at)
            fault_secs = await inject(cluster, scenario, outage)
            await asyncio.gather(*traffic)

            stored = await _stored(cluster, room_ids)
            with contextlib.suppress(AssertionError):  # what is still missing is counted
                await eventually(
                    lambda: not any(_missing(r, stored) for r in receivers),
                    timeout=DRAIN_SECS, interval=0.2, what="receivers caught up",
                )  # fmt: skip
            stored = await _stored(cluster, room_ids)
            lost = sum(
                1 for (room, cmid), seq in stats.acked.items() if stored[room].get(seq) != cmid
            )
            report = [
                {
                    "name": r.name,
                    "connected": r.client.connected,
                    "window": len(_window(r, stored)),
                    "delivered": len(_window(r, stored) & set(r.delivered)),
                    "holes": len(_missing(r, stored)),
                    "repaired": r.repaired,
                    "rejoined": r.rejoined,
                    "raw_dups": sum(n - 1 for n in r.client.raw.values()),
                    "dups": len(r.delivered) - len(set(r.delivered)),
                    "missing": _ranges(_missing(r, stored)),
                }
                for r in receivers
            ]
            return Result(
                scenario=scenario,
                stats=stats,
                stored=sum(len(seqs) for seqs in stored.values()),
                lost=lost,
                receivers=report,
                fault_secs=fault_secs,
                reconnects=sum(client.reconnects for client in opened),
            )
        finally:
            for client in opened:
                with contextlib.suppress(Exception):
                    await client.aclose(timeout=2.0)


COLUMNS = (
    ("scenario", 9), ("fault s", 7), ("offered", 7), ("acked", 6), ("stored", 6), ("lost", 4),
    ("unacked", 7), ("retries", 7), ("dup acks", 8), ("recv", 4), ("delivered/window", 16),
    ("repaired", 8), ("rejoined", 8), ("holes", 5), ("raw dups", 8), ("dups", 4), ("reconn", 6),
)  # fmt: skip


def _row(result: Result) -> list[str]:
    receivers = result.receivers
    connected = sum(1 for r in receivers if r["connected"])
    delivered = sum(r["delivered"] for r in receivers)
    window = sum(r["window"] for r in receivers)
    return [
        result.scenario,
        f"{result.fault_secs:.1f}",
        str(result.stats.offered),
        str(len(result.stats.acked)),
        str(result.stored),
        str(result.lost),
        str(result.stats.unacked),
        str(result.stats.retries),
        str(result.stats.duplicate_acks),
        f"{connected}/{len(receivers)}",
        f"{delivered}/{window}",
        str(sum(r["repaired"] for r in receivers)),
        str(sum(r["rejoined"] for r in receivers)),
        str(sum(r["holes"] for r in receivers)),
        str(sum(r["raw_dups"] for r in receivers)),
        str(sum(r["dups"] for r in receivers)),
        str(result.reconnects),
    ]


def print_table(results: list[Result], verbose: bool) -> None:
    print("  ".join(name.rjust(width) for name, width in COLUMNS))
    for result in results:
        cells = _row(result)
        print("  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True)))
    print(
        "\nrecv: receivers connected at the end / all; delivered/window: distinct stored seqs"
        " delivered / stored seqs after each receiver's join, summed; repaired, rejoined: of"
        " those, the live path lost and the client recovered by its hole repair, by a"
        " reconnect's missed; holes: never"
        " delivered; raw dups: repeated live frames before the client's de-duplication;"
        " dups: repeats its callbacks saw."
    )
    for result in results:
        if result.stats.errors:
            errors = ", ".join(f"{code} {n}" for code, n in result.stats.errors.most_common())
            print(f"{result.scenario}: send attempts failed: {errors}")
        if verbose or any(r["holes"] or r["dups"] for r in result.receivers):
            for r in result.receivers:
                print(f"  {result.scenario} {r}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="traffic per scenario (s)")
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s offered, in total")
    parser.add_argument("--rooms", type=int, default=4, help="rooms (2 senders, 2 receivers each)")
    parser.add_argument("--fault-at", type=float, default=5.0, help="fault after this many s")
    parser.add_argument("--outage", type=float, default=10.0, help="Redis/PostgreSQL down (s)")
    parser.add_argument("--verbose", action="store_true", help="print every receiver")
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenario.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if not 1 <= args.rooms <= 10:
        parser.error("--rooms must be 1..10")
    return args


async def _main(args: argparse.Namespace) -> list[Result]:
    results = []
    for scenario in args.scenarios:
        print(f"running {scenario} ({args.seconds:g} s at {args.rate:g} msg/s)...", flush=True)
        result = await run_scenario(
            scenario, seconds=args.seconds, rate=args.rate, rooms=args.rooms,
            fault_at=args.fault_at, outage=args.outage,
        )  # fmt: skip
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "ERROR"))
    print(f"bench.faults on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    results = asyncio.run(_main(args))
    print()
    print_table(results, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
