"""A lone send's ack from the database thread, right after its commit.

The parts, each against real ones: the database's ``on_commit`` and the
batcher's rule for it (a real SQLite database), the outbound loan on a real
socket pair with a real tornado stream (what a thread's write leaves over
goes before anything the loop writes next), and the whole path through a
real node, read by a raw WebSocket that sees frames in the order they came.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import pytest_asyncio
from playhouse import db_url
from tornado.iostream import IOStream

from server.core import errors, protocol
from server.realtime.outbound import Outbound
from server.store.batch import Batcher
from server.store.db import Database
from tests.test_chat import room_with
from tests.test_presence import RawWebSocket, sample

pytestmark = pytest.mark.asyncio


# ---------------------------------------------------------------------------
# The database's on_commit and the batcher's rule
# ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def db(either_db: Database) -> Database:
    """SQLite, then PostgreSQL, with a table of notes."""
    await either_db.run("notes", either_db.db.execute_sql, "CREATE TABLE note (n INTEGER)")
    return either_db


def rows_seen_elsewhere(db: Database) -> int:
    """What another connection to the database sees: committed rows only."""
    other = db_url.connect(db.url)
    try:
        (count,) = other.execute_sql("SELECT count(*) FROM note").fetchone()
    finally:
        other.close()
    return int(count)


def insert_notes(db: Database) -> Callable[[list[int]], list[int | errors.GatewayError]]:
    """A batch function: each request a row; a negative one fails alone."""

    def store(requests: list[int]) -> list[int | errors.GatewayError]:
        out: list[int | errors.GatewayError] = []
        for n in requests:
            if n < 0:
                out.append(errors.Conflict("negative"))
            else:
                db.db.execute_sql(f"INSERT INTO note (n) VALUES ({db.db.param})", (n,))
                out.append(n)
        return out

    return store


class Commits:
    """What ``on_commit`` callbacks saw, on whatever thread, and a way to wait for them."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self._changed = threading.Condition()

    def __call__(self, n: int) -> None:
        with self._changed:
            self.seen.append(n)
            self._changed.notify_all()

    async def reach(self, done: Callable[[list[int]], bool]) -> list[int]:
        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: done(self.seen), 10)

        assert await asyncio.to_thread(wait), self.seen
        return list(self.seen)


#: The request :func:`barrier` sends.
MARK = 1000


async def barrier(sends: Batcher[int, int], commits: Commits) -> list[int]:
    """Everything ``on_commit`` saw of the batches before: one more batch from idle
    (:data:`MARK`), its own ``on_commit`` seen -- each runs right after its batch."""
    marks = commits.seen.count(MARK)
    await sends.submit(MARK, on_commit=commits)
    return await commits.reach(lambda seen: seen.count(MARK) > marks)


async def test_on_commit_runs_on_a_database_thread_once_the_row_is_committed(db):
    ran: list[tuple[str, int]] = []
    sends: Batcher[int, int] = Batcher(db, "notes", insert_notes(db))
    commits = Commits()

    def committed(n: int) -> None:
        ran.append((threading.current_thread().name, rows_seen_elsewhere(db)))
        commits(n)

    results: list[str] = []
    assert await sends.submit(7, on_result=lambda n: results.append("loop"), on_commit=committed)
    assert await commits.reach(lambda seen: len(seen) == 1) == [7] and results == ["loop"]
    ((thread, rows),) = ran
    assert thread.startswith("db_") and rows == 1  # a database thread, the row committed


async def test_on_commit_runs_for_the_first_request_of_a_batch_that_left_an_idle_batcher(db):
    store = insert_notes(db)
    entered, go = threading.Event(), threading.Event()

    def held(requests: list[int]) -> list[int | errors.GatewayError]:
        if requests == [0]:  # the first batch waits in the database
            entered.set()
            go.wait(10)
        return store(requests)

    sends: Batcher[int, int] = Batcher(db, "notes", held)
    commits = Commits()
    first = asyncio.ensure_future(sends.submit(0, on_commit=commits))
    await asyncio.to_thread(entered.wait, 10)
    # Queued behind it: they leave together, chained from the first batch's
    # settling, while its on_result callbacks have yet to run.
    chained = [asyncio.ensure_future(sends.submit(n, on_commit=commits)) for n in (1, 2)]
    await asyncio.sleep(0)  # the tasks' first steps, queued before this one's
    assert sends.waiting == 2
    go.set()
    assert await first == 0 and [await f for f in chained] == [1, 2]
    assert await barrier(sends, commits) == [0, MARK]
    # Idle again; three in one loop turn make one batch: only its first.
    same_turn = [sends.submit(n, on_commit=commits) for n in (3, 4, 5)]
    assert await asyncio.gather(*same_turn) == [3, 4, 5]
    assert await barrier(sends, commits) == [0, MARK, 3, MARK]
    assert sends.batches == 5


