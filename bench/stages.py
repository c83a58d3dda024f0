"""Where a lone ``message:send`` spends its time in the node, stage by stage.

Prints figures; asserts nothing. Runs ``bench.peers``' latency workload (20
rooms of 10, every member sending, 200 msg/s for 10 s) against one bench
node whose code is wrapped with timestamp probes (``--stages``: see
:func:`install`), then prints, for the sends whose stages did not overlap
another send's, the median time between consecutive probes, and inside the
database job the time of each statement and of the Python between them::

    .venv/bin/python -m bench.stages [--seconds 10] [--rate 200] [--runs 1]

The stages, in order (each row is the time from the previous probe):

* ``readable`` -- the sender's socket polled readable (tornado's ``_handle_events``);
* ``frame`` -- the handler has the text frame (``GatewayHandler.on_message``);
* ``envelope`` -- decoded, at ``handle_envelope``'s start;
* ``schema`` / ``schema done`` -- the event's schema load;
* ``service`` -- ``Messages.send`` entered; ``batcher`` -- its ``submit``;
* ``to db`` -- ``Database.post`` (the batch leaves the loop);
* ``db thread`` / ``db done`` -- the job starts and ends on the writer thread;
* ``back`` -- the loop has the job's result (``Database._finish``);
* ``publish`` / ``published`` -- the batcher's ``on_result`` queues the broadcast;
* ``flush`` / ``written`` -- the hub's flush writes the room's broadcast;
* ``notify`` / ``notified`` -- after the writes, the notification work queued;
* ``resumed`` -- the handler's task wakes (``submit`` returns);
  ``answered`` -- ``handle_envelope`` ends;

and on the database thread, alongside ``back`` and what follows it (the
outcome crosses to the loop first, so the two threads' probes interleave):

* ``ack`` / ``acked`` -- the thread's write of the ack (``Outbound._write_held``:
  a lone send on a quiet node, the connection lent), from ``db done``.

Each probe is two clock reads and a list append (~1 µs). The client's
figures (send→ack p50/p99) are printed too: the server's part is the rows
up to ``acked`` (``total (readable to acked)``), the rest is the client, the
kernel and waking up.
"""

from __future__ import annotations

import argparse
import atexit
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

#: Set (to a file path) in the bench node's environment (not SWITCHBOARD_*, which
#: ``bench_env`` drops): the probes are installed, their marks dumped there at exit.
STAGES_ENV = "BENCH_STAGES_FILE"

ORDER = [
    "readable", "frame", "envelope", "schema", "schema done", "service", "batcher", "to db",
    "db thread", "db done", "back", "publish", "published", "flush", "written",
    "notify", "notified", "resumed", "answered",
]  # fmt: skip
#: The database thread's write of the ack, after ``db done``, beside the loop's stages.
THREAD = ["ack", "acked"]

_marks: list[tuple[str, int]] = []


def _mark(tag: str) -> None:
    _marks.append((tag, time.perf_counter_ns()))


def _around(owner: Any, name: str, before: str, after: str | None = None) -> None:
    orig = getattr(owner, name)

    def probe(*args: Any, **kwargs: Any) -> Any:
        _mark(before)
        try:
            return orig(*args, **kwargs)
        finally:
            if after is not None:
                _mark(after)

    setattr(owner, name, probe)


