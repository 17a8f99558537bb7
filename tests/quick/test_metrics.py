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


def _row(step: int, **extra) -> dict:
    return {
        "step": step,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_sec_per_gpu": 1000.0,
        "mfu": None,
        "tokens": step * 4096,
        "peak_memory_gib": 1.5,
        **extra,
    }


def test_the_console_line_says_where_the_run_is_and_names_cpu_units_honestly():
    from recipes.metrics import console_line

    cpu = console_line(_row(25), total_steps=100, seconds_per_step=2.0, on_cpu=True)
    assert cpu.startswith("step  25/100 (25%) | loss 2.5000")
    assert "| 1,000 tok/s/process | tokens 102K | rss 1.50 GiB | eta 2m30s" in cpu
    gpu = console_line(_row(100, val_loss=2.25), total_steps=100, seconds_per_step=2.0, on_cpu=False)
    assert "tok/s/gpu" in gpu and "| mem 1.50 GiB | val_loss 2.2500" in gpu and "eta" not in gpu  # the last step


def test_human_units():
    from recipes.metrics import human_count, human_duration

    assert [human_count(n) for n in (512, 81_920, 1_234_567, 4.5e9)] == ["512", "81.9K", "1.23M", "4.5B"]
    assert [human_duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
