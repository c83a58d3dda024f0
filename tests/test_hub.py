"""Unit tests of :mod:`server.realtime.hub`: indexes, targets, framing, buffered joins, sweep.

The hub is driven directly with :class:`FakeConn`, a minimal stand-in for a
handler that records the frames written to it and the close/ping calls.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from server.core import protocol
from server.realtime.broker import MemoryBroker, MemoryBus
from server.realtime.hub import COALESCE_MAX_BYTES, JOIN_FLOOR_SECS, Hub, Target
from server.realtime.outbound import Outbound
from server.realtime.seqs import AHEAD_MAX, RoomSeqs


class FakeConn:
    """Implements the hub's ``Connection`` protocol and records what it gets."""

    def __init__(
        self, conn_id: str, user_id: str, namespace: str = "chat", roles: Sequence[str] = ()
    ) -> None:
        self.conn_id = conn_id
        self.user_id = user_id
        self._namespace = namespace
        #: The token's roles (none unless given: role interest stays out of the way).
        self.roles = frozenset(roles)
        self.last_seen = 0.0
        self.frames: list[bytes] = []
        self.closed: list[tuple[int, str]] = []
        self.pings = 0
        self.accept = True  # False: behave like a gone/too slow connection
        self.outbound = Outbound(1024 * 1024, on_slow=lambda: self.close_with(4408, "slow"))

    @property
    def namespace(self) -> str:
        return self._namespace

    def send_frame(self, frame: bytes) -> bool:
        if not self.accept:
            return False
        self.frames.append(frame)
        return True

    def write_frame(self, frame: bytes, frames: int = 1) -> bool:
        return self.send_frame(frame)

    def close_with(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def ping(self) -> None:
        self.pings += 1

    def __repr__(self) -> str:
        return f"<FakeConn {self.conn_id}>"

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(decode_frame(f)) for f in self.frames]

    def names(self) -> list[str]:
        return [e["event"] for e in self.events()]


def frame_header(data: bytes) -> tuple[int, int]:
    """(payload length, header length) of the unmasked frame ``data`` starts with."""
    length = data[1] & 0x7F
    if length == 126:
        return struct.unpack("!H", data[2:4])[0], 4
    if length == 127:
        return struct.unpack("!Q", data[2:10])[0], 10
    return length, 2


def decode_frame(frame: bytes) -> bytes:
    """Check ``frame`` is exactly one final, unmasked text frame; return its payload."""
    assert len(frame) >= 2
    b0, b1 = frame[0], frame[1]
    assert b0 & 0x80, "FIN bit not set"
    assert b0 & 0x70 == 0, "reserved bits set (no extensions are negotiated)"
    assert b0 & 0x0F == 0x1, "not a text frame"
    assert not b1 & 0x80, "server frames must not be masked"
    length, offset = frame_header(frame)
    if offset == 4:
        assert length >= 126, "16-bit length used for a short payload"
    elif offset == 10:
        assert length > 0xFFFF and not length >> 63, "64-bit length misused"
    payload = frame[offset:]
    assert len(payload) == length, (len(payload), length)
    payload.decode("utf-8")  # text frames carry UTF-8
    return payload


class RecordingBroker(MemoryBroker):
    """A single node's broker that records what the hub tells it."""

    def __init__(self) -> None:
        super().__init__("n1")
        self.interests: list[tuple[str, str, bool]] = []
        self.remote: list[tuple[Target, bytes, str | None, int | None]] = []
        self.remote_many: list[tuple[list[Target], bytes]] = []

    def interest(self, kind: str, key: str, interested: bool) -> None:
        super().interest(kind, key, interested)
        self.interests.append((kind, key, interested))

    def publish(
        self, target: Target, payload: bytes, *, exclude: str | None, seq: int | None
    ) -> None:
        self.remote.append((target, payload, exclude, seq))

    def publish_many(self, targets: Sequence[Target], payload: bytes) -> None:
        self.remote_many.append((list(targets), payload))


class RecordingHub(Hub):
    """A hub with a :class:`RecordingBroker`; ``interest`` is what it was told."""

    def __init__(self) -> None:
        self.recorder = RecordingBroker()
        super().__init__("n1", broker=self.recorder)

    @property
    def interest(self) -> list[tuple[str, str, bool]]:
        return self.recorder.interests

    @property
    def remote(self) -> list[tuple[Target, bytes, str | None, int | None]]:
        return self.recorder.remote


HUB_INDEXES = (
    "_by_room", "_by_user", "_by_namespace", "_by_role", "_roles_indexed", "_rooms_of",
    "_pending", "_floors", "_members",
)  # fmt: skip


def assert_indexes_clean(hub: Hub) -> None:
    for name in HUB_INDEXES:
        index = getattr(hub, name)
        assert all(index.values()), f"{name} holds an empty entry: {index}"


def assert_hub_empty(hub: Hub) -> None:
    assert hub.connections == {}
    for name in (*HUB_INDEXES, "_floor_top"):
        assert getattr(hub, name) == {}, name


@pytest.fixture
def hub() -> Hub:
    return Hub("n1")


def populate(hub: Hub) -> dict[str, FakeConn]:
    """alice has two chat connections and an admin one; bob and carol one chat each."""
    conns = {
        "a1": FakeConn("a1", "alice"),
        "a2": FakeConn("a2", "alice"),
        "a_admin": FakeConn("a_admin", "alice", "admin"),
        "b1": FakeConn("b1", "bob"),
        "c1": FakeConn("c1", "carol"),
    }
    for conn in conns.values():
        hub.add(conn)
    hub.join(conns["a1"], "general")
    hub.join(conns["b1"], "general")
    hub.join(conns["c1"], "random")
    hub.join(conns["a2"], "random")
    return conns


def recipients(conns: dict[str, FakeConn]) -> set[str]:
    return {cid for cid, c in conns.items() if c.frames}


def clear(conns: dict[str, FakeConn]) -> None:
    for c in conns.values():
        c.frames.clear()


# -- membership and indexes --------------------------------------------------------


def test_add_reports_first_connection_of_user(hub):
    assert hub.add(FakeConn("a1", "alice")) is True
    assert hub.add(FakeConn("a2", "alice")) is False
    assert hub.add(FakeConn("a3", "alice", "admin")) is False
    assert hub.add(FakeConn("b1", "bob")) is True
    assert hub.online_users() == {"alice", "bob"}
    assert hub.count_by_namespace() == {"chat": 3, "admin": 1}


