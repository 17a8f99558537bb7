"""train.py end to end on CPU: real `python train.py` and `torchrun` (gloo) processes on the default tokenizer and
corpus, real DCP checkpoints, a real offline W&B run. On CPU, flex and varlen run their reference attention (the
same mask, math kernel), so the backends must agree to fp32 noise here.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_process import DEBUG_CONFIG, REPO, debug_run, finish, launch

from recipes.config import load_config, to_toml
from recipes.errors import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, UserError
from recipes.run.outputs import check_output_dir
from recipes.run.runs import load_run, read_metrics

STEPS = 20
# The debug config (fp32, document mask, seed 0), shortened: 20 steps of 4 x 64 tokens, checkpoints every 5 steps.
RUN = debug_run(
    *["--eval.interval", "5", "--eval.batches", "2"],
    steps=STEPS,
    local_batch_size=4,
    warmup_steps=2,
    checkpoint_interval=5,
    checkpoint_keep=5,
)
BACKENDS = ("sdpa", "flex", "varlen")


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def signal_after(process: subprocess.Popen, metrics: Path, steps: int) -> None:
    """SIGUSR1 once `steps` steps are in metrics.jsonl (the handler is installed by then)."""
    while process.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= steps):
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory) -> dict[str, Path]:
    """All at once: the three backends with one process; sdpa on 2 processes with half the local batch (the same
    global batches); and a first attempt of sdpa that gets SIGUSR1 after 2 steps. sdpa also writes an offline
    W&B run."""
    root = tmp_path_factory.mktemp("runs")
    extra = {backend: ["--model.attention", backend] for backend in BACKENDS}
    extra["sdpa"] += ["--metrics.wandb", "true"]
    extra["sdpa_2proc"] = ["--training.local_batch_size", "2"]
    extra["preempted"] = []
    masked = ["--data.mask_boundary_loss", "true", "--checkpoint.enable", "false"]
    extra["masked"] = masked
    extra["masked_2proc"] = [*masked, "--training.local_batch_size", "2"]
    extra["masked_accum"] = [*masked, "--training.grad_accum_steps", "2"]
    started = {
        name: launch(
            env,
            root / f"{name}.log",
            [*RUN, *args, "--job.output_dir", str(root / name)],
            nproc=2 if name.endswith("_2proc") else 1,
        )
        for name, args in extra.items()
    }
    signal_after(started["preempted"], root / "preempted" / "metrics.jsonl", steps=2)
    for name, process in started.items():
        finish(process, root / f"{name}.log", PREEMPTED_EXIT_CODE if name == "preempted" else 0)
    return {name: root / name for name in started}


def test_each_backend_trains(runs):
    for backend in BACKENDS:
        rows = read_metrics(runs[backend])
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
        loss = [row["loss"] for row in rows]
        assert sum(loss[-5:]) / 5 < loss[0] - 0.5, f"{backend}: loss did not fall: {loss}"
        assert load_config(str(runs[backend] / "config.toml")).model.attention == backend


def test_backends_agree_step_by_step(runs):
    reference = losses(runs["sdpa"])
    for backend in ("flex", "varlen"):
        gaps = [abs(a - b) for a, b in zip(reference, losses(runs[backend]), strict=True)]
        assert max(gaps) <= 1e-4, f"{backend} vs sdpa: {gaps}"


def test_one_and_two_processes_agree(runs):
    """Same global batches, so only the order of fp32 reductions differs (gloo sums, FSDP's sharded optimizer). One
    process keeps each block's gathered parameters from forward to backward, also across the evaluations at steps
    5, 10 and 15 (forwards without backward); two processes gather them again."""
    gaps = [abs(a - b) for a, b in zip(losses(runs["sdpa"]), losses(runs["sdpa_2proc"]), strict=True)]
    assert max(gaps) <= 1e-4, gaps
    assert (runs["sdpa_2proc"] / "checkpoints" / f"step-{STEPS:08d}" / "train_state.json").is_file()


def test_boundary_loss_masking_is_a_mean_over_all_counted_labels(runs):
    """With [data] mask_boundary_loss the ranks and micro-batches count different numbers of labels; the loss is
    their sum over the global count, so world size 2 and grad_accum_steps 2 give world size 1's losses."""
    reference = losses(runs["masked"])
    for name in ("masked_2proc", "masked_accum"):
        gaps = [abs(a - b) for a, b in zip(reference, losses(runs[name]), strict=True)]
        assert max(gaps) <= 1e-5, (name, gaps)
    assert losses(runs["masked"]) != losses(runs["sdpa"])  # the masking changed what is learned


def test_validation_loss_is_logged_at_the_interval(runs):
    rows = read_metrics(runs["sdpa"])
    assert [row["step"] for row in rows if "val_loss" in row] == [5, 10, 15, 20]
    assert rows[-1]["val_loss"] < rows[4]["val_loss"]  # the held-out loss falls too
    for backend in ("flex", "varlen"):  # the backends agree on it as on the training loss
        other = {row["step"]: row.get("val_loss") for row in read_metrics(runs[backend])}
        assert all(abs(row["val_loss"] - other[row["step"]]) <= 1e-4 for row in rows if "val_loss" in row)


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(runs):
    (log_file,) = (runs["sdpa"] / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {row["step"]: row for row in read_metrics(runs["sdpa"])}
    read_back = load_run(str(log_file)).rows
    assert [row["step"] for row in read_back] == list(logged)
    for row in read_back:
        assert {"loss", "lr", "grad_norm"} <= row.keys()
        assert all(value == logged[row["step"]][key] for key, value in row.items()), row
    assert not list((runs["flex"]).glob("wandb"))  # metrics.wandb=false writes no W&B run


def test_resume_from_a_checkpoint_continues_the_same_losses(runs, env, tmp_path):
    """A folder made of run A's saved config.toml (its output_dir edited) and A's step-15 checkpoint only."""
    a = runs["sdpa"]
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (5, 10, 15, 20)]
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step-00000015", b / "checkpoints" / "step-00000015")
    config = load_config(str(a / "config.toml"), ["--job.output_dir", str(b), "--metrics.wandb", "false"])
    (b / "config.toml").write_text(to_toml(config))
    finish(launch(env, tmp_path / "b.log", ["--config", str(b / "config.toml")]), tmp_path / "b.log")
    expected = [{key: row[key] for key in ("step", "loss", "lr", "grad_norm")} for row in read_metrics(a)[15:]]
    assert [row["val_loss"] for row in read_metrics(b) if "val_loss" in row] == [
        row["val_loss"] for row in read_metrics(a)[15:] if "val_loss" in row
    ]  # a run that evaluates resumes too
    assert [{key: row[key] for key in expected[0]} for row in read_metrics(b)] == expected


def test_preempted_run_checkpoints_exits_75_and_continues_exactly(runs, env):
    """The first attempt (in `runs`) exited 75 on SIGUSR1; the same command again finishes the run."""
    out = runs["preempted"]
    stopped_at = read_metrics(out)[-1]["step"]
    assert 2 <= stopped_at < STEPS
    assert f"preempted (SIGUSR1) at step {stopped_at}: checkpoint saved" in (out.parent / "preempted.log").read_text()
    assert (out / "checkpoints" / f"step-{stopped_at:08d}" / "train_state.json").is_file()

    log = out.parent / "preempted-again.log"
    text = finish(launch(env, log, [*RUN, "--job.output_dir", str(out)]), log)
    assert f"(step {stopped_at})" in text  # it resumed rather than started over
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # every step exactly once
    assert losses(out) == losses(runs["sdpa"])


def test_config_errors_exit_2_with_one_line_and_write_nothing(env, tmp_path):
    wrong_type = tmp_path / "wrong_type.toml"
    wrong_type.write_text(DEBUG_CONFIG.read_text().replace("seq_len = 256", 'seq_len = "256"'))
    cases = {
        "unknown_key": ([*RUN, "--training.stesp", "5"], "unknown key training.stesp; did you mean 'steps'?"),
        "wrong_type": (["--config", str(wrong_type)], "training.seq_len: expected int, got str '256'"),
        "bad_backend": (
            [*RUN, "--model.attention", "flash"],
            "model.attention: 'flash' is not one of sdpa, flex, varlen",
        ),
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, "train.py", *args, "--job.output_dir", str(tmp_path / name)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in cases.items()
    }  # all at once: each is mostly the cost of importing torch
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == USER_ERROR_EXIT_CODE, f"{name}: exit {process.returncode}\n{stderr[-3000:]}"
        assert stderr == f"error: {cases[name][1]}\n", f"{name}: {stderr[-3000:]}"  # one line, no traceback
        assert stdout == ""
        assert not (tmp_path / name).exists()


def test_a_folder_holding_a_run_is_only_resumed_by_the_same_run(runs, tmp_path):
    """recipes.run.outputs.check_output_dir on the folders written above (train.py calls it before writing anything)."""
    sdpa = load_config(str(runs["sdpa"] / "config.toml"))
    assert check_output_dir(runs["sdpa"], sdpa) == sdpa
    assert check_output_dir(runs["flex"], sdpa).model.attention == "flex"  # the backend may change on resume
    with pytest.raises(UserError) as error:
        check_output_dir(runs["flex"], load_config(str(runs["sdpa"] / "config.toml"), ["--training.seed", "1"]))
    assert str(error.value) == (
        f"job.output_dir: {runs['flex']} holds a different run (training.seed: 0 "
        "there, 1 now); choose a new job.output_dir"
    )
    with pytest.raises(UserError, match="already holds this run; set --checkpoint.resume true to continue it"):
        check_output_dir(runs["sdpa"], load_config(str(runs["sdpa"] / "config.toml"), ["--checkpoint.resume", "false"]))
    (tmp_path / "notes.txt").write_text("someone else's file")
    with pytest.raises(UserError, match="is not empty and holds no run of this recipe"):
        check_output_dir(tmp_path, sdpa)
    assert check_output_dir(tmp_path / "new", sdpa) is None
