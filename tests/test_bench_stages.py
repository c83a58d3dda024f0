"""bench/stages: a short probed run gives a row for every stage, and the marks parse.

A benchmark asserts nothing about speed; these check that the probes still
find the functions they wrap (a rename would leave them without a send) and
that interleaved sends are left out rather than mixed up.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import stages

ROOT = Path(__file__).resolve().parent.parent


def _send(start: int, statements: tuple[str, ...] = ("SELECT", "COMMIT")) -> list[tuple[str, int]]:
    marks, t = [], start
    for tag in stages.ORDER:
        t += 10
        marks.append((tag, t))
        if tag == "db thread":
            for statement in statements:
                marks += [("sql", t + 1), ("sql " + statement, t + 3)]
                t += 3
        if tag == "back":  # the database thread writes the ack while the loop goes on
            marks += [("ack", t + 1), ("acked", t + 4)]
    return marks


def test_only_sends_whose_probes_did_not_interleave_are_kept() -> None:
    first, second, third = _send(0), _send(1000), _send(2000)
    mixed = second[:5] + third  # a second frame arrived before the first send finished
    clean = stages.sends(first + mixed)
    assert [s[0][1] for s in clean] == [first[0][1], third[0][1]]
    rows = dict(stages.table(clean))
    assert rows["envelope"] == pytest.approx(0.010)  # 10 ns, in µs
    assert rows["db done"] == pytest.approx(0.010 + 0.006)  # after the job's statements
    assert rows["  SELECT"] == pytest.approx(0.002)
    assert rows["ack (thread)"] == pytest.approx(0.011)  # from db done, across back
    assert rows["acked (thread)"] == pytest.approx(0.003)


def test_a_send_whose_ack_the_loop_wrote_is_left_out() -> None:
    loop_acked = [mark for mark in _send(0) if mark[0] not in stages.THREAD]
    assert stages.sends(loop_acked + _send(1000)) == stages.sends(_send(1000))
    assert len(stages.sends(_send(1000))) == 1


@pytest.mark.timeout(120)
def test_a_short_probed_run_reports_every_stage() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.stages", "--seconds", "1", "--rate", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "client: send→ack p50" in out
    totals = ["total (readable to acked)", "total (readable to written)"]
    for stage in [*stages.ORDER[1:], "ack (thread)", "acked (thread)", *totals, "COMMIT"]:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(stage)), None)
        assert line is not None, (stage, out)
        assert math.isfinite(float(line.split()[-1])), line
