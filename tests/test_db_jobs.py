"""server/store/db.py: the database threads and the way each job's outcome gets back.

A job posted with :meth:`Database.post` runs on a ``db_*`` thread, in the
order posted; its outcome comes back to a callback on the loop, errors mapped
as :meth:`Database.run` raises them. Real SQLite databases in a temporary
directory; the writer is held with a job that waits on an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import peewee as pw
import pytest
import pytest_asyncio

from models import Ban
from server.core import errors
from server.store.batch import Batcher
from server.store.db import Database
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    await database.start()
    yield database
    await database.close()


def outcome_on_the_loop(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[Any], Any]:
    """A future set to ``(result, error, thread name)`` by the ``done`` callback it returns."""
    got: asyncio.Future[Any] = loop.create_future()

    def done(result: Any, error: BaseException | None) -> None:
        got.set_result((result, error, threading.current_thread().name))

    return got, done


def thread_name() -> str:
    return threading.current_thread().name


def held(db: Database) -> tuple[threading.Event, asyncio.Future[None]]:
    """The writer busy until the returned event is set (the future: the hold's end)."""
    release = threading.Event()
    holder = asyncio.ensure_future(db.run_bare("test.hold", release.wait, 30.0))
    return release, holder  # type: ignore[return-value]


async def test_a_posted_job_runs_on_a_db_thread_and_its_outcome_comes_back_on_the_loop(
    db: Database,
) -> None:
    got, done = outcome_on_the_loop(asyncio.get_running_loop())
    db.post("test.name", thread_name, (), done)
    result, error, called_on = await got
    assert error is None
    assert result.startswith("db_") and result != called_on
    assert called_on == threading.current_thread().name


async def test_a_connection_failure_reaches_the_callback_as_database_unavailable(
    db: Database,
) -> None:
    def broken() -> None:
        raise pw.OperationalError("server closed the connection unexpectedly")

    got, done = outcome_on_the_loop(asyncio.get_running_loop())
    db.post("test.broken", broken, (), done)
    result, error, _ = await got
    assert result is None
    assert isinstance(error, errors.DatabaseUnavailable)
    assert isinstance(error.__cause__, pw.OperationalError)
    with pytest.raises(errors.DatabaseUnavailable):
        await db.run("test.broken", broken)


async def test_jobs_run_in_the_order_posted_and_close_finishes_them_first(db: Database) -> None:
    ran: list[int] = []
    settled: list[int] = []
    release, holder = held(db)
    await asyncio.sleep(0)  # the hold's task posts its job
    for n in range(20):
        db.post("test.order", ran.append, (n,), lambda _r, _e, n=n: settled.append(n))
    closing = asyncio.ensure_future(db.close())
    release.set()
    await holder
    await closing
    assert ran == list(range(20))
    assert settled == list(range(20))  # every callback ran before close returned
    got, done = outcome_on_the_loop(asyncio.get_running_loop())
    db.post("test.late", thread_name, (), done)
    result, error, _ = await got
    assert result is None and isinstance(error, RuntimeError)


async def test_a_caller_cancelled_before_its_job_starts_drops_the_job(db: Database) -> None:
    ran: list[str] = []
    release, holder = held(db)
    queued = asyncio.ensure_future(db.run("test.dropped", ran.append, "dropped"))
    await asyncio.sleep(0)  # both jobs posted, the second behind the hold
    queued.cancel()
    release.set()
    await holder
    await db.run("test.after", ran.append, "after")
    assert ran == ["after"]
    assert queued.cancelled()


async def test_a_caller_cancelled_once_its_job_started_leaves_the_write_standing(
    db: Database,
) -> None:
    started, release = threading.Event(), threading.Event()

    def write() -> None:
        db.db.execute_sql("CREATE TABLE standing (n INTEGER)")
        started.set()
        release.wait(30.0)

    job = asyncio.ensure_future(db.run("test.write", write))
    await asyncio.to_thread(started.wait, 30.0)
    job.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await job

    def tables() -> list[str]:
        return [t for (t,) in db.db.execute_sql("SELECT name FROM sqlite_master").fetchall()]

    assert "standing" in await db.run("test.tables", tables)


async def test_a_batcher_sends_what_arrived_in_one_turn_together_without_a_task_of_its_own(
    db: Database,
) -> None:
    seen: list[list[int]] = []

    def double(requests: list[int]) -> list[int]:
        seen.append(list(requests))
        return [2 * n for n in requests]

    batcher: Batcher[int, int] = Batcher(db, "test.double", double)
    release, holder = held(db)
    await asyncio.sleep(0)  # the hold's job first: the batches wait behind it
    first = asyncio.gather(*(batcher.submit(n) for n in (1, 2, 3)))
    await eventually(lambda: batcher.batches == 1, what="the first batch in the database")
    later = [asyncio.ensure_future(batcher.submit(n)) for n in (4, 5)]
    await eventually(lambda: batcher.waiting == 2, what="two requests waiting")
    # Only the callers wait: the batch in the database is a job, not a task on the loop.
    callers = {t for t in asyncio.all_tasks() if t.get_coro().__name__ == "submit"}  # type: ignore[union-attr]
    assert asyncio.all_tasks() == callers | {holder, asyncio.current_task()}
    release.set()
    assert await first == [2, 4, 6]
    assert [await f for f in later] == [8, 10]
    assert seen == [[1, 2, 3], [4, 5]]


async def test_on_result_runs_in_request_order_before_any_caller_of_the_batch_wakes(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Not for an error outcome; one that raises is logged and its caller still gets its result."""

    def outcomes(requests: list[int]) -> list[int | errors.GatewayError]:
        return [errors.RoomNotFound() if n == 2 else 10 * n for n in requests]

    batcher: Batcher[int, int] = Batcher(db, "test.results", outcomes)
    order: list[str] = []

    def on_result(result: int) -> None:
        order.append(f"on_result {result}")
        if result == 40:
            raise RuntimeError("a broken callback")

    async def caller(n: int) -> int | str:
        try:
            result: int | str = await batcher.submit(n, on_result)
        except errors.GatewayError as exc:
            result = exc.code
        order.append(f"resumed {n}")
        return result

    got = await asyncio.gather(*(caller(n) for n in (1, 2, 3, 4)))
    assert got == [10, "ROOM_NOT_FOUND", 30, 40]
    assert batcher.batches == 1
    assert order == [
        "on_result 10", "on_result 30", "on_result 40",
        "resumed 1", "resumed 2", "resumed 3", "resumed 4",
    ]  # fmt: skip
    assert "test.results: a request's on_result failed" in caplog.text


async def test_a_job_commits_whole_or_not_at_all_and_an_atomic_inside_it_is_undone_alone(
    either_db: Database,
) -> None:
    """A job's transaction and an ``atomic()`` nested in it (a savepoint), as the send
    path uses them (``send_messages``' retry on PostgreSQL, ``_send_alone``)."""

    def ban(user_id: str) -> None:
        Ban.create(user_id=user_id, banned_by="test")

    def nested() -> None:
        ban("before")
        with contextlib.suppress(pw.IntegrityError), either_db.db.atomic():
            ban("inner")
            ban("before")  # unique: undoes the savepoint, not the job
        ban("after")

    def failing() -> None:
        ban("lost")
        raise ValueError("the job fails")

    await either_db.run("test.nested", nested)
    with pytest.raises(ValueError):
        await either_db.run("test.failing", failing)
    banned = await either_db.run("test.read", lambda: sorted(b.user_id for b in Ban.select()))
    assert banned == ["after", "before"]