def test_indexes_drop_empty_keys_after_leave_and_remove(hub):
    conns = populate(hub)
    assert hub.active_rooms() == {"general": 2, "random": 2}
    assert hub.leave(conns["b1"], "general") is True
    assert_indexes_clean(hub)
    assert hub.leave(conns["b1"], "general") is False  # not in it any more
    assert hub.leave(conns["b1"], "nowhere") is False
    assert "b1" not in hub._rooms_of  # its only room: the key is gone
    assert hub.leave(conns["a1"], "general") is True
    assert "general" not in hub._by_room
    assert_indexes_clean(hub)

    assert hub.remove(conns["c1"]) == {"random"}
    assert "carol" not in hub._by_user and "c1" not in hub._rooms_of
    assert_indexes_clean(hub)
    assert hub.remove(conns["c1"]) == set()  # twice is harmless
    assert hub.remove(conns["a_admin"]) == set()
    assert "admin" not in hub._by_namespace
    assert_indexes_clean(hub)
    assert set(hub.user_connections("alice")) == {conns["a1"], conns["a2"]}

    for cid in ("a1", "a2", "b1"):
        hub.remove(conns[cid])
    assert_hub_empty(hub)
    assert hub.online_users() == set() and hub.active_rooms() == {}


def test_remove_returns_rooms_and_leaves_them(hub):
    a = FakeConn("a1", "alice")
    b = FakeConn("b1", "bob")
    hub.add(a)
    hub.add(b)
    for room in ("r1", "r2", "r3"):
        hub.join(a, room)
    hub.join(b, "r2")
    assert hub.rooms_of(a) == {"r1", "r2", "r3"}
    assert hub.remove(a) == {"r1", "r2", "r3"}
    assert hub.rooms_of(a) == frozenset()
    assert not hub.in_room(a, "r2")
    assert hub.active_rooms() == {"r2": 1}
    assert hub.publish(Target.room("r1"), "x", {}) == 0
    assert a.frames == []
    assert_indexes_clean(hub)


def test_remove_while_join_is_buffered_drops_the_buffer(hub):
    a = FakeConn("a1", "alice")
    b = FakeConn("b1", "bob")
    hub.add(a)
    hub.add(b)
    hub.join(b, "general")
    hub.join(a, "general", buffer=True)
    hub.publish(Target.room("general"), "message:new", {"n": 1}, seq=1)
    hub.remove(a)
    assert hub.finish_join(a, "general", None) == 0
    assert a.frames == []
    assert_indexes_clean(hub)
    assert hub._pending == {}


def test_leave_while_join_is_buffered_drops_the_buffer(hub):
    a = FakeConn("a1", "alice")
    hub.add(a)
    hub.join(a, "general", buffer=True)
    hub.publish(Target.room("general"), "message:new", {"n": 1}, seq=1)
    assert hub.leave(a, "general") is True
    assert hub._pending == {}
    assert hub.finish_join(a, "general", None) == 0
    assert a.frames == []
    hub.remove(a)
    assert_hub_empty(hub)


def test_clear_room(hub):
    conns = populate(hub)
    gone = hub.clear_room("general")
    assert {c.conn_id for c in gone} == {"a1", "b1"}
    assert "general" not in hub._by_room
    assert not hub.in_room(conns["a1"], "general")
    assert "a1" not in hub._rooms_of and "b1" not in hub._rooms_of
    assert hub.in_room(conns["a2"], "random")
    assert hub.clear_room("general") == []
    assert_indexes_clean(hub)


def test_queries(hub):
    conns = populate(hub)
    assert hub.in_room(conns["a1"], "general") and not hub.in_room(conns["a2"], "general")
    assert hub.room_connections("general") == {conns["a1"], conns["b1"]}
    hub.room_connections("general").clear()  # a copy, not the index
    assert hub.active_rooms()["general"] == 2
    assert hub.user_in_room("alice", "general")
    assert not hub.user_in_room("alice", "general", besides=conns["a1"])
    hub.join(conns["a2"], "general")
    assert hub.user_in_room("alice", "general", besides=conns["a1"])
    assert not hub.user_in_room("carol", "general")
    assert set(hub.user_connections("alice")) == {conns["a1"], conns["a2"], conns["a_admin"]}
    assert hub.user_connections("alice", "admin") == [conns["a_admin"]]
    assert hub.user_connections("nobody") == []


def test_roles_are_indexed_until_remove_and_follow_update_roles():
    hub = RecordingHub()
    mod = FakeConn("m1", "mia", roles=("user", "moderator"))
    mod2 = FakeConn("m2", "mia", "admin", roles=("moderator",))
    hub.add(mod)
    hub.add(mod2)
    assert ("role", "moderator", True) in hub.interest and ("role", "user", True) in hub.interest
    assert hub._by_role == {"user": {mod}, "moderator": {mod, mod2}}
    hub.interest.clear()

    mod.roles = frozenset({"user", "admin"})  # a refreshed token: moderator -> admin
    hub.update_roles(mod)
    assert hub.interest == [("role", "admin", True)]  # m2 still holds moderator
    assert hub._by_role == {"user": {mod}, "moderator": {mod2}, "admin": {mod}}
    hub.update_roles(mod)  # nothing changed: no news
    assert hub.interest == [("role", "admin", True)]
    hub.interest.clear()

    mod2.roles = frozenset({"admin"})  # remove() unindexes what was indexed, not this
    hub.remove(mod2)
    assert [i for i in hub.interest if i[0] == "role"] == [("role", "moderator", False)]
    assert_indexes_clean(hub)
    hub.update_roles(mod2)  # gone: ignored
    assert "m2" not in hub._roles_indexed
    hub.remove(mod)
    assert_hub_empty(hub)


def test_a_role_target_reaches_the_roles_connections_narrowed_by_namespace(hub):
    conns = {
        "mod_chat": FakeConn("mod_chat", "mia", roles=("user", "moderator")),
        "mod_admin": FakeConn("mod_admin", "mia", "admin", roles=("moderator",)),
        "root": FakeConn("root", "root", "admin", roles=("admin",)),
        "bob": FakeConn("bob", "bob", roles=("user",)),
    }
    for conn in conns.values():
        hub.add(conn)
    cases = [
        (Target.role("moderator"), {"mod_chat", "mod_admin"}),
        (Target.role("moderator", "chat"), {"mod_chat"}),
        (Target.role("moderator", "logs"), set()),
        (Target.role("user"), {"mod_chat", "bob"}),
        (Target.role("admin"), {"root"}),
        (Target.role("wizard"), set()),  # no token grants it: nobody, no error
    ]
    for target, expected in cases:
        clear(conns)
        assert hub.publish(target, "x", {}) == len(expected), target
        assert recipients(conns) == expected, target
    clear(conns)
    targets = [Target.role("moderator", "chat"), Target.role("moderator", "admin")]
    assert hub.publish_many(targets, "x", {}) == 2  # once per connection
    assert [len(c.frames) for c in conns.values()] == [1, 1, 0, 0]


# -- delivery -----------------------------------------------------------------------


