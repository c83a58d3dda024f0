"""Database set-up and the one way the event loop talks to it.

Sync peewee runs in a few database threads; every :meth:`Database.run` call is
one job that wraps the given function in one transaction, so the loop never
waits on a database call and a transaction never spans two loop turns. Why
not ``playhouse.pwasyncio``: measured in bench/db.py (see README): threads
are as fast for our short transactions, support the same code on SQLite and
PostgreSQL, and keep peewee's well-trodden sync API; the async driver bought
nothing we needed.

Why not a ``ThreadPoolExecutor``: a lone write crosses the thread boundary
twice, and on a quiet node (every message alone) the crossings cost as much
as the SQL. The threads here take jobs from one ``queue.SimpleQueue`` (a
put wakes a waiting thread, nothing else) and hand each outcome back with
one ``loop.call_soon_threadsafe`` to a callback that settles the waiting
callers directly (:meth:`Database.post`), instead of a concurrent future
chained to an asyncio future that wakes a task that wakes the callers.

SQLite gets one worker (it has one writer anyway, and one thread means
no ``database is locked`` retries); PostgreSQL gets ``SWITCHBOARD_DB_WORKERS``
workers (default one per core, at least two), each with a pooled connection.

Example::

    db = Database("sqlite:///switchboard.db")
    await db.start()
    room = await db.run("room.get", chat.get_room, "general")
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ParamSpec, TypeVar, cast

import peewee as pw
from playhouse.db_url import parse
from playhouse.migrations import Runner
from playhouse.pool import PooledPostgresqlDatabase

import models
from models import MODELS
from server.core import errors

log = logging.getLogger("switchboard.db")

P = ParamSpec("P")
T = TypeVar("T")

MIGRATIONS_DIR = os.path.join(os.path.dirname(models.__file__), "migrations")
#: PostgreSQL advisory lock held while migrating (any constant unique to us).
MIGRATION_LOCK_KEY = 0x5B_0A_2D_01
_SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    # WAL + NORMAL: a commit survives a process crash; only an OS crash can
    # lose the last transactions. FULL would cost an fsync per message.
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
    # Never checkpoint on the commit path: past 1,000 WAL pages SQLite would
    # make the commit that crosses it copy them into the database and fsync
    # (milliseconds, the tail of send->ack). :class:`Checkpointer` does it on
    # its own connection and thread instead; commits stay what they were.
    "wal_autocheckpoint": 0,
}
#: How often the checkpointer moves committed WAL pages into the database file.
CHECKPOINT_INTERVAL_SECS = 1.0
#: WAL pages past which the writer truncates the WAL between two jobs (16 MiB
#: at SQLite's 4 KiB pages). Under writes that never pause, every passive
#: checkpoint overlaps a commit and the writer never gets to restart the WAL
#: from its beginning: without this bound it would grow for as long as the
#: writes go on.
WAL_TRUNCATE_PAGES = 4096


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def open_database(url: str, workers: int = 0) -> pw.Database:
    """A peewee database for ``sqlite:///path`` or ``postgresql://...`` URLs."""
    scheme = url.split(":", 1)[0].lower()
    params = parse(url)
    if scheme == "sqlite":
        path = params.pop("database")
        return pw.SqliteDatabase(path, pragmas=_SQLITE_PRAGMAS)
    if scheme in ("postgres", "postgresql"):
        name = params.pop("database")
        pool: pw.Database = PooledPostgresqlDatabase(
            name, max_connections=(workers or default_workers()) + 2, stale_timeout=300, **params
        )
        return pool
    raise ValueError(f"unsupported database URL scheme {scheme!r} (sqlite or postgresql)")


#: Called on the loop once a job ran: its result, or the exception it raised.
Done = Callable[[T | None, BaseException | None], None]


class _Job:
    """One piece of work for a database thread and the way its outcome gets back.

    ``loop`` is None for the thread's own housekeeping (the checkpointer's
    truncations), which nobody waits for. ``dropped`` says the caller gave up
    before the job started (it then never runs, as a cancelled executor job).
    ``committed`` runs on the database thread with the result of a job that
    succeeded, before the outcome leaves for the loop; what it returns, right
    after (:meth:`Database.post`).
    """

    __slots__ = ("committed", "done", "dropped", "loop", "op", "posted", "work")

    def __init__(
        self,
        op: str,
        work: Callable[[], Any],
        loop: asyncio.AbstractEventLoop | None = None,
        done: Done[Any] | None = None,
        dropped: Callable[[], bool] | None = None,
        committed: Callable[[Any], Callable[[], object] | None] | None = None,
    ) -> None:
        self.op = op
        self.work = work
        self.loop = loop
        self.done = done
        self.dropped = dropped
        self.committed = committed
        self.posted = time.perf_counter()


