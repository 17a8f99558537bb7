"""recipes.metrics.MetricsLogger on a resume: metrics.jsonl keeps the steps up to the checkpoint and drops what a
crash tore, with a backup and one warning."""

import json

from recipes.config import Config
from recipes.metrics import MetricsLogger
from recipes.run.runs import read_metrics


def test_a_resumed_run_drops_later_metrics_and_a_line_torn_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": step, "loss": 9.0 - step}) + "\n" for step in (1, 2, 3))
    path.write_text(rows + '{"step": 4, "lo')
    MetricsLogger(tmp_path, Config(), enabled=True, resume_step=2)
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def test_torn_lines_anywhere_are_dropped_on_resume_with_a_backup_and_one_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": step, "loss": 9.0 - step}) + "\n" for step in range(1, 6)]
    original = rows[0] + '{"step": 2, "lo\n' + rows[2] + "\x00\x00\x00\n" + rows[3] + rows[4]  # two torn lines
    path.write_text(original)
    with caplog.at_level("WARNING", logger="recipes.metrics"):
        MetricsLogger(tmp_path, Config(), enabled=True, resume_step=4)
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 3, 4]
    [backup] = tmp_path.glob("metrics.jsonl.torn-*")
    assert backup.read_text() == original
    assert caplog.text.count("torn line") == 1 and "2 torn line(s)" in caplog.text
