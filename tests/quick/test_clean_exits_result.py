"""The committed result of tests/process/clean_exits.py (docs/results/cpu/clean_exits.json): after a rank is killed,
the rerun that finishes the run exits 0 on every rank, every time."""

from __future__ import annotations

import json
from pathlib import Path

RESULT = Path(__file__).resolve().parents[2] / "docs" / "results" / "cpu" / "clean_exits.json"


def test_twenty_reruns_after_a_killed_rank_each_exit_0_without_an_abort():
    rounds = json.loads(RESULT.read_text())["rounds"]
    assert len(rounds) >= 20
    for row in rounds:
        assert row["killed_exit"] != 0  # the kill landed: the first run failed
        assert row["rerun_exit"] == 0 and row["done"] and not row["aborted"], row
