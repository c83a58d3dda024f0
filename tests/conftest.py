"""Shared fixtures: a real gateway node on port 0 and real WebSocket clients.

``gateway`` starts a :class:`server.app.Node` in the test's event loop on a
fresh SQLite file (or on PostgreSQL when a test module sets
``DATABASE = "postgres"``), and ``connect`` opens authenticated clients to
it; everything is closed when the test ends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from server.app import Node
from server.core.auth import mint_token
from server.core.config import Config
from server.store.db import Database
from switchboard_client import Client
from tests.support.services import PostgresServer, require_binary

#: Generous limits for tests that are not about limits (test-env defaults are low).
ROOMY_RATE_LIMITS = "messages=1000/1m,joins=1000/1m,typing=1000/1m,other=5000/1m"


def make_config(tmp_path: Any, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "env": "test",
        "host": "127.0.0.1",
        "port": 0,
        "node_id": "test-node",
        "database_url": f"sqlite:///{tmp_path}/switchboard.db",
        "rate_limits": ROOMY_RATE_LIMITS,
    }
    values.update(overrides)
    return Config.from_env({}, **values)


class Gateway:
    """A running node plus helpers to mint tokens and open clients."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        self.clients: list[Client] = []

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, namespace: str = "chat") -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{namespace}"

    def token(self, user: str, roles: tuple[str, ...] = ("user",), **kw: Any) -> str:
        return mint_token(self.config, user, roles=roles, **kw)

    async def connect(
        self,
        user: str = "alice",
        namespace: str = "chat",
        roles: tuple[str, ...] = ("user",),
        *,
        token: str | None = None,
        **kw: Any,
    ) -> Client:
        client = Client(self.url(namespace), token or self.token(user, roles), **kw)
        self.clients.append(client)
        await client.connect()
        return client

    def client(self, user: str = "alice", namespace: str = "chat", **kw: Any) -> Client:
        """An unconnected client (for tests that expect the connect to fail)."""
        token = kw.pop("token", None) or self.token(user, kw.pop("roles", ("user",)))
        client = Client(self.url(namespace), token, **kw)
        self.clients.append(client)
        return client

    async def close_clients(self) -> None:
        for client in self.clients:
            try:
                await client.aclose(timeout=2.0)
            except Exception:  # best-effort teardown
                pass


def require_postgres() -> None:
    """Skip (fail under CI=true) unless PostgreSQL's server tools are installed."""
    require_binary("initdb", "PostgreSQL (initdb/pg_ctl) is not installed")
    require_binary("pg_ctl", "PostgreSQL (initdb/pg_ctl) is not installed")


@pytest.fixture(scope="session")
def postgres() -> Any:
    """One throwaway PostgreSQL cluster for the session (started on demand)."""
    require_postgres()
    with PostgresServer() as server:
        yield server


@pytest.fixture
def own_postgres() -> Any:
    """A PostgreSQL cluster of this test alone, for tests that stop or kill it."""
    require_postgres()
    with PostgresServer() as server:
        yield server


@pytest_asyncio.fixture
async def gateway_factory(
    tmp_path: Any, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Gateway] = []
    database = getattr(request.module, "DATABASE", "sqlite")

    async def start(**overrides: Any) -> Gateway:
        if database == "postgres" and "database_url" not in overrides:
            pg = request.getfixturevalue("postgres")
            overrides["database_url"] = pg.create_database(f"t{os.urandom(6).hex()}")
        home = tmp_path / f"n{len(started)}"
        home.mkdir(exist_ok=True)
        node = Node(make_config(home, **overrides))
        await node.start()
        gw = Gateway(node)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.close_clients()
        await gw.node.stop(grace_secs=1.0)


@pytest_asyncio.fixture
async def gateway(gateway_factory: Callable[..., Any]) -> Gateway:
    gw: Gateway = await gateway_factory()
    return gw


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def either_db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Database]:
    """A started :class:`Database` on SQLite, then on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'either.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"t{os.urandom(6).hex()}")
    database = Database(url)
    await database.start()
    yield database
    await database.close()