async def test_an_on_commit_that_fails_or_meets_a_refused_request_changes_nothing(db, caplog):
    sends: Batcher[int, int] = Batcher(db, "notes", insert_notes(db))
    commits = Commits()
    with pytest.raises(errors.Conflict):
        await sends.submit(-1, on_commit=commits)
    assert await barrier(sends, commits) == [MARK]
    failed = threading.Event()

    def fails(n: int) -> None:
        failed.set()
        raise RuntimeError("boom")

    results: list[int] = []
    with caplog.at_level(logging.ERROR, logger="switchboard.db"):
        assert await sends.submit(8, on_result=results.append, on_commit=fails) == 8
        assert await asyncio.to_thread(failed.wait, 10)
        await barrier(sends, commits)  # the failure was logged before this batch ran
    assert results == [8] and rows_seen_elsewhere(db) == 3  # 8 and the two marks
    assert any("on_commit failed" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# The outbound loan, on a real socket pair and tornado stream
# ---------------------------------------------------------------------------


class Pair:
    """An attached :class:`Outbound` on one end of a socket pair; the test reads the other."""

    def __init__(self, *, buffers: int | None = None, max_bytes: int = 1 << 20) -> None:
        ours, self.peer = socket.socketpair()
        if buffers is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
            self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        ours.setblocking(False)
        self.stream = IOStream(ours)
        self.slow: list[bool] = []
        self.out = Outbound(max_bytes, on_slow=lambda: self.slow.append(True))
        self.out.attach(self.stream)

    def from_thread(self, frame: bytes, token: object = "loan") -> bool:
        """``write_from_thread`` on another thread, waited for (the loop does not run)."""
        done: list[bool] = []
        thread = threading.Thread(
            target=lambda: done.append(hold_and_write(self.out, frame, token))
        )
        thread.start()
        thread.join(10)
        return done[0]

    async def read(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        self.peer.setblocking(False)
        data = b""
        while len(data) < size:
            data += await loop.sock_recv(self.peer, size - len(data))
        return data

    def close(self) -> None:
        self.stream.close()
        self.peer.close()


def hold_and_write(out: Outbound, frame: bytes, token: object) -> bool:
    """What the database thread does: hold the loan (the outcome would cross now), write."""
    held = out.write_from_thread(frame, token)
    return held() if held is not None else False


@pytest.fixture
def pairs() -> Any:
    made: list[Pair] = []

    def make(**kwargs: Any) -> Pair:
        made.append(Pair(**kwargs))
        return made[-1]

    yield make
    for pair in made:
        pair.close()


def text_frame(size: int, fill: bytes = b"a") -> bytes:
    return protocol.frame(orjson.dumps({"event": "t", "data": {"x": (fill * size).decode()}}))


async def test_a_lent_connection_takes_one_write_from_another_thread(pairs):
    pair = pairs()
    frame = text_frame(40)
    assert not pair.from_thread(frame)  # not lent: the loop writes
    assert pair.out.lend("loan")
    assert not pair.out.lend("loan")  # one loan at a time
    assert pair.from_thread(frame)
    assert not pair.from_thread(frame)  # the loan ended with the write
    assert pair.out.write(b"next")
    assert await pair.read(len(frame) + 4) == frame + b"next"
    assert (pair.out.frames_out, pair.out.bytes_out) == (2, len(frame) + 4)


async def test_a_late_attempt_of_an_ended_loan_writes_nothing_on_the_next_one(pairs):
    """The loop may end a loan and lend again before the thread's attempt comes:
    that attempt finds another loan and leaves it to its own holder."""
    pair = pairs()
    first, second = text_frame(10, b"1"), text_frame(10, b"2")
    assert pair.out.lend("send 1")
    pair.out.release("send 1")  # the loop answered send 1 itself
    assert pair.out.lend("send 2")
    assert not pair.from_thread(first, "send 1")  # send 1's late attempt
    assert pair.from_thread(second, "send 2")
    assert await pair.read(len(second)) == second


async def test_a_released_loan_or_a_queued_stream_leaves_the_write_to_the_loop(pairs):
    pair = pairs(buffers=4096)
    frame = text_frame(40)
    assert pair.out.lend("loan")
    pair.out.release("loan")
    assert not pair.from_thread(frame)
    # Frames queued in the stream (the peer is not reading): the thread's frame
    # would overtake them.
    queued = text_frame(1000)
    while not pair.stream.writing():
        assert pair.out.write(queued)
    assert pair.out.lend("loan")
    assert not pair.from_thread(frame)
    sent = pair.out.bytes_out
    assert await pair.read(sent) == queued * (sent // len(queued))
    assert pair.out.frames_out == sent // len(queued)


async def test_what_a_threads_write_leaves_over_goes_before_the_loops_next_frame(pairs):
    pair = pairs(buffers=4096)
    big = text_frame(200_000, b"b")
    assert pair.out.lend("loan")
    assert pair.from_thread(big)  # far over the socket's buffers: the kernel took part of it
    assert not pair.stream.writing()  # the rest is not in the stream yet ...
    assert pair.out.write(b"tail")  # ... and goes there before this frame
    assert await pair.read(len(big) + 4) == big + b"tail"
    assert pair.slow == []


async def test_what_a_threads_write_leaves_over_goes_out_on_its_own_too(pairs):
    pair = pairs(buffers=4096)
    big = text_frame(200_000, b"c")
    assert pair.out.lend("loan")
    assert pair.from_thread(big)
    assert not pair.out.lend("loan")  # not before the leftover is out of the way
    assert await pair.read(len(big)) == big  # put back by the loop on its own
    assert pair.out.lend("loan")


# ---------------------------------------------------------------------------
# Through a node
# ---------------------------------------------------------------------------


def conn_of(gw: Any, user: str) -> Any:
    (conn,) = gw.node.hub.user_connections(user)
    return conn


async def test_a_lone_sends_ack_leaves_from_the_database_thread(gateway):
    gw = gateway
    gw.node.messages.quiet_secs = 0  # the second send follows a broadcast closely
    alice, bob = await room_with(gw, "general", "alice", "bob", settled=True)
    out = conn_of(gw, "alice").outbound
    writes: list[tuple[str, bool]] = []
    write = out.write_from_thread

    def spy(frame: bytes, token: object, written: Any = None) -> Any:
        name = threading.current_thread().name

        def wrote(size: int) -> None:  # under the loan's lock: before the loop goes on
            writes.append((name, True))
            written(size)

        held = write(frame, token, wrote)
        if held is None:
            writes.append((name, False))
        return held

    out.write_from_thread = spy
    ack = await alice.emit("message:send", {"roomId": "general", "content": "hi"})
    new = await bob.next_event("message:new")
    assert writes == [("db_0", True)]
    assert new["data"]["message"] == ack["message"]
    # An ack the thread wrote is counted like any other.
    sent = sample(gw, "switchboard_frames_sent_total")
    await alice.emit("message:send", {"roomId": "general", "content": "again"})
    await bob.next_event("message:new")
    assert writes[-1] == ("db_0", True)
    assert sample(gw, "switchboard_frames_sent_total") == sent + 2  # the ack, bob's message:new


async def test_a_send_right_after_a_broadcast_keeps_its_ack_on_the_loop(gateway):
    """A busy node (it flushed a broadcast within quiet_secs) writes acks on the loop,
    and does not lend the sender's connection (its writes stay lock-free)."""
    gw = gateway
    alice, bob = await room_with(gw, "general", "alice", "bob", settled=True)
    out = conn_of(gw, "alice").outbound
    writes: list[bool] = []
    write = out.write_from_thread

    def spy(frame: bytes, token: object, written: Any = None) -> Any:
        def wrote(size: int) -> None:  # under the loan's lock: before the loop goes on
            writes.append(True)
            written(size)

        held = write(frame, token, wrote)
        if held is None:
            writes.append(False)
        return held

    out.write_from_thread = spy
    lent: list[bool] = []
    lend = out.lend
    out.lend = lambda token: lent.append(lend(token)) or lent[-1]
    gw.node.messages.quiet_secs = 3600.0  # whatever the hub flushed counts as recent
    assert gw.node.hub.flushed_at > float("-inf")  # the joins' room:user_joined
    ack = await alice.emit("message:send", {"roomId": "general", "content": "busy"})
    assert (await bob.next_event("message:new"))["data"]["message"] == ack["message"]
    gw.node.messages.quiet_secs = 0.0
    await alice.emit("message:send", {"roomId": "general", "content": "quiet"})
    await bob.next_event("message:new")
    assert writes == [True] and lent == [True]  # only the second was lent and written there


async def test_senders_read_every_seq_of_their_room_in_order_with_acks_from_the_thread(gateway):
    """Three raw senders, lone and pipelined sends mixed: each reads the room's
    seqs -- the others' message:new, its own acks -- in increasing order."""
    gw = gateway
    gw.node.messages.quiet_secs = 0  # every idle batch's first ack from the thread
    (owner,) = await room_with(gw, "general", "owner", settled=True)
    raws = [await RawWebSocket.open(gw, f"r{n}") for n in range(3)]
    for raw in raws:
        raw.send_json("room:join", {"roomId": "general"})
        assert (await raw.recv_json())["ok"]
    per_sender = 12
    for burst in (1, 3, 1, 2, 1, 4):  # sends written back to back, then the rest
        for raw in raws:
            for _ in range(burst):
                raw.send_json("message:send", {"roomId": "general", "content": "x"})
    total = 3 * per_sender
    for raw in raws:
        seqs: list[int] = []
        kinds: list[str] = []
        acks = 0
        while acks < per_sender or len(seqs) < total:
            frame = await raw.recv_json()
            if "ack" in frame:
                assert frame["ok"], frame
                acks += 1
                seqs.append(frame["data"]["message"]["seq"])
                kinds.append(f"ack{frame['data']['message']['seq']}")
            elif frame["event"] == "message:new":
                seqs.append(frame["data"]["message"]["seq"])
                kinds.append(f"new{frame['data']['message']['seq']}")
        assert seqs == sorted(seqs) and len(set(seqs)) == total, (raws.index(raw), kinds)
    history = await owner.emit("room:get_messages", {"roomId": "general", "limit": 100})
    assert len(history["messages"]) == total


async def test_a_control_frame_waits_for_the_rest_of_a_frame_the_thread_began(gateway):
    """tornado's ping goes through its frame writer, which waits its turn: the
    peer reads the thread's frame whole, then the ping."""
    gw = gateway
    raw = await RawWebSocket.open(gw, "sam", rcvbuf=4096)
    conn = conn_of(gw, "sam")
    conn.ws_connection.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = orjson.dumps({"event": "test:big", "data": {"x": "d" * 300_000}})
    assert conn.outbound.lend("big")
    done: list[bool] = []
    frame = protocol.frame(payload)
    thread = threading.Thread(
        target=lambda: done.append(hold_and_write(conn.outbound, frame, "big"))
    )
    thread.start()
    thread.join(10)
    assert done == [True]
    assert not conn.ws_connection.stream.writing()  # the rest waits to be put back
    conn.ping(b"probe")  # in this same loop turn: before the put-back's callback
    assert await raw.recv_frame() == (0x1, payload)
    assert await raw.recv_frame() == (0x9, b"probe")


async def test_a_sender_gone_before_its_ack_leaves_the_node_and_the_room_unharmed(gateway, caplog):
    """The thread's write meets a reset socket (or the loop already closed it): the
    message stands, the room gets it, nothing is logged as an error."""
    gw = gateway
    gw.node.messages.quiet_secs = 0
    owner, bob = await room_with(gw, "general", "owner", "bob", settled=True)
    for n in range(5):
        raw = await RawWebSocket.open(gw, "ghost")
        raw.send_json("room:join", {"roomId": "general"})
        assert (await raw.recv_json())["ok"]
        raw.send_json("message:send", {"roomId": "general", "content": f"gone {n}"})
        raw.abort()  # RST: the ack finds no peer
        new = await bob.next_event("message:new")
        assert new["data"]["message"]["content"] == f"gone {n}"
    ack = await owner.emit("message:send", {"roomId": "general", "content": "still here"})
    assert (await bob.next_event("message:new"))["data"]["message"] == ack["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
