"""The notification work of a burst of ``message:send``, and of a burst of connections.

Prints figures; it is not a test and asserts nothing about speed.

**Sends.**
A real :class:`server.app.Node` (SQLite in a temp dir, or PostgreSQL with
``--database-url``) and real :class:`switchboard_client.Client` WebSockets share
this process's event loop. ``--rooms`` rooms each get ``--offline`` members
who joined once and went away (every message is a missed message for them)
and ``--senders-per-room`` sender connections; every ``--mention-every``-th
message mentions one of the offline members. The senders send ``--messages``
in all, ``--window`` in flight each, as fast as acks come back (the server
takes a connection's events one at a time, so a send batch carries at most
one send per connection and a window above 1 only queues at the client).

Reported, sampled every loop turn (``asyncio.sleep(0)``) by a watcher task:

* background tasks alive at peak (``node.tasks``), and the notification
  backlog gauge at peak (``switchboard_notification_backlog``, when the node
  has it);
* how long after the last ack the notification work took to drain;
* database jobs by operation (the ``db_duration`` histogram's counts), and
  notifications created;
* the largest event-loop stall the watcher saw.

Then it checks the outcome: each offline member's missed-messages notice of
its room counts every message, and each mention was stored once.

**Connections.** ``--connects`` users, each holding ``--stored`` notifications
(one in three read), open ``/ws/notifications`` all at once; each waits for
its ``notification:recent``. Reported: connections/s, the initial-state
database jobs and the database worker's time in them per connection.

"Database worker busy" is the wall time the worker threads spent in each
job function (no queueing; it includes waiting for the GIL while the event
loop runs, which in this one-process set-up is most of it).

Usage::

    .venv/bin/python -m bench.notify
    .venv/bin/python -m bench.notify --messages 5000 --rooms 10 --offline 20 --connects 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import Notification, utcnow
from models import notifications as store
from server.app import Node
from server.core.auth import mint_token
from server.core.config import Config
from server.services.notify import RECENT_ON_CONNECT
from switchboard_client import Client

#: The per-message code took longer than the client's default 10 s under load.
ACK_TIMEOUT_SECS = 120.0
RATE_LIMITS = "messages=1000000/1m,joins=100000/1m,typing=100000/1m,other=100000/1m"


def db_jobs(node: Node) -> Counter[str]:
    """Database jobs run so far, by operation."""
    jobs: Counter[str] = Counter()
    for metric in node.registry.collect():
        if metric.name != "switchboard_db_query_duration_seconds":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                jobs[sample.labels["operation"]] = int(sample.value)
    return jobs


def worker_time(node: Node) -> Counter[str]:
    """Seconds the database workers spent in each job function (service time, no queueing)."""
    busy: Counter[str] = Counter()  # float seconds per name: Counter adds any number
    call = node.db._call

    def timed(fn: Any, *rest: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(fn, *rest)
        finally:
            busy[getattr(fn, "__name__", "?")] += time.perf_counter() - started  # type: ignore[assignment]

    node.db._call = timed  # type: ignore[method-assign,assignment]
    return busy


def backlog(node: Node) -> float | None:
    return node.registry.get_sample_value("switchboard_notification_backlog")


async def run(args: argparse.Namespace) -> None:
    home = tempfile.mkdtemp(prefix="notify-burst-")
    url = args.database_url or f"sqlite:///{home}/switchboard.db"
    config = Config.from_env(
        {}, env="test", host="127.0.0.1", port=0, node_id="bench", database_url=url,
        rate_limits=RATE_LIMITS, max_connections_per_user=100000,
        max_connections_per_ip=100000, write_batch_max=args.batch_max,
    )  # fmt: skip
    node = Node(config)
    busy = worker_time(node)
    await node.start()
    clients: list[Client] = []

    async def connect(user: str) -> Client:
        client = Client(f"ws://127.0.0.1:{node.port}/ws/chat", mint_token(config, user))
        clients.append(client)
        await client.connect()
        return client

    try:
        rooms = [f"r{n}" for n in range(args.rooms)]
        senders: list[tuple[Client, str]] = []
        for room in rooms:
            owner = await connect(f"{room}-s0")
            await owner.emit("room:create", {"roomId": room, "name": room.upper()})
            await owner.emit("room:join", {"roomId": room})
            senders.append((owner, room))
            for n in range(1, args.senders_per_room):
                client = await connect(f"{room}-s{n}")
                await client.emit("room:join", {"roomId": room})
                senders.append((client, room))
            for n in range(args.offline):
                away = await connect(f"{room}-away{n}")
                await away.emit("room:join", {"roomId": room})
                await away.aclose()
        # Joins spawn room_seen tasks; let them finish before counting.
        await node.tasks.drain(10.0)
        before = db_jobs(node)
        busy.clear()

        per_sender = args.messages // len(senders)
        peak_tasks = 0
        peak_backlog = 0.0
        worst_stall = 0.0
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal peak_tasks, peak_backlog, worst_stall
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                worst_stall = max(worst_stall, now - last)
                last = now
                peak_tasks = max(peak_tasks, len(node.tasks))
                peak_backlog = max(peak_backlog, backlog(node) or 0.0)

        mentions: Counter[str] = Counter()
        sent: Counter[str] = Counter()
        latencies: list[float] = []

        async def sender(client: Client, room: str, index: int) -> None:
            queue = iter(range(per_sender))
            sent[room] += per_sender

            async def lane() -> None:
                for i in queue:
                    content = f"message {i}"
                    if args.mention_every and (index * per_sender + i) % args.mention_every == 0:
                        who = f"{room}-away{i % args.offline}"
                        mentions[who] += 1
                        content = f"hey @{who}"
                    started = time.perf_counter()
                    await client.emit("message:send", {"roomId": room, "content": content},
                                      timeout=ACK_TIMEOUT_SECS)  # fmt: skip
                    latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(lane() for _ in range(args.window)))

        watcher = asyncio.ensure_future(watch())
        started = time.perf_counter()
        await asyncio.gather(*(sender(c, r, i) for i, (c, r) in enumerate(senders)))
        acked = time.perf_counter()
        await node.tasks.drain(120.0)
        drained = time.perf_counter()
        stop.set()
        await watcher

        jobs = db_jobs(node) - before
        total = per_sender * len(senders)
        print(f"messages acked        {total} over {args.rooms} rooms, {len(senders)} senders, "
              f"window {args.window}")  # fmt: skip
        print(f"send phase            {acked - started:.2f} s ({total / (acked - started):.0f}/s)")
        latencies.sort()
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        print(f"send->ack             p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms")
        print(f"drain after last ack  {1000 * (drained - acked):.0f} ms")
        print(f"peak background tasks {peak_tasks}")
        print(f"peak notification backlog gauge {peak_backlog:.0f}"
              if backlog(node) is not None else "notification backlog gauge: (none)")  # fmt: skip
        print(f"worst loop stall      {1000 * worst_stall:.1f} ms")
        print("database jobs by operation:")
        for op, n in sorted(jobs.items()):
            print(f"  {op:28} {n}")
        notif = sum(n for op, n in jobs.items() if op.startswith("notification."))
        print(f"  {'notification.* total':28} {notif}")
        print("database worker busy by function (s):")
        for fn, secs in busy.most_common():
            print(f"  {fn:28} {secs:.2f}")

        # The outcome: every missed message counted, every mention stored once.
        wrong = 0
        for room in rooms:
            for n in range(args.offline):
                user = f"{room}-away{n}"
                page = await node.notifications.page(user, unread_only=False, limit=100,
                                                     before=None)  # fmt: skip
                notes = page["notifications"]
                missed = [x for x in notes if x["category"] == "chat"]
                got = missed[0]["data"]["count"] if len(missed) == 1 else None
                mentioned = sum(1 for x in notes if x["category"] == "mention")
                if got != sent[room] or mentioned != min(mentions[user], 99):
                    wrong += 1
        print(f"offline members with a wrong outcome: {wrong} of {args.rooms * args.offline}")
        if args.connects:
            await connect_burst(node, config, args, busy, clients)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose(timeout=2.0)
        await node.stop(grace_secs=5.0)


async def connect_burst(
    node: Node, config: Config, args: argparse.Namespace, busy: Counter[str], clients: list[Client]
) -> None:
    users = [f"c{n}" for n in range(args.connects)]

    def store_some() -> None:
        # Straight into the table: the phase is about reading them back.
        rows = [{"user_id": u, "title": f"stored {i}", "data": {"i": i}, "read": i % 3 == 0,
                 "created_at": utcnow()} for i in range(args.stored) for u in users]  # fmt: skip
        for start in range(0, len(rows), 500):
            Notification.insert_many(rows[start : start + 500]).execute()

    await node.db.run("bench.store", store_some)
    await node.tasks.drain(10.0)
    before = db_jobs(node)
    busy.clear()
    fresh = [Client(f"ws://127.0.0.1:{node.port}/ws/notifications", mint_token(config, u))
             for u in users]  # fmt: skip
    clients.extend(fresh)

    async def one(client: Client) -> None:
        await client.connect()
        await client.next_event("notification:recent", timeout=60)

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in fresh))
    secs = time.perf_counter() - started
    jobs = db_jobs(node) - before
    reads = sum(v for k, v in busy.items() if "initial" in k)
    print(f"connections           {len(fresh)} to /ws/notifications, {args.stored} stored each")
    print(f"connect phase         {secs:.2f} s ({len(fresh) / secs:.0f}/s)")
    print(f"initial-state jobs    {jobs['notification.initial']} "
          f"(admission jobs {jobs['user.connect']})")  # fmt: skip
    print(f"initial-state worker busy {1e6 * reads / len(fresh):.0f} µs per connection "
          f"({reads:.2f} s in all)")  # fmt: skip

    # The same reads on their own: CPU of the database thread, no clients, no GIL waits.
    def cpu_per_user(size: int) -> float:
        started = time.thread_time()
        if size == 0:
            for user in users:
                store.initial_state(user, RECENT_ON_CONNECT)
        else:
            for start in range(0, len(users), size):
                store.initial_states(users[start : start + size], RECENT_ON_CONNECT)
        return (time.thread_time() - started) / len(users)

    sizes = (0, 1, 32, 256) if hasattr(store, "initial_states") else (0,)
    for size in sizes:
        runs = sorted([await node.db.run("bench.cpu", cpu_per_user, size) for _ in range(5)])
        what = "one user per call (initial_state)" if size == 0 else f"batches of {size}"
        print(f"  initial-state CPU, {what:34} {1e6 * runs[2]:.0f} µs per connection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--senders-per-room", type=int, default=2)
    parser.add_argument("--offline", type=int, default=10, help="away members per room")
    parser.add_argument("--window", type=int, default=8, help="sends in flight per sender")
    parser.add_argument("--mention-every", type=int, default=10)
    parser.add_argument("--batch-max", type=int, default=256, help="SWITCHBOARD_WRITE_BATCH_MAX")
    parser.add_argument("--connects", type=int, default=500,
                        help="notifications connections opened at once (0: skip)")
    parser.add_argument("--stored", type=int, default=30, help="notifications per such user")
    parser.add_argument("--database-url", default="")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
