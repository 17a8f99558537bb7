"""scripts/compare_runs.py and recipes.run.runs.read_metrics on run dirs written here, as train.py lays them out."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.collections import PolyCollection

from recipes.errors import USER_ERROR_EXIT_CODE, UserError
from recipes.run.runs import load_run, read_metrics

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_runs.py"
compare_script = runpy.run_path(str(SCRIPT))
compare_main = compare_script["main"]
STEPS = range(101, 161)  # a warm start: 60 steps after a checkpoint at step 100


def reference_loss(step: int) -> float:
    return 1.0 + 9.0 * math.exp(-step / 15)


def noise(step: int, seed: int) -> float:
    """A deterministic wiggle in [-1, 1], different for each seed."""
    return math.sin(step * 12.9898 + seed * 78.233)


def write_run(
    run_dir: Path, attention: str | None, steps=STEPS, offset=lambda step: 0.0, val_every: int = 0, config: str = ""
) -> Path:
    """A run dir with metrics.jsonl (loss = reference_loss + offset(step); val_loss every val_every steps) and, if
    attention, a config.toml as train.py writes it (attention and `config`'s extra lines)."""
    run_dir.mkdir(parents=True)
    if attention:
        (run_dir / "config.toml").write_text(
            f'[model]\nflavor = "small"\nattention = "{attention}"\nkernel = "auto"\n'
            f'[training]\nseq_len = 2048\nseed = 1234\ndtype = "bfloat16"\n{config}'
            f'[job]\noutput_dir = "{run_dir}"\n'
        )
    rows = []
    for step in steps:
        row = {"step": step, "loss": reference_loss(step) + offset(step), "lr": 3e-4, "grad_norm": 1.0}
        if val_every and step % val_every == 0:
            row["val_loss"] = reference_loss(step) + 0.2 + offset(step)
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def proof(tmp_path: Path, varlen_offset=lambda step: 0.0, repeat=True) -> list[Path]:
    """sdpa, flex, varlen and (with repeat) a second sdpa: every pair differs by bf16-sized noise, up to 1e-3."""
    runs = [
        write_run(tmp_path / "qwen3_sdpa", "sdpa", val_every=20),
        write_run(tmp_path / "qwen3_flex", "flex", offset=lambda s: 6e-4 * noise(s, 1), val_every=20),
        write_run(
            tmp_path / "qwen3_varlen", "varlen", offset=lambda s: 6e-4 * noise(s, 2) + varlen_offset(s), val_every=20
        ),
    ]
    if repeat:
        runs.append(
            write_run(tmp_path / "qwen3_sdpa_repeat", "sdpa", offset=lambda s: 1e-3 * noise(s, 3), val_every=20)
        )
    return runs


def compare(runs, tmp_path, *options) -> tuple[int, dict]:
    table = tmp_path / "compare.json"
    code = compare_main([*map(str, runs), "--json", str(table), *options])
    return code, json.loads(table.read_text())


def test_a_repeat_is_recognised_from_config_toml_and_calibrates_the_verdict(tmp_path, capsys):
    code, result = compare(proof(tmp_path), tmp_path)
    out = capsys.readouterr().out
    assert code == 0, out
    assert result["verdict"] == "AGREE" and result["calibrated"] is True
    assert result["repeats"] == ["sdpa (qwen3_sdpa) vs sdpa (qwen3_sdpa_repeat)"]
    repeat_pair = next(pair for pair in result["pairs"] if pair["repeat"])
    assert result["floor"]["early"] == repeat_pair["values"]["early"] > 9e-4
    # 3 × the floor, where that is above bf16's resolution (2e-3)
    assert result["tolerance"]["early"] == pytest.approx(3 * result["floor"]["early"])
    assert "AGREE: all 6 pairs within tolerance (floor from sdpa (qwen3_sdpa) vs sdpa (qwen3_sdpa_repeat))" in out


def test_a_bias_in_the_first_steps_disagrees_naming_pair_statistic_and_floor(tmp_path, capsys):
    """A warm start through a wrong backend: its loss is off by 0.05 from the first step."""
    code, result = compare(proof(tmp_path, varlen_offset=lambda step: 0.05), tmp_path)
    out = capsys.readouterr().out
    assert code == 1
    assert result["verdict"] == "DISAGREE"
    failed = {(pair["a"], pair["b"]): pair["failed"] for pair in result["pairs"] if pair["failed"]}
    assert sorted(failed) == [
        ("flex", "varlen"),
        ("sdpa (qwen3_sdpa)", "varlen"),
        ("varlen", "sdpa (qwen3_sdpa_repeat)"),
    ]
    assert all("early" in stats for stats in failed.values())
    line = next(line for line in out.splitlines() if line.startswith("DISAGREE: sdpa (qwen3_sdpa) vs varlen"))
    assert re.search(r"early max\|Δloss\| 5\.\d\de-02 at step 1[01]\d > ", line)
    assert f"> {result['tolerance']['early']:.2e} (3 × the repeats' floor {result['floor']['early']:.2e}" in line


def test_one_chaotic_late_step_does_not_decide_but_a_steady_late_bias_does(tmp_path):
    """After the early steps, runs drift apart: the repeat's 50-step means differ by up to 0.03. One step off by
    0.5 moves its window's mean by 0.01 and passes; a bias of 0.15 from step 131 on fails the late test."""
    runs = proof(tmp_path)
    runs[3] = write_run(
        tmp_path / "qwen3_sdpa_repeat_drift",
        "sdpa",
        val_every=20,
        offset=lambda s: 1e-3 * noise(s, 3) + (0.03 if s > 120 else 0.0),
    )
    runs[2] = write_run(
        tmp_path / "qwen3_varlen_spike", "varlen", val_every=20, offset=lambda s: 0.5 if s == 141 else 0.0
    )
    code, result = compare(runs, tmp_path)
    assert code == 0, result["reasons"]
    runs[2] = write_run(
        tmp_path / "qwen3_varlen_bias", "varlen", val_every=20, offset=lambda s: 0.15 if s > 130 else 0.0
    )
    code, result = compare(runs, tmp_path)
    assert code == 1
    assert {stat for pair in result["pairs"] for stat in pair["failed"]} == {"late", "val"}


def test_without_a_repeat_the_verdict_is_uncalibrated_and_names_its_constant(tmp_path, capsys):
    code, result = compare(proof(tmp_path, repeat=False), tmp_path)
    out = capsys.readouterr().out
    assert code == 0
    assert result["calibrated"] is False
    assert result["tolerance"] == compare_script["UNCALIBRATED"]["bfloat16"]
    assert "uncalibrated: no repeat among the runs" in out and "UNCALIBRATED['bfloat16']" in out
    assert "AGREE: all 3 pairs within tolerance (UNCALIBRATED" in out


def test_a_repeat_must_share_every_setting_but_naming_and_logging(tmp_path):
    """Two sdpa runs with another batch are no repeat (nor is the scaling comparison 2 vs 8 GPUs)."""
    runs = [write_run(tmp_path / "a", "sdpa"), write_run(tmp_path / "b", "sdpa", config="local_batch_size = 2\n")]
    _, result = compare(runs, tmp_path)
    assert result["calibrated"] is False
    runs.append(write_run(tmp_path / "c", "sdpa", config='[metrics]\nwandb_group = "other"\n'))
    _, result = compare(runs, tmp_path)
    assert result["repeats"] == ["sdpa (a) vs sdpa (c)"]


def test_bit_identical_repeats_leave_the_dtype_resolution(tmp_path):
    runs = [
        write_run(tmp_path / "a", "sdpa"),
        write_run(tmp_path / "b", "sdpa"),
        write_run(tmp_path / "c", "flex", offset=lambda s: 1e-3),
    ]
    code, result = compare(runs, tmp_path)
    assert code == 0 and result["floor"]["early"] == 0.0
    assert result["tolerance"]["early"] == compare_script["RESOLUTION"]["bfloat16"]


def test_runs_of_different_configs_are_refused_in_one_line(tmp_path, capsys):
    a = write_run(tmp_path / "a", "sdpa")
    b = write_run(tmp_path / "b", "flex")
    (b / "config.toml").write_text((b / "config.toml").read_text().replace("seq_len = 2048", "seq_len = 256"))
    code = compare_main([str(a), str(b), "--png", str(tmp_path / "x.png"), "--json", str(tmp_path / "x.json")])
    assert code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are different runs (training.seq_len: 2048 vs 256)" in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.json").exists()


