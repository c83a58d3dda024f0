"""server/listener.py and the HTTP timeouts: bounded handshakes, fd exhaustion.

Raw TCP clients play the attacker (connect and send nothing, or half a
request line); the node runs in-process on port 0, or as the real CLI in a
subprocess where the test needs its own ``RLIMIT_NOFILE``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from pathlib import Path

import pytest

from server.app import MAX_HTTP_BODY_BYTES
from server.listener import ACCEPT_BACKOFF_MAX_SECS
from tests.support.waiting import eventually
from tests.test_shutdown import ServerProcess

HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"
FD_EXHAUSTED = "Too many open files"

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_by_node(conn: Conn, timeout: float) -> bool:
    """Wait (at most ``timeout``) for the node to close ``conn``; True if it did."""
    reader, _ = conn
    try:
        async with asyncio.timeout(timeout):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def response_head(conn: Conn, timeout: float = 5.0) -> bytes:
    """Send GET /health on ``conn``: the response's status line and headers, b"" if closed.

    Raises TimeoutError when no answer comes within ``timeout``.
    """
    reader, writer = conn
    writer.write(HEALTH_REQUEST)
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)  # keep the stream at a request boundary
            return head
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
        return b""


async def health(port: int) -> bytes:
    conn = await connect(port)
    try:
        return await response_head(conn)
    finally:
        await close(conn)


async def close(conn: Conn) -> None:
    _, writer = conn
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionResetError, BrokenPipeError):
        pass


# -- header timeout ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_silent_half_open_and_idle_keepalive_connections_close_after_the_header_timeout(
    gateway_factory,
):
    gw = await gateway_factory(header_timeout=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    silent = await connect(gw.port)
    half = await connect(gw.port)
    half[1].write(b"GET /health HT")  # half a request line, then nothing
    idle = await connect(gw.port)
    assert (await response_head(idle)).startswith(b"HTTP/1.1 200")  # then idle, kept alive
    for conn in (silent, half, idle):
        assert await closed_by_node(conn, timeout=5.0)
    # Given the timeout, not cut at once (and not by the per-address bound).
    assert loop.time() - started >= 0.4
    for conn in (silent, half, idle):
        await close(conn)


@pytest.mark.asyncio
async def test_an_upgraded_websocket_outlives_the_header_timeout(gateway_factory):
    gw = await gateway_factory(header_timeout=0.5)
    alice = await gw.connect("alice")
    # A silent raw connection opened after the upgrade: once the node has
    # closed it, alice's socket has been idle longer than the header timeout.
    silent = await connect(gw.port)
    assert await closed_by_node(silent, timeout=5.0)
    ack = await alice.emit("system:ping", {})
    assert "serverTime" in ack
    assert not alice.closed
    await close(silent)


@pytest.mark.asyncio
async def test_websockets_keep_the_direct_write_path(gateway):
    """The accept loop's stream subclass is still a plain TCP stream to the handler."""
    await gateway.connect("alice")
    (handler,) = gateway.node.hub.connections.values()
    assert handler.outbound.direct


# -- per-address bound ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_one_address_cannot_hold_more_tcp_connections_than_the_bound(gateway_factory, caplog):
    gw = await gateway_factory(
        max_connections_per_ip=2, max_tcp_connections_per_ip=4, header_timeout=30.0
    )
    registry = gw.node.registry
    held = [await connect(gw.port) for _ in range(4)]  # half-open: nothing sent
    with caplog.at_level(logging.INFO, logger="switchboard.listener"):
        extra = [await connect(gw.port) for _ in range(3)]
        for conn in extra:
            # Closed at accept, long before the 30 s header timeout.
            assert await closed_by_node(conn, timeout=5.0)
        # The held ones are still served, and /health from the same address is refused.
        assert (await response_head(held[0])).startswith(b"HTTP/1.1 200")
        assert await health(gw.port) == b""
    assert registry.get_sample_value("switchboard_tcp_refused_total", {"reason": "ip_limit"}) == 4
    refusals = [r for r in caplog.records if "refused a TCP connection" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # one line per address
    assert "127.0.0.1" in refusals[0].getMessage()

    # Closing connections frees the address's slots: /health answers again.
    for conn in held[:2]:
        await close(conn)
    await eventually(
        lambda: health(gw.port), timeout=5.0, what="/health answered after closing two"
    )
    assert (await health(gw.port)).startswith(b"HTTP/1.1 200")
    for conn in (*held[2:], *extra):
        await close(conn)


@pytest.mark.asyncio
async def test_a_websocket_holds_its_tcp_slot_until_it_closes(gateway_factory):
    gw = await gateway_factory(max_connections_per_ip=1, max_tcp_connections_per_ip=1)
    alice = await gw.connect("alice")
    assert await health(gw.port) == b""  # the upgraded connection still counts
    await alice.aclose()
    await eventually(
        lambda: health(gw.port), timeout=5.0, what="/health answered after the WebSocket closed"
    )


@pytest.mark.asyncio
async def test_a_trusted_proxy_is_exempt_from_the_tcp_bound(gateway_factory):
    gw = await gateway_factory(
        max_connections_per_ip=2, max_tcp_connections_per_ip=2,
        trusted_proxies="127.0.0.1/32", header_timeout=30.0,
    )  # fmt: skip
    held = [await connect(gw.port) for _ in range(6)]
    assert (await response_head(held[-1])).startswith(b"HTTP/1.1 200")
    assert (await health(gw.port)).startswith(b"HTTP/1.1 200")
    assert (
        gw.node.registry.get_sample_value("switchboard_tcp_refused_total", {"reason": "ip_limit"})
        == 0
    )
    # The /health connection's close reaches the node a moment later.
    await eventually(
        lambda: gw.node.registry.get_sample_value("switchboard_tcp_connections") == 6,
        timeout=5.0, what="six open TCP connections",
    )  # fmt: skip
    for conn in held:
        await close(conn)


# -- file descriptors (the real CLI in a subprocess) -----------------------------------------

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/limits").exists(), reason="reads /proc/<pid>/limits (Linux)"
)