def test_publish_reaches_exactly_the_target(hub):
    conns = populate(hub)
    cases = [
        (Target.room("general"), {"a1", "b1"}),
        (Target.room("random"), {"a2", "c1"}),
        (Target.room("empty"), set()),
        (Target.user("alice"), {"a1", "a2", "a_admin"}),
        (Target.user("alice", "chat"), {"a1", "a2"}),
        (Target.user("alice", "admin"), {"a_admin"}),
        (Target.user("alice", "logs"), set()),
        (Target.user("nobody"), set()),
        (Target.ns("chat"), {"a1", "a2", "b1", "c1"}),
        (Target.ns("admin"), {"a_admin"}),
        (Target.ns("logs"), set()),
        (Target.all(), set(conns)),
        (Target("all", "", "admin"), {"a_admin"}),
        (Target.connection("b1"), {"b1"}),
        (Target.connection("gone"), set()),
    ]
    for target, expected in cases:
        clear(conns)
        count = hub.publish(target, "test:event", {"target": target.kind})
        assert recipients(conns) == expected, target
        assert count == len(expected), target
        for cid in expected:
            assert conns[cid].events() == [{"event": "test:event", "data": {"target": target.kind}}]


def test_publish_unknown_target_kind(hub):
    populate(hub)
    with pytest.raises(ValueError):
        hub.publish(Target("planet", "mars"), "x", {})


def test_exclude_skips_one_connection(hub):
    conns = populate(hub)
    assert hub.publish(Target.room("general"), "x", {}, exclude="a1") == 1
    assert recipients(conns) == {"b1"}
    clear(conns)
    assert hub.publish(Target.user("alice"), "x", {}, exclude="a2") == 2
    assert recipients(conns) == {"a1", "a_admin"}
    clear(conns)
    assert hub.publish(Target.all(), "x", {}, exclude="c1") == 4
    assert recipients(conns) == set(conns) - {"c1"}
    clear(conns)
    assert hub.publish(Target.connection("b1"), "x", {}, exclude="b1") == 0
    assert recipients(conns) == set()


def test_failed_writes_are_not_counted(hub):
    conns = populate(hub)
    delivered: list[tuple[int, int]] = []
    hub._on_delivered = lambda count, nbytes: delivered.append((count, nbytes))
    conns["b1"].accept = False
    assert hub.publish(Target.room("general"), "x", {}) == 1
    size = len(conns["a1"].frames[-1])
    assert delivered == [(1, size)]
    conns["a1"].accept = False
    assert hub.publish(Target.room("general"), "x", {}) == 0
    assert delivered == [(1, size)]  # nothing delivered: no callback


def test_a_broadcast_is_counted_once_with_its_bytes(hub):
    conns = populate(hub)
    calls: list[tuple[int, int]] = []
    hub._on_delivered = lambda count, nbytes: calls.append((count, nbytes))
    assert hub.publish(Target.all(), "x", {"n": 1}) == len(conns)
    size = len(next(iter(conns.values())).frames[-1])
    assert calls == [(len(conns), len(conns) * size)]


def test_a_write_that_removes_the_connection_does_not_break_the_loop(hub):
    """A slow consumer is removed from the hub from inside send_frame."""

    class Dropping(FakeConn):
        def send_frame(self, frame: bytes) -> bool:
            hub.remove(self)
            return False

        write_frame = send_frame

    hub.add(Dropping("slow", "sam"))
    hub.join(hub.connections["slow"], "general")
    others = [FakeConn(f"c{i}", f"u{i}") for i in range(5)]
    for c in others:
        hub.add(c)
        hub.join(c, "general")
    assert hub.publish(Target.room("general"), "x", {}) == 5
    assert all(len(c.frames) == 1 for c in others)
    assert "slow" not in hub.connections and hub.active_rooms() == {"general": 5}


def test_broadcast_writes_the_same_bytes_object_to_everyone(hub):
    conns = [FakeConn(f"c{i}", f"u{i}") for i in range(10)]
    for c in conns:
        hub.add(c)
        hub.join(c, "big")
    hub.publish(Target.room("big"), "message:new", {"content": "x" * 500})
    first = conns[0].frames[0]
    assert all(c.frames[0] is first for c in conns)
    # Also for the multi-target and namespace broadcasts.
    hub.publish_rooms(["big", "other"], "user:status_changed", {"userId": "u1"})
    assert all(c.frames[1] is conns[0].frames[1] for c in conns)
    hub.publish(Target.ns("chat"), "system:notice", {})
    assert all(c.frames[2] is conns[0].frames[2] for c in conns)


@pytest.mark.parametrize("size", [100, 1024, 70 * 1024])
def test_frames_are_valid_websocket_text_frames(hub, size):
    conn = FakeConn("c1", "u1")
    hub.add(conn)
    hub.join(conn, "r")
    text = "é" * (size // 4) + "x" * (size - 2 * (size // 4))  # multi-byte UTF-8 inside
    hub.publish(Target.room("r"), "message:new", {"content": text})
    (frame,) = conn.frames
    payload = decode_frame(frame)
    assert orjson.loads(payload) == {"event": "message:new", "data": {"content": text}}
    assert len(payload) >= size
    expected_header = 2 if len(payload) < 126 else 4 if len(payload) <= 0xFFFF else 10
    assert len(frame) == expected_header + len(payload)


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 0xFFFF, 0x10000])
def test_frame_length_boundaries(n):
    payload = b"a" * n
    frame = protocol.frame(payload)
    if n:
        assert decode_frame(frame) == payload
    else:
        assert frame == b"\x81\x00"


# -- buffered joins -------------------------------------------------------------------


def test_buffered_join_holds_frames_and_releases_the_rest_in_order(hub):
    sender = FakeConn("s1", "sender")
    joiner = FakeConn("j1", "joiner")
    hub.add(sender)
    hub.add(joiner)
    hub.join(sender, "general")
    hub.join(joiner, "general", buffer=True)
    assert hub.in_room(joiner, "general")
    for seq in range(1, 6):
        hub.publish(Target.room("general"), "message:new", {"seq": seq}, seq=seq)
    hub.publish(Target.room("general"), "room:user_joined", {"u": "x"})  # no seq
    hub.publish(Target.room("general"), "message:new", {"seq": 6}, seq=6, exclude="j1")
    # Held while the recovery query runs; other room members are not held up.
    assert joiner.frames == []
    assert len(sender.frames) == 7
    # Frames to the joiner through other targets are not room traffic: not held.
    hub.publish(Target.user("joiner"), "notification:new", {})
    assert joiner.names() == ["notification:new"]
    joiner.frames.clear()

    # Recovery returned seqs up to 3: those are dropped, the rest released in order.
    assert hub.finish_join(joiner, "general", 3) == 3
    events = joiner.events()
    assert [e["data"] for e in events] == [{"seq": 4}, {"seq": 5}, {"u": "x"}]
    assert hub._pending == {}
    # Live from now on.
    hub.publish(Target.room("general"), "message:new", {"seq": 7}, seq=7)
    assert joiner.events()[-1]["data"] == {"seq": 7}
    assert hub.finish_join(joiner, "general", None) == 0  # nothing pending any more
    assert_indexes_clean(hub)


