"""bench/peers: the driver's smoke run against Switchboard, and the Socket.IO packet codec.

The peer servers themselves need npm and pip downloads, so the suite does not
start them; ``python -m bench.peers`` exercises them. The smoke run only checks
that every workload produces its figures (a benchmark asserts nothing about speed).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench._wsclient import LeanWS
from bench.peers import sio
from bench.peers.driver import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_quick_run_against_switchboard_gives_figures_for_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--quick", "--servers", "switchboard",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=230,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| workload | Switchboard (persisted) |" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(WORKLOADS)
    for workload, by_server in results.items():
        (figures,) = by_server["switchboard"]
        assert figures, workload
        for name, value in figures.items():
            assert math.isfinite(value), (workload, name, value)
    for workload in ("fanout100", "fanout1000"):
        assert results[workload]["switchboard"][0]["deliveries_per_s"] > 0
        assert results[workload]["switchboard"][0]["server_us_per_delivery"] > 0
    assert results["latency"]["switchboard"][0]["ack_p50_ms"] > 0
    assert results["latency"]["switchboard"][0]["deliver_p50_ms"] > 0
    assert results["connect"]["switchboard"][0]["conn_per_s"] > 0
    assert "[!]" not in run.stderr, run.stderr  # nothing lost, refused or failed


def test_event_packets_carry_the_ack_id_between_type_and_payload() -> None:
    assert sio.encode_event("join", {"room": "r"}) == b'42["join",{"room":"r"}]'
    assert sio.encode_event("send", {"a": 1}, ack_id=17) == b'4217["send",{"a":1}]'
    assert sio.decode(b'4217["send",{"a":1}]') == ("event", 17, ["send", {"a": 1}])
    assert sio.decode(b'42["message",{"bt":1.5}]') == ("event", None, ["message", {"bt": 1.5}])


def test_acks_round_trip_with_multi_digit_ids() -> None:
    packet = sio.encode_ack(1234, {"ok": True, "id": 9})
    assert packet == b'431234[{"ok":true,"id":9}]'
    assert sio.decode(packet) == ("ack", 1234, [{"ok": True, "id": 9}])
    assert sio.decode(b"430[]") == ("ack", 0, [])


def test_connect_open_and_errors_decode() -> None:
    assert sio.encode_connect({"token": "t.j.w"}) == b'40{"token":"t.j.w"}'
    assert sio.decode(b'40{"sid":"abc"}') == ("connect", None, {"sid": "abc"})
    assert sio.decode(b'44{"message":"unauthorized"}') == (
        "connect_error", None, {"message": "unauthorized"})  # fmt: skip
    kind, _, opened = sio.decode(b'0{"sid":"x","upgrades":[],"pingInterval":25000}')
    assert kind == "open" and opened["pingInterval"] == 25000


def test_ping_pong_and_close_are_bare_engine_io_packets() -> None:
    assert sio.decode(sio.PING) == ("ping", None, None)
    assert sio.decode(sio.PONG) == ("pong", None, None)
    assert sio.decode(b"1") == ("close", None, None)
    assert sio.decode(b"41") == ("disconnect", None, None)


@pytest.mark.parametrize("packet", [b"", b"9", b"4", b"47[]", b'42/chat,["x"]'])
def test_what_the_codec_does_not_speak_is_refused(packet: bytes) -> None:
    with pytest.raises(ValueError):
        sio.decode(packet)


class _Transport:
    """Collects what the client writes (the client under test is the harness itself)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def _server_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


def _unmask(frame: bytes) -> bytes:
    n = frame[1] & 0x7F
    key, body = frame[2:6], frame[6 : 6 + n]
    return bytes(b ^ key[i % 4] for i, b in enumerate(body))


@pytest.mark.asyncio
async def test_the_client_connects_with_its_token_answers_pings_and_counts_deliveries() -> None:
    tally = sio.Tally(clock=lambda: 10.0)
    ws = sio.SioWS("127.0.0.1", 1, sio.PATH, "tok", tally)
    ws.transport = _Transport()  # type: ignore[assignment]
    ws._upgraded = True
    ws.data_received(_server_frame(b'0{"sid":"s","upgrades":[]}'))
    assert _unmask(ws.transport.written[-1]) == b'40{"token":"tok"}'  # type: ignore[attr-defined]
    ws.data_received(_server_frame(b'40{"sid":"x"}'))
    assert ws.welcome.result() == {"sid": "x"}
    ws.data_received(_server_frame(b"2"))
    assert _unmask(ws.transport.written[-1]) == b"3"  # type: ignore[attr-defined]
    fut = ws.post("r", "hi", 9.5)
    assert _unmask(ws.transport.written[-1]).startswith(b'421["send",')  # type: ignore[attr-defined]
    ws.data_received(_server_frame(b'431[{"ok":true,"id":3}]'))
    assert fut.result() == {"ok": True, "id": 3}
    ws.data_received(_server_frame(b'42["message",{"id":3,"metadata":{"bt":9.5}}]'))
    assert tally.count == 1 and list(tally.latencies) == [0.5]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("cls", "ack"),
    [(sio.SioWS, b'431[{"ok":true}]'), (LeanWS, b'{"ack":1,"ok":true,"data":{}}')],
)
async def test_an_ack_is_timed_from_the_frame_written_to_the_read_that_brought_it(
    cls: type[LeanWS], ack: bytes
) -> None:
    ws = cls("127.0.0.1", 1, "/", "tok", sio.Tally())
    ws.transport = _Transport()  # type: ignore[assignment]
    ws._upgraded = True
    ws.stamp_acks = True
    before = time.monotonic()
    fut = ws.post("r", "hi", before)
    wrote_at = ws.wrote_at
    assert before <= wrote_at <= time.monotonic()
    ws.data_received(_server_frame(ack))
    read_at = ws.ack_read_at[fut]
    assert fut.result()["ok"] is True
    assert wrote_at <= read_at <= time.monotonic()
    # Unset (every other bench), no read time is kept.
    ws.stamp_acks = False
    fut = ws.post("r", "hi", time.monotonic())
    ws.data_received(_server_frame(ack.replace(b"1", b"2", 1)))
    assert fut.done() and fut not in ws.ack_read_at
