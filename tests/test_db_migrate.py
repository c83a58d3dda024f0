"""Migrations: several nodes starting at once on a shared PostgreSQL database,
and upgrading a database that already holds data.

Real parts: the suite's throwaway PostgreSQL cluster (and SQLite files),
:class:`server.store.db.Database` objects as the nodes build them, each with its
own connection pool, and gateway nodes with real clients.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
from pathlib import Path
from typing import Any

import peewee as pw
import pytest
from playhouse.migrations import Runner

from models import Room, RoomMute, utcnow
from server.core.protocol import iso
from server.store.db import MIGRATIONS_DIR, Database, open_database
from switchboard_client import ClientError
from tests.conftest import ROOMY_RATE_LIMITS

pytestmark = pytest.mark.asyncio

ALL_MIGRATIONS = [
    "0001_initial", "0002_room_mute", "0003_room_topic", "0004_message_created_at_index",
    "0005_room_epoch", "0006_message_drop_room_index",
    "0007_message_partial_client_msg_id_index",
]


async def test_nodes_starting_together_migrate_a_fresh_database_once(postgres: Any) -> None:
    for attempt in range(3):
        url = postgres.create_database(f"t{os.urandom(6).hex()}")
        nodes = [Database(url, workers=2) for _ in range(4)]
        try:
            # Every node migrates at the same moment; none may fail.
            await asyncio.gather(*(node.start() for node in nodes))
            rows = await nodes[0].run_bare("check", applied_migrations, nodes[0])
            assert rows == ALL_MIGRATIONS, attempt
        finally:
            for node in nodes:
                await node.close()


def applied_migrations(node: Database) -> list[str]:
    cursor = node.db.execute_sql("SELECT name FROM schema_migration")  # type: ignore[no-untyped-call]
    return [name for (name,) in cursor.fetchall()]


# -- upgrading a database with data in it ----------------------------------------------


def fill_at_0001(db: pw.Database, muted_until: dt.datetime) -> None:
    """Migrate ``db`` to 0001 only and store what a 0001 node would have.

    Room "general" (alice's) where bob is muted until ``muted_until`` by
    "mod" (audited), carol's mute has expired and dave was never muted.
    The tables as 0001 made them, not today's models (which have no
    ``room_member.muted_until`` any more).
    """
    Runner(db, directory=MIGRATIONS_DIR).up(target="0001_initial")
    now = utcnow()
    room = pw.Table("room", ("id", "name", "type", "description", "owner_id", "last_seq",
                             "created_at", "last_activity_at"))  # fmt: skip
    member = pw.Table("room_member", ("room_id", "user_id", "role", "joined_at",
                                      "last_read_seq", "muted_until"))  # fmt: skip
    audit = pw.Table("audit_log", ("actor_id", "action", "target", "reason", "details",
                                   "created_at"))  # fmt: skip
    with db.atomic():
        room.bind(db).insert(
            id="general", name="General", type="public", description="", owner_id="alice",
            last_seq=0, created_at=now, last_activity_at=now,
        ).execute()  # fmt: skip
        for user_id, role, until in (
            ("alice", "owner", None), ("bob", "member", muted_until),
            ("carol", "member", now - dt.timedelta(seconds=60)), ("dave", "member", None),
        ):  # fmt: skip
            member.bind(db).insert(
                room_id="general", user_id=user_id, role=role, joined_at=now, last_read_seq=0,
                muted_until=until,
            ).execute()  # fmt: skip
        audit.bind(db).insert(
            actor_id="mod", action="mute", target="user:bob", reason="calm",
            details='{"roomId": "general", "durationSeconds": 600}', created_at=now,
        ).execute()  # fmt: skip
    db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_upgrading_from_0001_keeps_the_mutes_in_force(
    backend: str, gateway_factory: Any, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    if backend == "postgres":
        url = request.getfixturevalue("postgres").create_database(f"t{os.urandom(6).hex()}")
    else:
        url = f"sqlite:///{tmp_path}/at_0001.db"
    muted_until = (utcnow() + dt.timedelta(seconds=600)).replace(microsecond=0)
    fill_at_0001(open_database(url), muted_until)

    # A node of today's code starts on it and migrates (0002 and later).
    gw = await gateway_factory(
        env="production", jwt_secret="x" * 40, allowed_origins="http://app.test",
        rate_limits=ROOMY_RATE_LIMITS, database_url=url,
    )  # fmt: skip
    bob, carol, dave = [await gw.connect(name) for name in ("bob", "carol", "dave")]
    for client in (bob, carol, dave):
        await client.emit("room:join", {"roomId": "general"})
    with pytest.raises(ClientError) as info:
        await bob.emit("message:send", {"roomId": "general", "content": "x"})
    assert (info.value.code, info.value.details) == (
        "MUTED", {"roomId": "general", "until": iso(muted_until)}
    )
    # Now a mute of its own: leaving and rejoining keeps it.
    await bob.emit("room:leave", {"roomId": "general"})
    await bob.emit("room:join", {"roomId": "general"})
    with pytest.raises(ClientError) as info:
        await bob.emit("typing:start", {"roomId": "general"})
    assert info.value.code == "MUTED"
    # The expired mute was not carried over; the never-muted stay free.
    for client in (carol, dave):
        await client.emit("message:send", {"roomId": "general", "content": "hi"})

    def mutes() -> list[tuple[str, str, str, str, dt.datetime]]:
        return [(m.room_id, m.user_id, m.muted_by, m.reason, m.until) for m in RoomMute.select()]

    # Who muted bob and why came over from the audit log.
    assert await gw.node.db.run("test.mutes", mutes) == [
        ("general", "bob", "mod", "calm", muted_until)
    ]
    names = await gw.node.db.run_bare("test.applied", applied_migrations, gw.node.db)
    assert names == ALL_MIGRATIONS
    # 0003_room_topic: the room from before has an empty topic, and may be given one.
    joined = await dave.emit("room:join", {"roomId": "general"})
    assert joined["room"]["topic"] == ""
    alice = await gw.connect("alice")
    updated = await alice.emit("room:update", {"roomId": "general", "topic": "Migrated"})
    assert updated["room"]["topic"] == "Migrated"

    def insert_as_0002() -> None:
        # A node of the previous code, mid rolling upgrade, names no topic.
        now = utcnow()
        pw.Table("room", ("id", "name", "type", "description", "owner_id", "last_seq",
                          "created_at", "last_activity_at")).bind(Room._meta.database).insert(
            id="older", name="Older", type="public", description="", owner_id="alice",
            last_seq=0, created_at=now, last_activity_at=now,
        ).execute()  # fmt: skip

    await gw.node.db.run("test.insert_as_0002", insert_as_0002)
    joined = await dave.emit("room:join", {"roomId": "older"})
    assert joined["room"]["topic"] == ""
    # 0005_room_epoch: the room from before got a random epoch, a room of
    # older code gets '' (the column's default); both resume with theirs.
    general = (await dave.emit("room:join", {"roomId": "general"}))["room"]
    assert len(general["epoch"]) == 12 and joined["room"]["epoch"] == ""
    entries = [{"roomId": r["id"], "sinceSeq": r["lastSeq"], "epoch": r["epoch"]}
               for r in (general, joined["room"])]  # fmt: skip
    resumed = await dave.emit("room:resume", {"rooms": entries})
    assert [r["status"] for r in resumed["rooms"]] == ["resumed", "resumed"]


# -- 0006 and 0007: the message indexes a send writes ---------------------------------------


async def test_a_send_without_client_msg_id_writes_two_message_indexes_that_serve_every_lookup(
    tmp_path: Path,
) -> None:
    """No index on message.room_id alone, and (sender_id, client_msg_id) holds only rows
    with a clientMsgId: a send without one writes (room_id, seq) and (room_id,
    created_at, seq) alone. Lookups by room seek (room_id, seq) or its twin; the
    retry lookups (one send, a batch) seek the partial index."""
    path = tmp_path / "x.db"
    db = Database(f"sqlite:///{path}")
    await db.start()
    await db.close()
    conn = sqlite3.connect(path)

    def plan(sql: str, *params: str) -> str:
        [(*_, detail)] = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
        return str(detail)

    try:
        indexes = dict(conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'message'"))
        by_room = plan('SELECT "id" FROM "message" WHERE "room_id" = ?', "r")
        retry = plan('SELECT "id" FROM "message" WHERE "sender_id" = ? AND "client_msg_id" = ?',
                     "alice", "c-1")  # fmt: skip
        batch = plan('SELECT "id" FROM "message" WHERE "client_msg_id" IN (?, ?)'
                     ' AND "sender_id" IN (?)', "c-1", "c-2", "alice")  # fmt: skip
    finally:
        conn.close()
    assert sorted(indexes) == [
        "message_room_id_created_at_seq", "message_room_id_seq", "message_sender_id_client_msg_id"
    ]  # fmt: skip
    assert indexes["message_sender_id_client_msg_id"].endswith('WHERE "client_msg_id" IS NOT NULL')
    assert by_room.startswith("SEARCH message USING") and "(room_id=?)" in by_room, by_room
    for detail in (retry, batch):
        assert detail.startswith("SEARCH message USING COVERING INDEX message_sender_id_client"
                                 "_msg_id (sender_id=? AND client_msg_id=?)"), detail  # fmt: skip