class Checkpointer:
    """Checkpoints a WAL-mode SQLite database from its own thread and connection.

    A ``PASSIVE`` checkpoint every :data:`CHECKPOINT_INTERVAL_SECS`: it copies
    the WAL frames no reader needs into the database file without taking the
    write lock, so it runs alongside the writer's commits (SQLite releases the
    GIL while it copies and fsyncs). A WAL past ``truncate_pages`` is handed
    to ``truncate``, which runs ``TRUNCATE`` on the writer's own thread
    between two jobs (from this connection it would hold the write lock while
    waiting for the writer's open transaction to end, and that transaction
    would wait for the write lock: both stuck until the busy timeout).
    Durability is unchanged: a commit is in the WAL when it returns, whoever
    checkpoints it later.
    """

    def __init__(
        self,
        path: str,
        truncate: Callable[[], object],
        *,
        interval_secs: float = CHECKPOINT_INTERVAL_SECS,
        truncate_pages: int = WAL_TRUNCATE_PAGES,
    ) -> None:
        self._path = path
        self._truncate = truncate
        self._interval = interval_secs
        self._truncate_pages = truncate_pages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-checkpoint", daemon=True)
        #: Checkpoints run so far (for tests).
        self.runs = 0

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, check_same_thread=False)
        try:
            while not self._stop.wait(self._interval):
                try:
                    _, wal_pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                    if wal_pages > self._truncate_pages:
                        self._truncate()
                except sqlite3.Error as exc:  # the next round tries again
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            conn.close()


