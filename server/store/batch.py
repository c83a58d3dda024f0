"""Group commit: requests that wait together go to the database together.

A :class:`Batcher` owns one kind of write (``message:send``, connection
admission). The first request on an idle batcher goes to the database at
once, alone; requests that arrive while a batch is in the database wait and
then go together in the next one, in arrival order, up to ``max_batch``.
There is no timer: a quiet node pays no added latency, a busy one commits
hundreds of requests per transaction instead of one. Nor is there a task:
an idle batcher's first request leaves from a plain loop callback on the
loop's next turn (so requests that arrive in the same turn go together), and
the callback that gets the batch's outcomes back on the loop
(:meth:`~server.store.db.Database.post`) settles each request's future
directly and sends the next batch.

A request may come with ``on_result``: a plain function run with its result
on the loop, in that same callback, in request order, before any caller of
the batch wakes. What must follow the commit at once (``message:send``'s ack
and broadcast) then leaves in the iteration that learns of the commit, a loop
iteration and a task wake-up (~90 µs on a cold core) before the caller resumes.

A request may also come with ``on_commit``: run with its result on the
database thread, right after the commit, before the outcomes cross to the
loop (what it returns, right after they did: see
:meth:`~server.store.db.Database.post`) -- but only for the first request
of a batch that left an idle batcher. Every earlier
batch's ``on_result`` callbacks have then run on the loop (they ran before
this batch was sent), and no other request of this batch precedes it, so
what ``on_commit`` writes (``message:send``'s ack, from the database thread:
one loop wake-up fewer before it leaves) cannot overtake anything an
earlier commit queued. ``on_result`` still runs for that request, and
learns from its own state what ``on_commit`` did (``message:send``: under
the connection's loan, :class:`~server.realtime.outbound.Outbound`).

The batch function runs in a database worker inside one transaction
(:meth:`server.store.db.Database.run`; with ``transaction=False`` it opens its
own, as ``message:send``'s does) and returns one outcome per request, in
order: a result, or the :class:`~server.core.errors.GatewayError` that request
alone fails with. When the batch as a whole fails (the database is down),
every request in it fails with ``SERVICE_UNAVAILABLE`` and none is acked.

Example::

    sends = Batcher(db, "message.send", chat_db.send_messages, max_batch=256)
    sent = await sends.submit(request)   # raises that request's GatewayError
    sent = await sends.submit(request, on_result=ack)   # ack(sent) ran before it returns
    # try_ack(sent) may run on the database thread first (see above)
    sent = await sends.submit(request, on_result=ack, on_commit=try_ack)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Generic, TypeVar

from server.core import errors
from server.store.db import Database

log = logging.getLogger("switchboard.db")

Req = TypeVar("Req")
Res = TypeVar("Res")

#: Most requests one transaction commits. Big enough that a burst of a few
#: thousand sends takes a handful of commits; small enough that one batch's
#: statements stay well under SQLite's 32,766 bound parameters.
DEFAULT_MAX_BATCH = 256

#: What runs on the database thread once committed (see :meth:`Batcher.submit`).
OnCommit = Callable[[Res], Callable[[], object] | None]
#: A waiting request: the request, its caller's future, its ``on_result``, its ``on_commit``.
_Waiting = tuple[Req, asyncio.Future[Res], Callable[[Res], object] | None, OnCommit[Res] | None]


class Batcher(Generic[Req, Res]):
    """Runs ``fn(requests) -> outcomes`` for whatever requests are waiting, one batch at a time."""

    def __init__(
        self,
        db: Database,
        op: str,
        fn: Callable[[list[Req]], Sequence[Res | errors.GatewayError]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        observe: Callable[[int], None] | None = None,
        transaction: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._db = db
        self._op = op
        self._fn = fn
        self._max = max_batch
        self._observe = observe
        #: False: ``fn`` opens its own transaction (:meth:`Database.run_bare`'s terms).
        self._transaction = transaction
        self._waiting: list[_Waiting[Req, Res]] = []
        #: A batch is about to leave or in the database: new requests wait for it.
        self._busy = False
        #: Batches sent to the database so far, and the requests they carried
        #: (for tests and benches of batchers without a metric of their own).
        self.batches = 0
        self.carried = 0

    @property
    def waiting(self) -> int:
        """Requests not yet in the database (for metrics and tests)."""
        return len(self._waiting)

    async def submit(
        self,
        request: Req,
        on_result: Callable[[Res], object] | None = None,
        on_commit: OnCommit[Res] | None = None,
    ) -> Res:
        """Queue ``request``; its result once its batch committed, or its error.

        ``on_result``, when given, is called with the result on the loop as
        soon as the batch's outcome is back, in request order, before this
        (or any other caller of the batch) returns; not for an error. It must
        not block; should it raise, the error is logged and the caller still
        gets its result (the write stands).

        ``on_commit``, when given, may be called with the result on the
        database thread first (see the module docstring for when), and what
        it returns right after the outcomes crossed to the loop; not for an
        error. Neither may block, both must be safe off the loop; should one
        raise, the error is logged and nothing else changes.

        A caller cancelled while it waits leaves its request in the batch:
        the write stands, only the answer (and ``on_result``) is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Res] = loop.create_future()
        self._waiting.append((request, future, on_result, on_commit))
        if not self._busy:
            # Sent on the loop's next turn, not at once: requests that arrive in
            # this turn (the connections one admission batch admitted, frames
            # read in one go) go in the same batch.
            self._busy = True
            loop.call_soon(self._send, True)
        return await future

    def _send(self, idle: bool = False) -> None:
        """The oldest waiting requests, up to ``max_batch``, to the database as one job.

        ``idle``: the batcher had nothing in the database (every earlier
        batch settled), so the first request's ``on_commit`` may run.
        """
        batch = self._waiting[: self._max]
        del self._waiting[: self._max]
        self._busy = True
        self.batches += 1
        self.carried += len(batch)
        if self._observe is not None:
            self._observe(len(batch))
        requests = [req for req, _, _, _ in batch]
        first_commit = batch[0][3] if idle else None
        self._db.post(
            self._op, self._fn, (requests,), partial(self._settle, batch),
            transaction=self._transaction,
            on_commit=None if first_commit is None else partial(_first_committed, first_commit),
        )  # fmt: skip

    def _settle(
        self,
        batch: list[_Waiting[Req, Res]],
        outcomes: Sequence[Res | errors.GatewayError] | None,
        error: BaseException | None,
    ) -> None:
        """On the loop, the batch done: the next one sent, each request's outcome to its caller."""
        self._busy = False
        if self._waiting:  # the database gets going while the callers wake
            self._send()
        if error is not None:
            failure = _batch_failure(self._op, error)
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        assert outcomes is not None  # the batch function returns one per request
        # In request order: the callbacks run and the waiting handlers wake in
        # this order, so what they broadcast leaves in seq order per room.
        for (_, future, on_result, _), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller went away; the write stands
                continue
            if isinstance(outcome, errors.GatewayError):
                future.set_exception(outcome)
                continue
            if on_result is not None:
                try:
                    on_result(outcome)
                except Exception:
                    # The rest of the batch must still settle; the committed
                    # request's caller gets its result and answers as it can.
                    log.exception("%s: a request's on_result failed", self._op)
            future.set_result(outcome)


def _first_committed(
    on_commit: OnCommit[Res], outcomes: Sequence[Res | errors.GatewayError]
) -> Callable[[], object] | None:
    """On the database thread, the batch committed: its first request's ``on_commit``."""
    first = outcomes[0]
    if isinstance(first, errors.GatewayError):
        return None
    return on_commit(first)


def _batch_failure(op: str, exc: BaseException) -> errors.GatewayError:
    """What every request of a failed batch answers: retryable when the database is."""
    if isinstance(exc, errors.GatewayError):  # DatabaseUnavailable, logged by Database
        return exc
    log.error("%s batch failed", op, exc_info=exc)
    return errors.InternalError()