def test_finish_join_without_after_seq_releases_everything(hub):
    joiner = FakeConn("j1", "joiner")
    hub.add(joiner)
    hub.join(joiner, "general", buffer=True)
    for seq in (1, 2):
        hub.publish(Target.room("general"), "message:new", {"seq": seq}, seq=seq)
    assert hub.finish_join(joiner, "general", None) == 2
    assert [e["data"]["seq"] for e in joiner.events()] == [1, 2]


def test_two_buffered_joins_in_one_room(hub):
    j1, j2 = FakeConn("j1", "u1"), FakeConn("j2", "u2")
    hub.add(j1)
    hub.add(j2)
    hub.join(j1, "general", buffer=True)
    hub.join(j2, "general", buffer=True)
    for seq in (1, 2, 3):
        hub.publish(Target.room("general"), "message:new", {"seq": seq}, seq=seq)
    assert hub.finish_join(j1, "general", 2) == 1
    assert "general" in hub._pending  # j2 still waiting
    hub.publish(Target.room("general"), "message:new", {"seq": 4}, seq=4)
    assert [e["data"]["seq"] for e in j1.events()] == [3, 4]
    assert hub.finish_join(j2, "general", 0) == 4
    assert [e["data"]["seq"] for e in j2.events()] == [1, 2, 3, 4]
    assert hub._pending == {}


def test_a_finished_join_refuses_a_late_broadcast_its_ack_carried(hub):
    """The broadcast of a message the join's query returned can come after the ack.

    A send's broadcast follows its commit by a loop step (by a Redis hop from
    another node); a join whose query read that commit may ack and release
    in between. The joiner must not get the message a second time.
    """
    live, joiner = FakeConn("l1", "u1"), FakeConn("j1", "u2")
    for conn in (live, joiner):
        hub.add(conn)
    hub.join(live, "general")
    hub.join(joiner, "general", buffer=True)
    assert hub.finish_join(joiner, "general", 5) == 0  # the ack carried seqs up to 5
    hub.publish(Target.room("general"), "message:new", {"seq": 5}, seq=5)  # late
    late = protocol.frame(protocol.event_payload("message:new", {"seq": 4}))
    hub.deliver(Target.room("general"), late, seq=4)  # later, through another node
    hub.publish(Target.room("general"), "message:new", {"seq": 6}, seq=6)
    hub.publish(Target.room("general"), "room:user_left", {"u": "x"})  # no seq: not judged
    assert [e["data"] for e in joiner.events()] == [{"seq": 6}, {"u": "x"}]
    assert [e["data"] for e in live.events()] == [{"seq": 5}, {"seq": 4}, {"seq": 6}, {"u": "x"}]
    # The floor lasts a while, then goes (swept with the heartbeat), and with the room.
    hub.sweep(time.monotonic() + JOIN_FLOOR_SECS + 1, timeout=3600.0)
    assert hub._floors == {}
    hub.join(joiner, "other", buffer=True)
    hub.finish_join(joiner, "other", 1)
    hub.leave(joiner, "other")
    assert_indexes_clean(hub)
    assert "other" not in hub._floors


def test_a_floor_that_expires_stops_refusing_while_a_lower_one_stays(hub):
    """Each joiner keeps its own floor; a room's floors are judged together, not one each."""
    live, early, late = FakeConn("l1", "u1"), FakeConn("e1", "u2"), FakeConn("j1", "u3")
    for conn in (live, early, late):
        hub.add(conn)
    hub.join(live, "general")
    hub.join(early, "general", buffer=True)
    hub.finish_join(early, "general", 3)
    expiry = time.monotonic() + JOIN_FLOOR_SECS + 1
    hub.sweep(expiry - 2, timeout=3600.0)  # nothing expired yet
    hub.join(late, "general", buffer=True)
    hub.finish_join(late, "general", 8)
    hub.publish(Target.room("general"), "message:new", {"seq": 9}, seq=9)  # above both
    hub.publish(Target.room("general"), "message:new", {"seq": 5}, seq=5)  # late's ack had it
    assert [e["data"]["seq"] for e in early.events()] == [9, 5]
    assert [e["data"]["seq"] for e in late.events()] == [9]
    # early's floor (3) expires first: seq 2 now reaches early but still not late (8).
    hub._floors["general"][late] = (8, expiry + 60)
    hub.sweep(expiry, timeout=3600.0)
    hub.publish(Target.room("general"), "message:new", {"seq": 2}, seq=2)
    assert [e["data"]["seq"] for e in early.events()] == [9, 5, 2]
    assert [e["data"]["seq"] for e in late.events()] == [9]
    assert [e["data"]["seq"] for e in live.events()] == [9, 5, 2]


def test_a_room_seq_reaches_a_node_s_members_once(hub):
    """A second copy of a seq (a re-broadcast, a catch-up racing live traffic) is dropped."""
    member, other = FakeConn("m1", "u1"), FakeConn("o1", "u2")
    for conn in (member, other):
        hub.add(conn)
        hub.join(conn, "general")
    for seq in (1, 3, 3, 2, 1):  # 3 came first through another node; 2 fills the hole
        hub.publish(Target.room("general"), "message:new", {"seq": seq}, seq=seq)
    hub.publish(Target.room("general"), "message:updated", {"edit": 3})  # no seq: not judged
    assert [e["data"] for e in member.events()] == [{"seq": 1}, {"seq": 3}, {"seq": 2}, {"edit": 3}]
    assert hub.seqs.baseline("general") == 0  # the lowest seen, less one: nothing known before
    hub.seqs.known("general", 3)
    assert hub.seqs.baseline("general") == 3
    # The room's last member leaves: a new member starts from its own join.
    for conn in (member, other):
        hub.leave(conn, "general")
    assert hub.seqs.baseline("general") is None
    hub.join(member, "general")
    member.frames.clear()
    hub.publish(Target.room("general"), "message:new", {"seq": 3}, seq=3)
    assert [e["data"] for e in member.events()] == [{"seq": 3}]


def test_a_held_room_gets_the_catch_up_first_then_what_was_held_in_order_once(hub):
    member = FakeConn("m1", "u1")
    hub.add(member)
    hub.join(member, "general")
    hub.seqs.known("general", 4)
    hub.hold("general")
    hub.hold("empty")  # no local member: nothing to hold
    assert hub.held_rooms() == ["general"]
    for seq in (8, 7):  # live, from two nodes
        hub.publish(Target.room("general"), "message:new", {"seq": seq}, seq=seq)
    hub.publish(Target.room("general"), "user:typing", {"u": "x"})  # no seq: not held
    assert [e["data"] for e in member.events()] == [{"u": "x"}]
    caught_up = [
        (seq, protocol.frame(protocol.event_payload("message:new", {"seq": seq})))
        for seq in (5, 6, 7)
    ]
    assert hub.release("general", caught_up) == 3
    assert [e["data"].get("seq") for e in member.events()] == [None, 5, 6, 7, 8]
    assert hub.held_rooms() == []
    assert hub.seqs.baseline("general") == 8