def test_val_loss_points_are_counted_and_compared(tmp_path, capsys):
    runs = proof(tmp_path)
    code, result = compare(runs, tmp_path)
    out = capsys.readouterr().out
    assert "60 loss steps (101-160), 3 val_loss points" in out
    assert [run["val_loss_points"] for run in result["runs"]] == [3, 3, 3, 3]
    assert all(pair["val_points"] == 3 for pair in result["pairs"])


def test_nothing_is_written_into_the_runs_unless_asked(tmp_path, capsys):
    runs = proof(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, runs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(tmp_path.rglob("*")) == before
    assert compare_main([*map(str, runs), "--png", str(tmp_path / "qwen3_sdpa" / "compare.png")]) == 0
    assert png_size(tmp_path / "qwen3_sdpa" / "compare.png")[0] > 600


def test_nonfinite_loss_fails_the_pair(tmp_path, capsys):
    a = write_run(tmp_path / "a", "sdpa")
    b = write_run(tmp_path / "b", "flex", offset=lambda step: math.nan if step == 107 else 0.0)
    code, result = compare([a, b], tmp_path)
    assert code == 1
    assert result["pairs"][0]["nonfinite_steps"] == [107]
    assert "1 non-finite steps (first 107)" in capsys.readouterr().out


def test_the_eval_matrix_joins_the_verdict(tmp_path, capsys):
    runs = proof(tmp_path)
    matrix = tmp_path / "eval_matrix.json"
    matrix.write_text(json.dumps({"device": "cuda", "tolerance": 0.02, "max_spread": 5e-5, "agree": True, "rows": []}))
    code, result = compare(runs, tmp_path, "--eval-matrix", str(matrix))
    assert code == 0 and result["eval_matrix"]["max_spread"] == 5e-5
    matrix.write_text(json.dumps({"device": "cuda", "tolerance": 0.02, "max_spread": 3.2, "agree": False, "rows": []}))
    code, result = compare(runs, tmp_path, "--eval-matrix", str(matrix))
    assert code == 1
    out = capsys.readouterr().out
    assert "DISAGREE: eval matrix at the start checkpoint: the backends' spread 3.20e+00 > 2e-02" in out
    matrix.write_text("{}")
    assert compare_main([*map(str, runs), "--eval-matrix", str(matrix)]) == USER_ERROR_EXIT_CODE


def test_the_plot_keeps_one_colour_per_run_and_the_band_behind(tmp_path):
    runs = [load_run(str(path)) for path in proof(tmp_path)]
    compare_script["unique_labels"](runs)
    args = compare_script["parse_args"]([str(tmp_path / "x"), str(tmp_path / "y")])
    pairs = [compare_script["compare_pair"](a, b, args) for i, a in enumerate(runs) for b in runs[i + 1 :]]
    tolerances = compare_script["calibrate"](runs, pairs, args.margin)
    figure = compare_script["plot"](runs, pairs, tolerances, True, tmp_path / "plot.png", args)
    curves, differences = figure.axes
    top = {
        line.get_label(): (line.get_color(), line.get_linestyle())
        for line in curves.get_lines()
        if not line.get_label().startswith("_")
    }
    assert len({style for _, style in top.values()}) == len(runs)  # overlapping curves stay visible
    for line in differences.get_lines():
        if " vs " in line.get_label():
            run = line.get_label().split(" vs ")[0]
            assert (line.get_color(), line.get_linestyle()) == top[run]
    assert differences.get_yscale() == "log" and differences.get_ylim()[0] > 0
    (band,) = [c for c in differences.collections if isinstance(c, PolyCollection)]
    assert band.get_zorder() < min(line.get_zorder() for line in differences.get_lines())
    for axes in figure.axes:  # the legends sit outside the data
        assert axes.get_legend().get_bbox_to_anchor().x0 >= axes.get_window_extent().x1


def test_label_falls_back_to_the_folder_name(tmp_path):
    assert load_run(str(write_run(tmp_path / "my_run", attention=None))).label == "my_run"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file or directory"),
        ("no_metrics", "neither metrics.jsonl nor a run-*.wandb file"),
        ("no_overlap", "share no logged loss step"),
        ("no_loss", "no 'loss' logged"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, message):
    good = write_run(tmp_path / "good", "sdpa")
    other = {
        "missing": tmp_path / "absent",
        "no_metrics": tmp_path,
        "no_overlap": write_run(tmp_path / "later", "flex", steps=range(200, 210)),
        "no_loss": tmp_path / "no_loss",
    }[case]
    if case == "no_loss":
        other.mkdir()
        (other / "metrics.jsonl").write_text('{"step": 101, "lr": 0.1}\n')
    assert compare_main([str(good), str(other), "--png", str(tmp_path / "x.png")]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv", [["only_one"], ["a", "b", "--margin", "-1"], ["a", "b", "--window", "0"], ["a", "b", "--labels", "x,y,z"]]
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    assert "error:" in capsys.readouterr().err


def test_read_metrics_keeps_whole_lines_and_the_latest_row_per_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "loss": 5.0}\n{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo'
    )
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 4.0}]


def test_read_metrics_names_the_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)


FALSE_ALARMS = Path(__file__).resolve().parents[2] / "docs" / "results" / "cpu" / "proof_false_alarms.json"
HONEST_PROOFS = 20  # issue 17: at least 20 honest CPU proofs over different seeds


def test_the_measured_honest_cpu_proofs_all_agree():
    """The committed result of benchmarks/proof_false_alarms.sh: no false alarm, on the numbers that decided it."""
    table = json.loads(FALSE_ALARMS.read_text())
    proofs = table["proofs"]
    assert len(proofs) == table["total"] >= HONEST_PROOFS
    assert len({row["seed"] for row in proofs}) == len(proofs)
    for row in proofs:
        assert row["verdict"] == "AGREE" and row["calibrated"], row
        assert all(row["largest"][stat] <= row["tolerance"][stat] for stat in row["tolerance"]), row
    assert table["agree"] == len(proofs) and table["false_alarm_rate"] == 0