def _around_async(owner: Any, name: str, before: str | None, after: str | None = None) -> None:
    orig = getattr(owner, name)

    async def probe(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            _mark(before)
        try:
            return await orig(*args, **kwargs)
        finally:
            if after is not None:
                _mark(after)

    setattr(owner, name, probe)


def install(path: str) -> None:
    """Wrap the send path's functions with probes; dump the marks to ``path`` at exit."""
    import peewee as pw
    import tornado.iostream as ti

    import handlers.base as hb
    import models
    import models.chat
    import server.realtime.hub as hub
    import server.realtime.outbound as so
    import server.services.messages as sm
    import server.services.notify as sn
    import server.store.batch as sb
    import server.store.db as sdb

    _around_async(hb.GatewayHandler, "on_message", "frame")
    handle_events = ti.BaseIOStream._handle_events

    def on_events(self: Any, fd: Any, events: int) -> None:
        if events & self.io_loop.READ:
            _mark("readable")
        handle_events(self, fd, events)

    ti.BaseIOStream._handle_events = on_events  # type: ignore[method-assign]
    _around_async(hb.GatewayHandler, "handle_envelope", "envelope", "answered")
    _around(hb, "load", "schema", "schema done")
    _around_async(sm.Messages, "send", "service")
    _around_async(sb.Batcher, "submit", "batcher", "resumed")
    _around(sdb.Database, "post", "to db")
    _around(sdb.Database, "_finish", "back")
    _around(sdb.Database, "_call", "db thread", "db done")
    _around(so.Outbound, "_write_held", "ack", "acked")
    _around(hub.Hub, "publish", "publish", "published")
    _around(sn.NotificationService, "message_sent", "notify", "notified")
    flush = hub.Hub.flush

    def on_flush(self: Any) -> int:
        if not self._outbox:
            return flush(self)
        _mark("flush")
        written = flush(self)
        _mark("written")
        return written

    hub.Hub.flush = on_flush  # type: ignore[method-assign]
    execute_sql = pw.Database.execute_sql

    def on_sql(self: Any, sql: str, *args: Any, **kwargs: Any) -> Any:
        _mark("sql")
        try:
            return execute_sql(self, sql, *args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            _mark("sql " + sql.split(None, 1)[0])

    pw.Database.execute_sql = on_sql  # type: ignore[method-assign]
    # The plain-SQL helper runs on the driver's cursor, past execute_sql: probed on its own
    # (models.sql_rows looks it up in its module at every call).
    sql_execute = models.sql_execute

    def on_plain_sql(sql: str, params: Any) -> Any:
        _mark("sql")
        try:
            return sql_execute(sql, params)
        finally:
            _mark("sql " + sql.split(None, 1)[0])

    models.sql_execute = on_plain_sql
    # A lone send's hand-run BEGIN / COMMIT (models.chat._send_lone_sqlite) call it by name.
    models.chat.sql_execute = on_plain_sql  # type: ignore[attr-defined]
    commit = pw.Database.commit

    def on_commit(self: Any) -> Any:
        _mark("sql")
        try:
            return commit(self)
        finally:
            _mark("sql COMMIT")

    pw.Database.commit = on_commit  # type: ignore[method-assign]

    def dump() -> None:
        with open(path, "w") as f:
            f.writelines(f"{tag}\t{t}\n" for tag, t in _marks)

    atexit.register(dump)


# ---------------------------------------------------------------------------
# Reading the marks
# ---------------------------------------------------------------------------


def read_marks(path: str) -> list[tuple[str, int]]:
    with open(path) as f:
        return [(tag, int(t)) for tag, t in (line.rstrip("\n").split("\t") for line in f)]


def sends(marks: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """The sends whose probes came in exactly ``ORDER`` (no other send in between) with
    the thread's ``THREAD`` probes after ``db done``: ``ORDER``'s marks, then
    ``THREAD``'s, then the database job's statement probes under their own tags."""
    out: list[list[tuple[str, int]]] = []
    cur: list[tuple[str, int]] = []
    sql: list[tuple[str, int]] = []
    thread: list[tuple[str, int]] = []
    after_job = ORDER.index("db done")
    for tag, t in marks:
        if tag == ORDER[0]:
            cur, sql, thread = [(tag, t)], [], []
        elif not cur:
            continue
        elif tag.startswith("sql"):
            if cur[-1][0] == "db thread":
                sql.append((tag, t))
        elif tag in THREAD:
            if len(cur) > after_job and tag == THREAD[len(thread)]:
                thread.append((tag, t))
            else:
                cur = []
        elif tag == ORDER[len(cur)]:
            cur.append((tag, t))
            if len(cur) == len(ORDER) and len(thread) == len(THREAD):
                out.append(cur + thread + sql)
                cur = []
            elif len(cur) == len(ORDER):
                cur = []  # the loop wrote the ack: another path
        else:
            cur = []
    return out


def _median_us(values: list[int]) -> float:
    return statistics.median(values) / 1000


def table(clean: list[list[tuple[str, int]]]) -> list[tuple[str, float]]:
    """``(stage, median µs since the previous probe)`` in order; then the job's statements."""
    rows = [
        (ORDER[i], _median_us([s[i][1] - s[i - 1][1] for s in clean])) for i in range(1, len(ORDER))
    ]
    done, ack, acked = ORDER.index("db done"), len(ORDER), len(ORDER) + 1
    rows.append(("ack (thread)", _median_us([s[ack][1] - s[done][1] for s in clean])))
    rows.append(("acked (thread)", _median_us([s[acked][1] - s[ack][1] for s in clean])))
    rows.append(("total (readable to acked)", _median_us([s[acked][1] - s[0][1] for s in clean])))
    written = ORDER.index("written")
    total = _median_us([s[written][1] - s[0][1] for s in clean])
    rows.append(("total (readable to written)", total))
    # The database job's statements: the commonest sequence (a send's batch).
    first = len(ORDER) + len(THREAD)
    by_shape: dict[tuple[str, ...], list[list[tuple[str, int]]]] = defaultdict(list)
    for s in clean:
        by_shape[tuple(tag for tag, _ in s[first:])].append(s)
    if by_shape:
        shape, group = max(by_shape.items(), key=lambda kv: len(kv[1]))
        start = ORDER.index("db thread")
        for j, tag in enumerate(shape):
            label = "  python before" if tag == "sql" else "  " + tag[4:]
            rows.append((
                label,
                _median_us([s[first + j][1] - (s[first + j - 1][1] if j else s[start][1])
                            for s in group]),
            ))  # fmt: skip
        end = ORDER.index("db done")
        rows.append(("  python after", _median_us([s[end][1] - s[-1][1] for s in group])))
    return rows


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(seconds: float, rate: float) -> tuple[dict[str, float], list[tuple[str, float]], int]:
    """One latency run against a probed node: the client's figures, the stage table, sends."""
    from bench.peers.driver import Sizes, run_latency
    from bench.peers.servers import FAMILIES

    sz = Sizes(False)
    sz.rate, sz.rate_secs = rate, seconds
    family = FAMILIES["switchboard"]
    fd, path = _temp_path()
    os.environ[STAGES_ENV] = path
    try:
        server = family.start()
    finally:
        del os.environ[STAGES_ENV]
    try:
        figures = run_latency(family, server, sz)
    finally:
        server.stop()
    clean = sends(read_marks(path))
    os.close(fd)
    os.unlink(path)
    skip = len(clean) // 10  # the first sends warm the node up
    return figures, table(clean[skip:]), len(clean) - skip


def _temp_path() -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="switchboard-stages-", suffix=".tsv")


def _print(figures: dict[str, float], rows: list[tuple[str, float]], n: int) -> None:
    print(f"client: send→ack p50 {figures['ack_p50_ms']:.2f} ms,"
          f" p99 {figures['ack_p99_ms']:.1f} ms;"
          f" send→deliver p50 {figures['deliver_p50_ms']:.2f} ms;"
          f" server CPU {figures['server_us_per_message']:,.0f} µs/message")  # fmt: skip
    print(f"server, median of {n} sends that did not overlap (µs since the previous probe):")
    for label, us in rows:
        print(f"  {label:28s} {us:8.1f}")


def main(argv: list[str] | None = None, out: Callable[..., None] = _print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s in all")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    for i in range(args.runs):
        if args.runs > 1:
            print(f"run {i + 1} of {args.runs}")
        out(*run(args.seconds, args.rate))
    print(f"load average at the end: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