def test_a_message_sent_here_during_a_catch_up_still_skips_its_sender(hub):
    """The catch-up read a message a local connection sent while the room was held."""
    sender, member = FakeConn("s1", "u1"), FakeConn("m1", "u2")
    for conn in (sender, member):
        hub.add(conn)
        hub.join(conn, "general")
    hub.seqs.known("general", 4)
    hub.hold("general")
    hub.publish(Target.room("general"), "message:new", {"seq": 5}, exclude="s1", seq=5)
    from_db = protocol.frame(protocol.event_payload("message:new", {"seq": 5}))
    assert hub.release("general", [(5, from_db)]) == 1
    assert [e["data"] for e in member.events()] == [{"seq": 5}]
    assert sender.events() == []


def test_a_hole_outliving_many_later_seqs_is_given_up():
    seqs = RoomSeqs()
    seqs.known("general", 0)
    for seq in range(2, AHEAD_MAX + 3):  # 1 never comes
        seqs.add("general", seq)
    assert seqs.baseline("general") == AHEAD_MAX + 2
    assert seqs.seen("general", 1)


def test_buffered_frames_keep_shared_identity(hub):
    live, joiner = FakeConn("l1", "u1"), FakeConn("j1", "u2")
    hub.add(live)
    hub.add(joiner)
    hub.join(live, "general")
    hub.join(joiner, "general", buffer=True)
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1)
    hub.finish_join(joiner, "general", None)
    assert joiner.frames[0] is live.frames[0]


# -- liveness ---------------------------------------------------------------------------


def test_sweep_pings_live_and_closes_silent(hub):
    fresh, stale, edge = FakeConn("f", "u1"), FakeConn("s", "u2"), FakeConn("e", "u3")
    fresh.last_seen, stale.last_seen, edge.last_seen = 95.0, 40.0, 55.0
    for c in (fresh, stale, edge):
        hub.add(c)
    assert hub.sweep(now=100.0, timeout=45.0) == 1
    assert stale.closed == [(4408, "heartbeat timeout")] and stale.pings == 0
    assert fresh.closed == [] and fresh.pings == 1
    assert edge.closed == [] and edge.pings == 1  # exactly at the limit: still alive
    assert hub.sweep(now=100.0, timeout=45.0) == 1  # until the handler removes it
    hub.remove(stale)
    assert hub.sweep(now=100.0, timeout=45.0) == 0
    assert fresh.pings == 3


def test_sweep_counts_reading_a_backlog_as_a_sign_of_life(hub):
    """A pong stuck behind our own backlog is no silence (the budget judges that peer)."""
    reading, gone = FakeConn("r", "u1"), FakeConn("g", "u2")
    reading.last_seen = gone.last_seen = 10.0  # neither has sent anything since
    reading.outbound.progress_at = 90.0  # ... but one is still reading what we sent
    gone.outbound.progress_at = 20.0
    for c in (reading, gone):
        hub.add(c)
    assert hub.sweep(now=100.0, timeout=45.0) == 1
    assert reading.closed == [] and reading.pings == 1
    assert gone.closed == [(4408, "heartbeat timeout")]


def test_sweep_survives_connections_removing_themselves(hub):
    class Closing(FakeConn):
        def close_with(self, code: int, reason: str) -> None:
            super().close_with(code, reason)
            hub.remove(self)

    conns = [Closing(f"c{i}", f"u{i}") for i in range(5)]
    for c in conns:
        hub.add(c)
    assert hub.sweep(now=1000.0, timeout=1.0) == 5
    assert_hub_empty(hub)


# -- multi-target delivery ----------------------------------------------------------------


def test_publish_rooms_delivers_once_per_connection(hub):
    conns = populate(hub)
    hub.join(conns["a1"], "random")  # a1 is in both rooms
    hub.join(conns["b1"], "third")
    n = hub.publish_rooms(["general", "random", "third", "nowhere"], "user:status_changed", {})
    assert n == 4
    assert recipients(conns) == {"a1", "a2", "b1", "c1"}
    assert all(len(conns[c].frames) == 1 for c in ("a1", "a2", "b1", "c1"))
    clear(conns)
    assert hub.publish_rooms([], "x", {}) == 0
    assert recipients(conns) == set()


def test_publish_many_mixes_target_kinds_once_per_connection(hub):
    conns = populate(hub)
    targets = [Target.room("general"), Target.user("alice", "chat"), Target.user("bob")]
    assert hub.publish_many(targets, "room:deleted", {"roomId": "general"}) == 3
    assert recipients(conns) == {"a1", "a2", "b1"}
    assert all(len(conns[c].frames) == 1 for c in ("a1", "a2", "b1"))


# -- cluster hooks ---------------------------------------------------------------------


def test_remote_interest_on_first_and_last_subscriber():
    hub = RecordingHub()
    a1, a2 = FakeConn("a1", "alice"), FakeConn("a2", "alice", "admin")
    b1 = FakeConn("b1", "bob")
    hub.add(a1)
    assert hub.interest == [("user", "alice", True), ("namespace", "chat", True)]
    hub.interest.clear()
    hub.add(a2)
    assert hub.interest == [("namespace", "admin", True)]  # alice already known
    hub.interest.clear()
    hub.add(b1)
    assert hub.interest == [("user", "bob", True)]
    hub.interest.clear()

    hub.join(a1, "general")
    hub.join(b1, "general")
    hub.join(a1, "general")  # again: no news
    hub.join(b1, "random", buffer=True)
    assert hub.interest == [("room", "general", True), ("room", "random", True)]
    hub.interest.clear()

    hub.leave(a1, "general")
    assert hub.interest == []  # bob is still there
    hub.leave(a1, "general")
    assert hub.interest == []
    hub.remove(a1)
    assert hub.interest == []  # alice still has a2, chat still has b1
    hub.remove(b1)
    assert sorted(hub.interest) == sorted([
        ("room", "general", False),
        ("room", "random", False),
        ("user", "bob", False),
        ("namespace", "chat", False),
    ])  # fmt: skip
    hub.interest.clear()
    hub.remove(a2)
    assert sorted(hub.interest) == [("namespace", "admin", False), ("user", "alice", False)]
    assert_hub_empty(hub)


def test_remote_interest_on_clear_room():
    hub = RecordingHub()
    conns = [FakeConn(f"c{i}", f"u{i}") for i in range(3)]
    for c in conns:
        hub.add(c)
        hub.join(c, "doomed")
    hub.interest.clear()
    hub.clear_room("doomed")
    assert hub.interest == [("room", "doomed", False)]


