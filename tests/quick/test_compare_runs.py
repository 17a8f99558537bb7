"""scripts/compare_runs.py and recipes.run.runs.read_metrics on run dirs written here, as train.py lays them out."""

from __future__ import annotations

import json
import math
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.errors import USER_ERROR_EXIT_CODE, UserError
from recipes.run.runs import load_run, read_metrics

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_runs.py"
compare_main = runpy.run_path(str(SCRIPT))["main"]


def reference_loss(step: int) -> float:
    return 1.0 + 9.0 * math.exp(-step / 15)


def write_run(run_dir: Path, attention: str | None, steps=range(1, 41), offset=lambda step: 0.0) -> Path:
    """A run dir with metrics.jsonl (loss = reference_loss + offset(step)) and, if attention, config.toml."""
    run_dir.mkdir(parents=True)
    if attention:
        (run_dir / "config.toml").write_text(f'[model]\nattention = "{attention}"\nmask = "document"\n')
    rows = [{"step": step, "loss": reference_loss(step) + offset(step), "lr": 3e-4, "grad_norm": 1.0} for step in steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def three_backends(tmp_path):
    """sdpa, flex, varlen runs that differ by fp32-sized noise."""
    return [
        write_run(tmp_path / "qwen3_sdpa", "sdpa"),
        write_run(tmp_path / "qwen3_flex", "flex", offset=lambda step: 1e-7 * (step % 3)),
        write_run(tmp_path / "qwen3_varlen", "varlen", offset=lambda step: -1e-7 * (step % 2)),
    ]


def test_agreeing_runs_pass_and_write_png_and_json(three_backends, tmp_path, capsys):
    png, table = tmp_path / "plots" / "agree.png", tmp_path / "agree.json"
    code = compare_main([*map(str, three_backends), "--tolerance", "1e-5", "--mean-tolerance", "1e-5",
                         "--png", str(png), "--json", str(table)])
    out = capsys.readouterr().out
    assert code == 0, out
    width, height = png_size(png)
    assert width > 100 and height > 100
    result = json.loads(table.read_text())
    assert result["passed"] is True
    assert [run["label"] for run in result["runs"]] == ["sdpa", "flex", "varlen"]
    pairs = [(pair["a"], pair["b"]) for pair in result["pairs"]]
    assert pairs == [("sdpa", "flex"), ("sdpa", "varlen"), ("flex", "varlen")]
    sdpa_flex = result["pairs"][0]
    assert sdpa_flex["steps"] == 40
    assert sdpa_flex["max_abs_diff"] == pytest.approx(2e-7, rel=1e-3)
    assert sdpa_flex["max_at_step"] % 3 == 2
    assert "all 3 pairs agree" in out


def test_diverging_run_exits_1_and_windows_show_where(three_backends, tmp_path, capsys):
    # varlen drifts by 0.1 from step 21 on: only its two pairs fail, and only in the windows after step 20.
    three_backends[2] = write_run(tmp_path / "qwen3_varlen_bad", "varlen",
                                  offset=lambda step: 0.1 if step > 20 else 0.0)
    table = tmp_path / "diverge.json"
    code = compare_main([*map(str, three_backends), "--tolerance", "0.05", "--window", "10",
                         "--png", str(tmp_path / "diverge.png"), "--json", str(table)])
    out = capsys.readouterr().out
    assert code == 1
    result = json.loads(table.read_text())
    assert [pair["passed"] for pair in result["pairs"]] == [True, False, False]
    sdpa_varlen = result["pairs"][1]
    assert sdpa_varlen["max_abs_diff"] == pytest.approx(0.1)
    assert sdpa_varlen["max_at_step"] > 20
    windows = [(w["first_step"], w["last_step"]) for w in sdpa_varlen["windows"]]
    assert windows == [(1, 10), (11, 20), (21, 30), (31, 40)]
    assert [w["max_abs_diff"] > 0.05 for w in sdpa_varlen["windows"]] == [False, False, True, True]
    assert "21-30" in out and "1.00e-01*" in out
    assert "exceeds tolerance: sdpa vs varlen, flex vs varlen" in out


@pytest.mark.parametrize("steps, expected", [
    (range(1, 41), [(s, s + 3, 4) for s in range(1, 41, 4)]),  # ten windows
    # log_every 5: each window holds whole intervals
    (range(5, 101, 5), [(s, min(s + 9, 100), 2) for s in range(5, 101, 10)]),
])
def test_default_windows_cover_the_run_in_ten(tmp_path, steps, expected):
    runs = [write_run(tmp_path / name, name, steps=steps) for name in ("sdpa", "flex")]
    table = tmp_path / "windows.json"
    compare_main([*map(str, runs), "--png", str(tmp_path / "w.png"), "--json", str(table)])
    windows = json.loads(table.read_text())["pairs"][0]["windows"]
    assert [(w["first_step"], w["last_step"], w["steps"]) for w in windows] == expected


def test_mean_tolerance_catches_a_small_constant_bias(tmp_path, capsys):
    a = write_run(tmp_path / "a", "sdpa")
    b = write_run(tmp_path / "b", "flex", offset=lambda step: 0.01)
    args = [str(a), str(b), "--tolerance", "0.05", "--png", str(tmp_path / "bias.png")]
    assert compare_main(args + ["--mean-tolerance", "0.02"]) == 0
    assert compare_main(args + ["--mean-tolerance", "0.005"]) == 1
    assert "EXCEEDS mean" in capsys.readouterr().out


def test_skip_steps_ignores_an_early_spike(tmp_path):
    a = write_run(tmp_path / "a", "sdpa")
    b = write_run(tmp_path / "b", "flex", offset=lambda step: 0.5 if step <= 3 else 0.0)
    args = [str(a), str(b), "--tolerance", "0.05", "--png", str(tmp_path / "skip.png")]
    assert compare_main(args) == 1
    assert compare_main(args + ["--skip-steps", "3"]) == 0


def test_nonfinite_loss_fails_the_pair(tmp_path, capsys):
    a = write_run(tmp_path / "a", "sdpa")
    b = write_run(tmp_path / "b", "flex", offset=lambda step: math.nan if step == 7 else 0.0)
    table = tmp_path / "nan.json"
    assert compare_main([str(a), str(b), "--png", str(tmp_path / "nan.png"), "--json", str(table)]) == 1
    assert json.loads(table.read_text())["pairs"][0]["nonfinite_steps"] == [7]
    assert "1 non-finite steps" in capsys.readouterr().out


def test_same_backend_twice_gets_told_apart_and_labels_override(tmp_path):
    a, b = write_run(tmp_path / "sdpa_seed0", "sdpa"), write_run(tmp_path / "sdpa_seed1", "sdpa")
    table = tmp_path / "twins.json"
    compare_main([str(a), str(b), "--png", str(tmp_path / "t.png"), "--json", str(table)])
    assert [run["label"] for run in json.loads(table.read_text())["runs"]] == ["sdpa (sdpa_seed0)", "sdpa (sdpa_seed1)"]
    compare_main([str(a), str(b), "--labels", "first,second", "--png", str(tmp_path / "t.png"), "--json", str(table)])
    assert [run["label"] for run in json.loads(table.read_text())["runs"]] == ["first", "second"]


def test_label_falls_back_to_the_folder_name(tmp_path):
    assert load_run(str(write_run(tmp_path / "my_run", attention=None))).label == "my_run"


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or directory"),
    ("no_metrics", "neither metrics.jsonl nor a run-*.wandb file"),
    ("no_overlap", "share no logged step"),
    ("no_loss", "no 'loss' logged"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, message):
    good = write_run(tmp_path / "good", "sdpa")
    other = {
        "missing": tmp_path / "absent",
        "no_metrics": tmp_path,
        "no_overlap": write_run(tmp_path / "later", "flex", steps=range(100, 110)),
        "no_loss": tmp_path / "no_loss",
    }[case]
    if case == "no_loss":
        other.mkdir()
        (other / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    assert compare_main([str(good), str(other), "--png", str(tmp_path / "x.png")]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [["only_one"], ["a", "b", "--tolerance", "-1"], ["a", "b", "--window", "0"],
                                  ["a", "b", "--labels", "x,y,z"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    assert "error:" in capsys.readouterr().err


def test_cli_from_another_cwd_writes_png_next_to_the_runs(three_backends, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, three_backends), "--tolerance", "1e-5"],
                            cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "compare.png")[0] > 0


def test_read_metrics_keeps_whole_lines_and_the_latest_row_per_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "loss": 5.0}\n{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 4.0}]


def test_read_metrics_names_the_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)


def test_metric_val_loss_compares_the_validation_curve(tmp_path, capsys):
    """--metric val_loss reads the rows that carry it ([eval] interval); the training loss agrees in both runs,
    the validation loss does not, and only --metric val_loss sees it."""
    runs = []
    for name, val_offset in (("a", 0.0), ("b", 0.5)):
        run = write_run(tmp_path / name, "sdpa" if name == "a" else "varlen")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            if row["step"] % 10 == 0:
                row["val_loss"] = reference_loss(row["step"]) + 0.1 + val_offset
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        runs.append(str(run))
    assert compare_main([*runs, "--png", str(tmp_path / "loss.png")]) == 0
    assert compare_main([*runs, "--metric", "val_loss", "--png", str(tmp_path / "val.png")]) == 1
    out = capsys.readouterr().out
    assert "val_loss: 2 runs" in out
    no_eval = write_run(tmp_path / "c", "flex")
    assert compare_main([runs[0], str(no_eval), "--metric", "val_loss"]) == USER_ERROR_EXIT_CODE
    assert "no 'val_loss' logged; set [eval] interval in its config" in capsys.readouterr().err