def open_files_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no 'Max open files' line")


@needs_proc
@pytest.mark.asyncio
async def test_serve_raises_the_soft_fd_limit_to_the_hard_limit(tmp_path):
    soft_start = 256
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= soft_start:
        pytest.skip(f"hard open-file limit {hard} leaves nothing to raise")

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft_start, hard))

    server = await ServerProcess.start(tmp_path, preexec_fn=lower_soft_limit)
    try:
        soft_now, hard_now = open_files_limit(server.proc.pid)
        assert soft_now == hard_now
        await eventually(
            lambda: f"open-file limit raised from {soft_start} to" in "".join(server.stderr),
            timeout=5.0, what="the INFO line naming the new limit",
        )  # fmt: skip
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait(timeout=10) == 0, "".join(server.stderr)


# Low enough to reach in a few dozen connections; soft == hard so serve cannot lift it.
FD_CAP = 64


@needs_proc
@pytest.mark.asyncio
async def test_fd_exhaustion_logs_one_line_and_the_node_answers_again(tmp_path):
    def cap_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_CAP, FD_CAP))

    server = await ServerProcess.start(tmp_path, preexec_fn=cap_fds, header_timeout="60")

    def stderr() -> str:
        return "".join(server.stderr)

    held: list[Conn] = []
    try:
        assert open_files_limit(server.proc.pid) == (str(FD_CAP), str(FD_CAP))
        # Each answered /health keeps its keep-alive connection (a descriptor on
        # the node); the first one left unanswered is where the node ran out.
        while True:
            assert len(held) < 4 * FD_CAP, "the node never ran out of descriptors"
            conn = await connect(server.port)
            try:
                head = await response_head(conn, timeout=3.0)
            except TimeoutError:
                head = None
            if head:
                held.append(conn)
                continue
            assert head is None, "closed instead of left waiting in the backlog"
            await eventually(lambda: FD_EXHAUSTED in stderr(), timeout=5.0,
                             what="the fd-exhaustion warning")  # fmt: skip
            pending = conn
            break
        # By now a storm would be thousands of lines (the probe saw tens of MB in 5 s).
        assert stderr().count(FD_EXHAUSTED) <= 2, stderr()[-2000:]
        assert "Traceback" not in stderr(), stderr()[-4000:]

        for conn in held:
            await close(conn)
        held = []
        # The request waiting in the backlog is served once descriptors are free
        # (accepting resumes within ACCEPT_BACKOFF_MAX_SECS).
        head = await response_head_already_sent(pending, timeout=ACCEPT_BACKOFF_MAX_SECS + 9)
        assert head.startswith(b"HTTP/1.1 200"), stderr()[-2000:]
        await close(pending)
        assert (await health(server.port)).startswith(b"HTTP/1.1 200")
    finally:
        for conn in held:
            await close(conn)
        server.proc.send_signal(signal.SIGTERM)
        code = await server.wait(timeout=10)
    assert code == 0, stderr()[-2000:]
    assert stderr().count(FD_EXHAUSTED) <= 2, stderr()[-2000:]
    assert "Traceback" not in stderr(), stderr()[-4000:]


async def response_head_already_sent(conn: Conn, timeout: float) -> bytes:
    """The response head to a request written earlier on ``conn``."""
    reader, _ = conn
    async with asyncio.timeout(timeout):
        return await reader.readuntil(b"\r\n\r\n")


@pytest.mark.asyncio
async def test_a_body_over_the_node_cap_is_refused_unread_and_the_node_carries_on(gateway):
    # Content-Length alone decides: the node refuses before reading a byte of the
    # body, so a client cannot make it buffer tornado's default 100 MB.
    reader, writer = await connect(gateway.port)
    size = MAX_HTTP_BODY_BYTES + 1
    writer.write(
        b"POST /api/v1/publish HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {size}\r\n\r\n".encode()
    )
    await writer.drain()
    async with asyncio.timeout(5):
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 400"), status
        # The rest of the bare head, then EOF: the node closed the connection.
        assert await reader.read() == b"\r\n"
    writer.close()
    assert (await health(gateway.port)).startswith(b"HTTP/1.1 200")