class Database:
    """The application's database: models bound, its database threads, migrations."""

    def __init__(
        self,
        url: str,
        *,
        workers: int = 0,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.url = url
        self.db = open_database(url, workers)
        self.is_sqlite = isinstance(self.db, pw.SqliteDatabase)
        self.db.bind(MODELS)
        self._workers = 1 if self.is_sqlite else (workers or default_workers())
        #: Jobs in the order they were posted; None tells a thread to stop.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._observe = observe
        self._closed = False
        path = self.db.database if self.is_sqlite else ""
        in_memory = path in ("", ":memory:") or path.startswith("file::memory:")
        self.checkpointer = None if in_memory else Checkpointer(path, self._truncate_soon)

    async def start(self) -> None:
        """Apply pending migrations (creating the tables on first start)."""
        await self.run_bare("migrate", self._migrate)
        if self.checkpointer is not None:
            self.checkpointer.start()

    def _migrate(self) -> None:
        if self.is_sqlite:
            applied = Runner(self.db, directory=MIGRATIONS_DIR).up()
        else:
            # Nodes starting together on a fresh database would race each other's
            # CREATE TABLEs (PostgreSQL raises on concurrent IF NOT EXISTS): one
            # migrates at a time, the others then find nothing left to apply. A
            # session lock on this thread's connection, which the Runner uses too.
            lock = "SELECT pg_advisory_lock(%s)"
            self.db.execute_sql(lock, (MIGRATION_LOCK_KEY,))  # type: ignore[no-untyped-call]
            try:
                applied = Runner(self.db, directory=MIGRATIONS_DIR).up()
            finally:
                unlock = "SELECT pg_advisory_unlock(%s)"
                self.db.execute_sql(unlock, (MIGRATION_LOCK_KEY,))  # type: ignore[no-untyped-call]
        if applied:
            log.info("applied migrations: %s", ", ".join(str(m) for m in applied))

    async def run(self, op: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker thread inside one transaction.

        ``op`` names the operation for metrics and logs.
        """
        return await self._submit(op, fn, args, kwargs, transaction=True)

    async def run_bare(self, op: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Like :meth:`run` without the transaction, for work that manages its own."""
        return await self._submit(op, fn, args, kwargs, transaction=False)

    async def _submit(
        self,
        op: str,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        transaction: bool,
    ) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        settle: Done[T] = partial(_settle, future)
        self.post(op, fn, args, settle, kwargs=kwargs, transaction=transaction, caller=future)
        return await future

    def post(
        self,
        op: str,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        done: Done[T],
        *,
        kwargs: dict[str, Any] | None = None,
        transaction: bool = True,
        caller: asyncio.Future[Any] | None = None,
        on_commit: Callable[[T], Callable[[], object] | None] | None = None,
    ) -> None:
        """Queue ``fn(*args, **kwargs)`` for a database thread; ``done`` gets its outcome.

        The callback form of :meth:`run` for callers that settle many waiters
        at once (:class:`server.store.batch.Batcher`): ``done(result, error)``
        runs on this loop once the job ran, ``error`` mapped as :meth:`run`
        raises it (``DatabaseUnavailable`` when the database is down; a
        ``RuntimeError`` once closed). A ``caller`` future cancelled before
        the job starts drops the job; once started, it runs to its commit.

        ``on_commit(result)``, when given, runs on the database thread once
        the job succeeded -- its transaction committed (``transaction=False``:
        ``fn`` returned, having committed its own) -- before the outcome
        crosses to the loop; what it returns, a callable or None, runs right
        after the outcome was handed over. What must follow the commit at
        once can thus leave without waiting for the loop to wake
        (``message:send``'s ack,
        :meth:`server.realtime.outbound.Outbound.write_from_thread`: it takes
        the connection's loan before the hand-over and writes after it), and
        whatever the loop reads after that write finds ``done`` ahead of it.
        Neither may block, and both must be safe off the loop; what they
        raise is logged and changes nothing else (the commit stands). The
        returned callable runs even when the loop is gone.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            loop.call_soon(done, None, RuntimeError("database is closed"))
            return
        work = partial(self._call, fn, args, kwargs or {}, transaction)
        dropped = None if caller is None else caller.cancelled
        self._put(_Job(op, work, loop, done, dropped, on_commit))

    def _put(self, job: _Job) -> None:
        if not self._threads:  # started by the first job: a Database never used has none
            for n in range(self._workers):
                # Daemon: close() is what finishes the queued work; a process that
                # exits without it has acked none of the jobs it drops.
                thread = threading.Thread(target=self._work, name=f"db_{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
        self._jobs.put(job)

    def _work(self) -> None:
        """A database thread: one job at a time, in the order they were posted."""
        while (job := self._jobs.get()) is not None:
            if job.dropped is not None and job.dropped():
                continue
            result, error = None, None
            try:
                result = job.work()
            except BaseException as exc:  # handed to the caller, as an executor would
                error = exc
            if job.loop is None:
                if error is not None:
                    log.warning("%s failed: %s", job.op, error)
                continue
            after = None
            if error is None and job.committed is not None:
                try:
                    after = job.committed(result)
                except Exception:
                    log.exception("%s: its on_commit failed", job.op)
            try:
                job.loop.call_soon_threadsafe(self._finish, job, result, error)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                pass
            if after is not None:
                try:
                    after()
                except Exception:
                    log.exception("%s: its on_commit failed", job.op)

    def _finish(self, job: _Job, result: Any, error: BaseException | None) -> None:
        """On the loop: the job's metric, its error mapped, its outcome to ``done``."""
        if self._observe is not None:
            self._observe(job.op, time.perf_counter() - job.posted)
        if isinstance(error, (pw.OperationalError, pw.InterfaceError)):
            # Connection-level failures: the database is down or unreachable (or
            # SQLite stayed locked past busy_timeout). Retryable, not a bug.
            log.warning("%s: the database is unavailable: %s", job.op, error)
            unavailable = errors.DatabaseUnavailable()
            unavailable.__cause__ = error
            error = unavailable
        assert job.done is not None  # a job with a loop has a callback
        job.done(result, error)

    def _call(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        transaction: bool,
    ) -> T:
        db = self.db
        # Not connect(reuse_if_open=True): it takes the database's lock on every
        # job (a cold ~20 µs) to learn what this thread's own state says.
        if db.is_closed():
            db.connect()
        try:
            if not transaction:
                return fn(*args, **kwargs)
            # transaction(), what atomic() hands an outermost block to, minus its
            # wrapper; an atomic() inside the job still nests as a savepoint.
            with db.transaction():
                return fn(*args, **kwargs)
        finally:
            if not self.is_sqlite:
                # Hand the connection back to the pool between jobs.
                db.close()

    def _truncate_soon(self) -> None:
        """Queue a truncation for the writer thread, between two jobs (from the checkpointer)."""
        self._put(_Job("wal.truncate", partial(self._call, self._truncate, (), {}, False)))

    def _truncate(self) -> None:
        """Checkpoint the whole WAL and cut it to zero (a job of its own, no transaction)."""
        self.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()  # type: ignore[no-untyped-call]

    async def ping(self) -> bool:
        """Really ask the database (``SELECT 1``); False when it does not answer."""
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that
            # lands as the ping completes, and the cancelled caller (a periodic
            # health task being stopped) would carry on and never finish.
            async with asyncio.timeout(2.0):
                await self.run_bare("ping", self._ping)
            return True
        except errors.DatabaseUnavailable:
            return False  # logged by _submit
        except Exception as exc:
            log.warning("database ping failed: %s", exc)
            return False

    def _ping(self) -> None:
        self.db.execute_sql("SELECT 1").fetchone()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Finish queued work, then close; called at shutdown."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        # First: it hands truncations to the threads stopped below.
        if self.checkpointer is not None and self.checkpointer.started:
            await loop.run_in_executor(None, self.checkpointer.stop)
        # Queued after every pending job: runs once in-flight writes are done.
        closed: asyncio.Future[None] = loop.create_future()
        self._put(_Job("close", self._close_connections, loop, partial(_settle, closed)))
        for _ in self._threads:
            self._jobs.put(None)
        await closed
        await loop.run_in_executor(None, self._join)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _close_connections(self) -> None:
        if not self.db.is_closed():
            self.db.close()
        if isinstance(self.db, PooledPostgresqlDatabase):
            self.db.close_all()


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # its caller went away; the job ran all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(cast(T, result))