def test_remote_publish_gets_the_payload_once_per_target():
    hub = RecordingHub()
    conn = FakeConn("a1", "alice")
    hub.add(conn)
    hub.join(conn, "general")
    hub.publish(Target.room("general"), "message:new", {"seq": 9}, exclude="a1", seq=9)
    assert conn.frames == []
    ((target, payload, exclude, seq),) = hub.remote
    assert target == Target.room("general") and exclude == "a1" and seq == 9
    assert orjson.loads(payload) == {"event": "message:new", "data": {"seq": 9}}
    hub.remote.clear()
    hub.publish_rooms(["general", "random"], "x", {})
    ((targets, payload),) = hub.recorder.remote_many  # one payload for every target
    assert targets == [Target.room("general"), Target.room("random")]
    assert orjson.loads(payload) == {"event": "x", "data": {}}


# -- two hubs on one MemoryBus: a cluster in one process ---------------------------------


def two_nodes() -> tuple[Hub, Hub]:
    bus = MemoryBus()
    return Hub("a", broker=MemoryBroker("a", bus)), Hub("b", broker=MemoryBroker("b", bus))


def test_two_hubs_on_one_bus_deliver_to_each_others_connections_once():
    a, b = two_nodes()
    alice, bob, carol = FakeConn("a1", "alice"), FakeConn("b1", "bob"), FakeConn("b2", "carol")
    a.add(alice)
    b.add(bob)
    b.add(carol)
    a.join(alice, "general")
    b.join(bob, "general")  # carol is on b but not in the room
    assert a.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1) == 1
    assert alice.names() == ["message:new"]  # once: its own echo is skipped
    assert bob.events() == [{"event": "message:new", "data": {"seq": 1}}]
    assert carol.frames == []
    b.publish(Target.room("general"), "message:new", {"seq": 2}, exclude="b1", seq=2)
    assert [e["data"] for e in alice.events()] == [{"seq": 1}, {"seq": 2}]
    assert len(bob.frames) == 1  # excluded on every node
    b.publish(Target.user("alice"), "x:user", {})
    b.publish(Target.all(), "x:all", {})
    b.publish(Target.connection("a1"), "x:conn", {})  # connection ids are node-local
    assert alice.names() == ["message:new", "message:new", "x:user", "x:all"]


def test_a_bus_follows_interest_like_redis():
    a, b = two_nodes()
    bob = FakeConn("b1", "bob")
    b.add(bob)
    assert b.broker.subscribed_channels() == {"all", "node:b", "user:bob", "ns:chat"}
    b.join(bob, "general")
    assert "room:general" in b.broker.subscribed_channels()
    b.leave(bob, "general")
    assert "room:general" not in b.broker.subscribed_channels()
    # Nobody on b in the room: a's broadcast never reaches b's hub.
    reached: list[Target] = []
    b.deliver = lambda target, frame, **kw: reached.append(target) or 0  # type: ignore[method-assign]
    a.publish(Target.room("general"), "message:new", {})
    assert reached == []
    a.publish(Target.user("bob"), "x", {})
    assert reached == [Target.user("bob")]


def test_publish_many_reaches_each_remote_connection_once():
    a, b = two_nodes()
    bob, bob2 = FakeConn("b1", "bob"), FakeConn("b2", "bob", "admin")
    for conn in (bob, bob2):
        b.add(conn)
    b.join(bob, "general")
    b.join(bob, "random")
    targets = [Target.room("general"), Target.room("random"), Target.user("bob")]
    assert a.publish_many(targets, "room:deleted", {}) == 0  # nobody local
    assert bob.names() == ["room:deleted"] and bob2.names() == ["room:deleted"]


def test_a_role_target_crosses_to_the_nodes_with_that_role_only():
    a, b = two_nodes()
    c = Hub("c", broker=MemoryBroker("c", a.broker.bus))  # type: ignore[attr-defined]
    mod = FakeConn("b1", "mia", roles=("moderator",))
    bob = FakeConn("c1", "bob", roles=("user",))
    b.add(mod)
    c.add(bob)
    assert "role:moderator" in b.broker.subscribed_channels()
    assert "role:moderator" not in c.broker.subscribed_channels()
    reached: list[Target] = []
    c.deliver = lambda target, frame, **kw: reached.append(target) or 0  # type: ignore[method-assign]
    assert a.publish(Target.role("moderator"), "x:mods", {}) == 0  # nobody on a
    assert mod.names() == ["x:mods"]
    assert reached == []  # c has no moderator: it never hears the role channel
    a.publish(Target.role("moderator", "admin"), "x:admin_mods", {})
    assert mod.names() == ["x:mods"]  # b hears it, and applies the namespace

    mod.roles = frozenset({"user"})  # refreshed without the role
    b.update_roles(mod)
    assert "role:moderator" not in b.broker.subscribed_channels()
    a.publish(Target.role("moderator"), "x:mods", {})
    a.publish(Target.role("user"), "x:users", {})
    assert mod.names() == ["x:mods", "x:users"]
    assert reached == [Target.role("user")]


def test_control_messages_reach_the_other_nodes_not_the_sender():
    a, b = two_nodes()
    heard: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    a.broker.on_control("hello", heard["a"].append)
    b.broker.on_control("hello", heard["b"].append)
    a.broker.send_control("hello", {"n": 1})
    a.broker.send_control("hello", {"n": 2}, node="b")
    a.broker.send_control("hello", {"n": 3}, target=Target.user("bob"))  # bob is nowhere
    b.add(FakeConn("b1", "bob"))
    a.broker.send_control("hello", {"n": 4}, target=Target.user("bob"))
    assert heard == {"a": [], "b": [{"n": 1}, {"n": 2}, {"n": 4}]}
    with pytest.raises(ValueError):
        a.broker.send_control("hello", {}, target=Target.connection("b1"))


@pytest.mark.asyncio
async def test_a_stopped_node_leaves_the_bus():
    a, b = two_nodes()
    bob = FakeConn("b1", "bob")
    b.add(bob)
    assert await b.broker.start() and await b.broker.check() == (True, None)
    await b.broker.stop()
    a.publish(Target.user("bob"), "x", {})
    assert bob.frames == []


def test_a_hub_alone_is_a_cluster_of_one(hub):
    assert isinstance(hub.broker, MemoryBroker) and hub.broker.ok and hub.broker.reason is None
    conn = FakeConn("a1", "alice")
    hub.add(conn)
    hub.publish(Target.user("alice"), "x", {})
    assert conn.names() == ["x"]


# -- write coalescing (the node's hub) --------------------------------------------------


def split_frames(data: bytes) -> list[bytes]:
    """Cut one socket write into its WebSocket frames, checking each one."""
    frames = []
    while data:
        length, offset = frame_header(data)
        frames.append(data[: offset + length])
        data = data[offset + length :]
    for frame in frames:
        decode_frame(frame)
    return frames


