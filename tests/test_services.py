"""Tests of the throwaway service helpers in tests/support/services.py.

They start real PostgreSQL and Redis processes: skipped when the binaries
are missing, failing instead under CI=true (see ``require_binary``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import psycopg2
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import services
from tests.support.services import (
    PostgresServer,
    RedisServer,
    ServiceError,
    find_binary,
    free_port,
    require_binary,
)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _redis(url: str) -> redis.Redis:
    """A client that fails fast instead of retrying while the server is down."""
    return redis.Redis.from_url(
        url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture(scope="module")
def _postgres_installed() -> None:
    require_binary("initdb", "PostgreSQL server binaries (initdb) are not installed")


@pytest.fixture(scope="module")
def _redis_installed() -> None:
    require_binary("redis-server", "redis-server is not installed")


@pytest.fixture
def pg(_postgres_installed: None) -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def rd(_redis_installed: None) -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


# -- helpers ----------------------------------------------------------------


def test_free_port_is_bindable_and_not_repeated() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    port = ports.pop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_find_binary() -> None:
    sh = find_binary("sh")
    assert sh is not None and os.path.isabs(sh)
    assert find_binary("switchboard-no-such-binary") is None


def test_require_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not here"):
        require_binary("switchboard-no-such-binary", "not here")
    assert require_binary("sh", "needs sh") == find_binary("sh")


def test_require_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="not here"):
        require_binary("switchboard-no-such-binary", "not here")


# -- PostgreSQL ---------------------------------------------------------------


def test_postgres_roundtrip(pg: PostgresServer) -> None:
    assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/switchboard"
    assert pg.running and pg.pid is not None
    conn = psycopg2.connect(pg.url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE note (id serial PRIMARY KEY, body text NOT NULL)")
            cur.execute("INSERT INTO note (body) VALUES (%s), (%s)", ("héllo", "world"))
        with conn.cursor() as cur:
            cur.execute("SELECT body FROM note ORDER BY id")
            assert [r[0] for r in cur.fetchall()] == ["héllo", "world"]
            cur.execute("SHOW server_encoding")
            assert cur.fetchone() == ("UTF8",)
            cur.execute("SHOW TimeZone")
            assert cur.fetchone() == ("UTC",)
            cur.execute("SHOW fsync")
            assert cur.fetchone() == ("off",)
    finally:
        conn.close()


def test_postgres_create_database(pg: PostgresServer) -> None:
    url = pg.create_database("extra db")
    assert url == pg.url_for("extra db")
    conn = psycopg2.connect(host=pg.host, port=pg.port, user="postgres", dbname="extra db")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone() == ("extra db",)
    finally:
        conn.close()
    pg.drop_database("extra db")
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host=pg.host, port=pg.port, user="postgres", dbname="extra db")


def test_postgres_stop_removes_everything(_postgres_installed: None) -> None:
    server = PostgresServer().start()
    root, port, pid = server.root, server.port, server.pid
    assert root is not None and root.exists() and pid is not None
    assert server in services._live_services
    server.stop()
    assert not root.exists()
    assert not server.running
    assert not _port_open(port)
    assert server not in services._live_services
    server.stop()  # idempotent


def test_postgres_kill_and_restart_keep_data_and_port(pg: PostgresServer) -> None:
    port = pg.port
    with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE kv (k text PRIMARY KEY, v text)")
        cur.execute("INSERT INTO kv VALUES ('a', '1')")
    conn.close()

    stale = psycopg2.connect(pg.url)
    pg.kill()
    assert not pg.running
    assert not _port_open(port)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(pg.url, connect_timeout=2)
    with pytest.raises((psycopg2.OperationalError, psycopg2.InterfaceError)):
        with stale.cursor() as cur:
            cur.execute("SELECT 1")
    stale.close()

    pg.start()
    assert pg.port == port and pg.running
    conn = psycopg2.connect(pg.url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM kv WHERE k = 'a'")
            assert cur.fetchone() == ("1",)  # committed just before the crash
            cur.execute("INSERT INTO kv VALUES ('b', '2')")
    finally:
        conn.close()

    old_pid = pg.pid
    pg.restart()
    assert pg.port == port and pg.pid != old_pid
    pg.restart(crash=True)
    conn = psycopg2.connect(pg.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM kv")
            assert cur.fetchone() == (2,)
    finally:
        conn.close()


def test_postgres_picks_another_port_when_taken(_postgres_installed: None) -> None:
    server = PostgresServer()
    wanted = server.port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", wanted))
        blocker.listen()
        with server:
            assert server.port != wanted
            psycopg2.connect(server.url).close()


def test_postgres_fixed_port_taken_fails_cleanly(_postgres_installed: None) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = PostgresServer(port=port)
        with pytest.raises(ServiceError, match="did not start"):
            server.start()
    assert server.root is None
    assert server not in services._live_services


# -- Redis --------------------------------------------------------------------


def test_redis_roundtrip(rd: RedisServer) -> None:
    assert rd.url == f"redis://127.0.0.1:{rd.port}/0"
    client = _redis(rd.url)
    try:
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()


def test_redis_kill_and_restart_same_port(rd: RedisServer) -> None:
    port = rd.port
    client = _redis(rd.url)
    try:
        client.set("k", "v")
        old_pid = rd.pid
        rd.kill()
        assert not rd.running and rd.pid is None
        assert not _port_open(port)
        with pytest.raises(redis.ConnectionError):
            client.ping()

        rd.start()
        assert rd.port == port and rd.pid != old_pid
        fresh = _redis(rd.url)
        try:
            assert fresh.ping()
            assert fresh.get("k") is None  # no persistence: a crash loses everything
        finally:
            fresh.close()

        pid = rd.pid
        rd.restart()
        assert rd.port == port and rd.pid != pid
        client.connection_pool.disconnect()
        assert client.ping()
    finally:
        client.close()


def test_redis_stop_removes_everything(_redis_installed: None) -> None:
    server = RedisServer().start()
    root, port = server.root, server.port
    assert root is not None and root.exists()
    server.stop()
    assert not root.exists()
    assert not server.running
    assert not _port_open(port)
    assert server not in services._live_services
    server.stop()  # idempotent


def test_redis_picks_another_port_when_taken(_redis_installed: None) -> None:
    server = RedisServer()
    wanted = server.port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", wanted))
        blocker.listen()
        with server:
            assert server.port != wanted
            client = _redis(server.url)
            assert client.ping()
            client.close()


def test_redis_fixed_port_taken_fails_cleanly(_redis_installed: None) -> None:
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        with pytest.raises(ServiceError, match="did not start"):
            second.start()
        assert second.root is None and not second.running
        assert first.running


def test_context_manager_cleans_up_on_error(
    _postgres_installed: None, _redis_installed: None
) -> None:
    with pytest.raises(ZeroDivisionError):
        with PostgresServer() as pg, RedisServer() as rd:
            roots = [pg.root, rd.root]
            _ = 1 / 0
    assert all(root is not None and not root.exists() for root in roots)
    assert not pg.running and not rd.running
