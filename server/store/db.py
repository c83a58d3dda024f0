"""Database set-up and the one way the event loop talks to it.

Sync peewee runs in a small thread pool; every :meth:`Database.run` call is
one executor job that wraps the given function in one transaction, so the
loop never waits on a database call and a transaction never spans two
loop turns. Why not ``playhouse.pwasyncio``: measured in bench/db.py (see
README): the thread pool is as fast for our short transactions, supports
the same code on SQLite and PostgreSQL, and keeps peewee's well-trodden
sync API; the async driver bought nothing we needed.

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
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

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
    """The application's database: models bound, a thread pool, migrations."""

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
        workers = 1 if self.is_sqlite else (workers or default_workers())
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="db")
        self._observe = observe
        self._closed = False
        path = self.db.database if self.is_sqlite else ""
        in_memory = path in ("", ":memory:") or path.startswith("file::memory:")
        self.checkpointer = (
            None if in_memory else Checkpointer(path, lambda: self._executor.submit(self._truncate))
        )

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
        if self._closed:
            raise RuntimeError("database is closed")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(
                self._executor, self._call, fn, args, kwargs, transaction
            )
        except (pw.OperationalError, pw.InterfaceError) as exc:
            # Connection-level failures: the database is down or unreachable (or
            # SQLite stayed locked past busy_timeout). Retryable, not a bug.
            log.warning("%s: the database is unavailable: %s", op, exc)
            raise errors.DatabaseUnavailable() from exc
        finally:
            if self._observe is not None:
                self._observe(op, time.perf_counter() - started)

    def _call(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        transaction: bool,
    ) -> T:
        db = self.db
        db.connect(reuse_if_open=True)
        try:
            if not transaction:
                return fn(*args, **kwargs)
            with db.atomic():
                return fn(*args, **kwargs)
        finally:
            if not self.is_sqlite:
                # Hand the connection back to the pool between jobs.
                db.close()

    def _truncate(self) -> None:
        """Checkpoint the whole WAL and cut it to zero, on the writer's thread (no transaction)."""
        self.db.connect(reuse_if_open=True)
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
        # First: it hands truncations to the executor shut down below.
        if self.checkpointer is not None and self.checkpointer.started:
            await loop.run_in_executor(None, self.checkpointer.stop)
        # Queued after every pending job: runs once in-flight writes are done.
        await loop.run_in_executor(self._executor, self._close_connections)
        await loop.run_in_executor(None, self._executor.shutdown, True)

    def _close_connections(self) -> None:
        if not self.db.is_closed():
            self.db.close()
        if isinstance(self.db, PooledPostgresqlDatabase):
            self.db.close_all()