class HandlerConn(FakeConn):
    """Like the handlers: a direct send first writes what the hub queued for it.

    ``frames`` records socket writes, which may each hold several frames.
    """

    def __init__(self, hub: Hub, conn_id: str, user_id: str) -> None:
        super().__init__(conn_id, user_id)
        self.hub = hub

    def send_frame(self, frame: bytes) -> bool:
        self.hub.flush_to(self)
        return self.write_frame(frame)

    def write_frame(self, frame: bytes, frames: int = 1) -> bool:
        if not self.accept:
            return False
        self.frames.append(frame)
        return True

    def seqs(self) -> list[list[int]]:
        """Per write, the ``seq`` of each frame in it."""
        return [
            [orjson.loads(decode_frame(f))["data"]["seq"] for f in split_frames(w)]
            for w in self.frames
        ]


class CountingHub(Hub):
    def __init__(self) -> None:
        super().__init__("n1", coalesce=True)
        self.flushes = 0
        self.delivered: list[tuple[int, int]] = []
        self._on_delivered = lambda count, nbytes: self.delivered.append((count, nbytes))

    def flush(self) -> int:
        self.flushes += 1
        return super().flush()


def coalescing_room(size: int = 3) -> tuple[CountingHub, list[HandlerConn]]:
    hub = CountingHub()
    conns = [HandlerConn(hub, f"c{i}", f"u{i}") for i in range(size)]
    for c in conns:
        hub.add(c)
        hub.join(c, "general")
    return hub, conns


async def next_iteration() -> None:
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_coalescing_writes_an_iterations_broadcasts_in_one_write():
    hub, conns = coalescing_room()
    for seq in (1, 2, 3):
        assert hub.publish(Target.room("general"), "message:new", {"seq": seq}, seq=seq) == 3
    assert hub.publish(Target.user("u0"), "message:new", {"seq": 99}) == 1
    assert all(c.frames == [] for c in conns)  # nothing written yet
    await next_iteration()
    assert hub.flushes == 1
    assert conns[0].seqs() == [[1, 2, 3, 99]]  # one write, frames in publish order
    assert conns[1].seqs() == conns[2].seqs() == [[1, 2, 3]]
    assert hub.delivered == [(10, sum(len(w) for c in conns for w in c.frames))]
    # The next iteration's broadcast is a write of its own.
    hub.publish(Target.room("general"), "message:new", {"seq": 4}, seq=4, exclude="c1")
    await next_iteration()
    assert hub.flushes == 2
    assert conns[0].seqs() == [[1, 2, 3, 99], [4]] and conns[1].seqs() == [[1, 2, 3]]
    await next_iteration()
    assert hub.flushes == 2  # nothing queued: no flush scheduled


@pytest.mark.asyncio
async def test_a_direct_send_writes_the_queued_broadcasts_first():
    hub, conns = coalescing_room()
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1)
    direct = protocol.frame(protocol.event_payload("ack", {"seq": 2}))
    assert conns[0].send_frame(direct)
    assert conns[0].seqs() == [[1], [2]]
    assert conns[1].frames == []  # the others still wait for the flush
    await next_iteration()
    assert conns[0].seqs() == [[1], [2]]  # not written twice
    assert conns[1].seqs() == conns[2].seqs() == [[1]]
    size = len(conns[1].frames[0])
    assert hub.delivered == [(1, size), (2, 2 * size)]


@pytest.mark.asyncio
async def test_send_soon_shares_the_iterations_write_and_is_no_delivery():
    hub, conns = coalescing_room()
    ack = protocol.frame(protocol.event_payload("ack", {"seq": 0}))
    assert hub.send_soon(conns[0], ack)
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1)
    assert conns[0].frames == []
    await next_iteration()
    assert hub.flushes == 1
    assert conns[0].seqs() == [[0, 1]]  # the ack and the broadcast in one write, in order
    size = len(conns[1].frames[0])
    assert hub.delivered == [(3, 3 * size)]  # the ack is not counted as a delivery
    # A direct write flushes a queued ack first, and it is still no delivery.
    hub.send_soon(conns[1], ack)
    hub.publish(Target.room("general"), "message:new", {"seq": 2}, seq=2, exclude="c1")
    assert conns[1].send_frame(protocol.frame(protocol.event_payload("x", {"seq": 3})))
    assert conns[1].seqs() == [[1], [0], [3]]
    await next_iteration()
    assert hub.delivered[1:] == [(2, 2 * size)]


@pytest.mark.asyncio
async def test_the_senders_ack_is_written_before_the_rooms_broadcast():
    """The sender waits for its ack; the members' writes are one send() each after it."""
    hub, conns = coalescing_room(4)
    order: list[str] = []
    for conn in conns:
        write = conn.write_frame

        def logged(frame: bytes, frames: int = 1, conn: HandlerConn = conn, write=write) -> bool:
            order.append(conn.conn_id)
            return write(frame, frames)

        conn.write_frame = logged  # type: ignore[method-assign]
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1, exclude="c2")
    hub.send_soon(conns[2], protocol.frame(protocol.event_payload("ack", {"seq": 0})))
    await next_iteration()
    assert order[0] == "c2" and sorted(order[1:]) == ["c0", "c1", "c3"]
    assert conns[2].seqs() == [[0]]
    assert [c.seqs() for c in (conns[0], conns[1], conns[3])] == [[[1]]] * 3


@pytest.mark.asyncio
async def test_an_ack_with_nothing_queued_is_written_at_once():
    """A lone send's ack skips the flush; once anything is queued, it shares the flush's write."""
    hub, conns = coalescing_room()
    assert hub.send_ack(conns[0], protocol.frame(protocol.event_payload("ack", {"seq": 0})))
    assert conns[0].seqs() == [[0]]  # written now: nothing was queued
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1, exclude="c0")
    assert hub.send_ack(conns[1], protocol.frame(protocol.event_payload("ack", {"seq": 2})))
    assert conns[1].frames == []  # a broadcast is queued: the ack waits for the flush
    await next_iteration()
    assert hub.flushes == 1
    assert conns[0].seqs() == [[0]]
    assert conns[1].seqs() == [[1, 2]]  # one write, in the order queued
    assert conns[2].seqs() == [[1]]
    assert hub.delivered == [(2, 2 * len(conns[2].frames[0]))]  # acks are no deliveries


@pytest.mark.asyncio
async def test_a_lone_broadcast_skips_its_sender_and_counts_only_the_writes_taken():
    hub, conns = coalescing_room(4)
    conns[3].accept = False  # gone, or over its budget
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1, exclude="c0")
    assert hub.flush() == 3  # the others, one write each; the refused one too
    assert conns[0].frames == [] and conns[3].frames == []
    assert conns[1].seqs() == conns[2].seqs() == [[1]]
    assert hub.delivered == [(2, 2 * len(conns[1].frames[0]))]


@pytest.mark.asyncio
async def test_send_soon_without_coalescing_writes_at_once():
    hub = Hub("n1")
    conn = HandlerConn(hub, "c0", "u0")
    hub.add(conn)
    frame = protocol.frame(protocol.event_payload("ack", {"seq": 7}))
    assert hub.send_soon(conn, frame)
    assert conn.seqs() == [[7]]


@pytest.mark.asyncio
async def test_coalescing_skips_removed_and_failing_connections():
    hub, conns = coalescing_room(4)
    gone, slow = conns[0], conns[1]

    def drop(frame: bytes, frames: int = 1) -> bool:  # a slow consumer closes from inside its write
        hub.remove(slow)
        return False

    slow.write_frame = drop  # type: ignore[method-assign]
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1)
    hub.remove(gone)
    await next_iteration()
    assert gone.frames == [] and slow.frames == []
    assert conns[2].seqs() == conns[3].seqs() == [[1]]
    assert hub.delivered == [(2, 2 * len(conns[2].frames[0]))]
    assert hub.active_rooms() == {"general": 2} and hub.flush() == 0  # nothing left queued


@pytest.mark.asyncio
async def test_coalescing_keeps_buffered_joins_in_order():
    hub, (live,) = coalescing_room(1)
    joiner = HandlerConn(hub, "j1", "joiner")
    hub.add(joiner)
    hub.join(joiner, "general", buffer=True)
    for seq in (1, 2, 3):
        hub.publish(Target.room("general"), "message:new", {"seq": seq}, seq=seq)
    hub.publish(Target.user("joiner"), "message:new", {"seq": 50})  # not room traffic
    # The recovery query returned seq 1; the rest is released after what was queued.
    assert hub.finish_join(joiner, "general", 1) == 2
    hub.publish(Target.room("general"), "message:new", {"seq": 4}, seq=4)
    await next_iteration()
    assert [seq for write in joiner.seqs() for seq in write] == [50, 2, 3, 4]
    assert live.seqs() == [[1, 2, 3, 4]]


@pytest.mark.asyncio
async def test_coalescing_keeps_publish_order_across_rooms_and_targets():
    """Broadcasts to two rooms, a user and an ack interleave in one iteration:
    each connection gets exactly its frames, in publish order, in one write."""
    hub, conns = coalescing_room(4)  # c0..c3 in general
    for conn in conns[2:]:
        hub.join(conn, "other")  # c2, c3 in both rooms
    ack = protocol.frame(protocol.event_payload("ack", {"seq": 0}))
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1, exclude="c0")
    hub.publish(Target.room("other"), "message:new", {"seq": 2}, seq=2)
    hub.send_soon(conns[0], ack)
    hub.publish(Target.user("u3"), "message:new", {"seq": 3})
    hub.publish(Target.room("general"), "message:new", {"seq": 4}, seq=4, exclude="c2")
    hub.publish(Target.room("other"), "message:new", {"seq": 5}, seq=5, exclude="c3")
    await next_iteration()
    assert hub.flushes == 1
    assert [c.seqs() for c in conns] == [
        [[0, 4]],
        [[1, 4]],
        [[1, 2, 5]],
        [[1, 2, 3, 4]],
    ]
    frames = sum(len(split_frames(w)) for c in conns for w in c.frames) - 1  # not the ack
    assert hub.delivered == [(frames, sum(len(w) for c in conns for w in c.frames) - len(ack))]


@pytest.mark.asyncio
async def test_coalescing_follows_membership_changes_within_an_iteration():
    """A join or leave between two broadcasts of one iteration applies from the next one."""
    hub, conns = coalescing_room(2)
    newcomer = HandlerConn(hub, "n1", "un")
    hub.add(newcomer)
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1)
    hub.join(newcomer, "general")
    hub.leave(conns[1], "general")
    hub.publish(Target.room("general"), "message:new", {"seq": 2}, seq=2)
    direct = protocol.frame(protocol.event_payload("x", {"seq": 3}))
    assert newcomer.send_frame(direct)  # flushes its queued frame (2) first
    hub.publish(Target.room("general"), "message:new", {"seq": 4}, seq=4)
    await next_iteration()
    assert conns[0].seqs() == [[1, 2, 4]]
    assert conns[1].seqs() == [[1]]  # queued before it left
    assert newcomer.seqs() == [[2], [3], [4]]


@pytest.mark.asyncio
async def test_coalesced_writes_stay_within_a_write_size_cap():
    """Joined writes are capped, so a burst of frames that each fit the outbound
    budget is not refused for being joined; a bigger frame goes alone."""
    hub, (conn,) = coalescing_room(1)
    sizes = [20_000, 20_000, 20_000, 20_000, 100_000, 300, 300]
    for seq, size in enumerate(sizes, 1):
        hub.publish(Target.room("general"), "message:new", {"seq": seq, "x": "y" * size}, seq=seq)
    await next_iteration()
    assert conn.seqs() == [[1, 2, 3], [4], [5], [6, 7]]
    assert all(len(w) <= COALESCE_MAX_BYTES for w in conn.frames if len(split_frames(w)) > 1)
    assert hub.delivered == [(7, sum(len(w) for w in conn.frames))]


@pytest.mark.asyncio
async def test_a_refused_coalesced_write_stops_the_connections_writes():
    hub, (conn,) = coalescing_room(1)
    writes: list[bytes] = []

    # The second write finds the connection closed.
    def first_only(data: bytes, frames: int = 1) -> bool:
        writes.append(data)
        return len(writes) == 1

    conn.write_frame = first_only  # type: ignore[method-assign]
    for seq in (1, 2, 3):
        hub.publish(Target.room("general"), "message:new", {"seq": seq, "x": "y" * 40_000})
    await next_iteration()
    assert len(writes) == 2  # [1], then [2] refused: [3] is not tried
    assert hub.delivered == [(1, len(writes[0]))]


@pytest.mark.asyncio
async def test_a_refused_ack_does_not_make_the_delivered_count_negative():
    """Direct frames are subtracted from the count only when they were written.

    An ack queued for a connection that closed meanwhile was never written;
    subtracting it anyway made ``bytes_sent`` go negative (a ValueError in
    the flush, found by the PostgreSQL fuzz run).
    """
    delivered: list[tuple[int, int]] = []
    hub = Hub("n1", coalesce=True, on_delivered=lambda n, size: delivered.append((n, size)))
    gone, live = FakeConn("g1", "u1"), FakeConn("l1", "u2")
    for conn in (gone, live):
        hub.add(conn)
        hub.join(conn, "general")
    hub.send_soon(gone, protocol.frame(protocol.ack_payload(1, {"ok": True})))
    gone.accept = False
    hub.publish(Target.room("general"), "message:new", {"seq": 1}, seq=1)
    hub.flush()
    assert delivered == [(1, len(live.frames[0]))]
