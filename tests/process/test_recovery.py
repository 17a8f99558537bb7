"""Refusals a user can recover from, with real train.py processes on CPU: one live run per folder, the advice
after exit 3 works as written, a run continues on another attention backend, and a too-small training.steps is
refused without touching the folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_process import debug_run, finish, launch

from recipes.errors import IO_ERROR_EXIT_CODE, NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE
from recipes.run.outputs import CONFIG_HISTORY

STEPS = 12
RUN = debug_run(steps=STEPS, warmup_steps=2, checkpoint_interval=4)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_steps(process, out: Path, steps: int) -> None:
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= steps):
        assert process.poll() is None, f"the run ended (exit {process.returncode}) too early"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_second_run_into_a_held_folder_is_refused_and_a_dead_holders_hold_is_taken_over(env, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, "--training.steps", "400", "--checkpoint.interval", "0", "--job.output_dir", str(out)]
    first = launch(env, tmp_path / "first.log", args)
    wait_for_steps(first, out, 2)
    second = finish(launch(env, tmp_path / "second.log", args), tmp_path / "second.log", USER_ERROR_EXIT_CODE)
    line = second.strip().splitlines()[-1]
    assert line.startswith("error: job.output_dir: ") and str(out) in line, second
    assert f"pid {first.pid}" in line and os.uname().nodename in line, line
    rows_before = (out / "metrics.jsonl").read_text().count("\n")
    assert rows_before >= 2

    first.send_signal(signal.SIGKILL)  # no release: the hold stays behind, its process gone
    first.wait()
    assert (out / ".hold").is_file()
    third = finish(launch(env, tmp_path / "third.log", [*args, "--training.steps", "6"]), tmp_path / "third.log")
    assert re.search(rf"took over {re.escape(str(out))} from a stale hold \(host \S+, pid {first.pid}\b", third), third
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert not (out / ".hold").exists()  # released at the end


def test_after_exit_3_the_troubleshooting_advice_works_as_written(env, tmp_path):
    """docs/troubleshooting.md, "non-finite loss": move the checkpoints saved while the loss was already climbing
    out of checkpoints/, lower optimizer.lr, rerun the same command with it; the change is recorded."""
    out = tmp_path / "run"
    args = [*RUN, "--optimizer.lr", "1e6", "--checkpoint.interval", "1", "--job.output_dir", str(out)]
    console = finish(launch(env, tmp_path / "bad.log", args), tmp_path / "bad.log", NONFINITE_EXIT_CODE)
    assert "Lower optimizer.lr" in console
    bad = int(re.search(r"error: step (\d+): non-finite", console)[1])
    aside = tmp_path / "aside"
    aside.mkdir()
    for folder in sorted((out / "checkpoints").glob("step-*")):  # every one of them came after an lr-1e6 update
        folder.rename(aside / folder.name)
    assert len(list(aside.iterdir())) == bad - 1

    console = finish(launch(env, tmp_path / "fixed.log", [*args, "--optimizer.lr", "2e-3"]), tmp_path / "fixed.log")
    assert "resume at step 0 with changed settings: optimizer.lr 1000000.0 -> 0.002" in console, console[-2000:]
    [entry] = [json.loads(line) for line in (out / CONFIG_HISTORY).read_text().splitlines()]
    assert entry["changed"] == {"optimizer.lr": {"from": 1e6, "to": 2e-3}} and entry["step"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(row["lr"] <= 2e-3 for row in rows) and rows[-1]["loss"] < rows[0]["loss"]


def test_a_changed_lr_takes_effect_from_the_resumed_step(env, tmp_path):
    """The optimizer's hyperparameters and the schedule follow the config on resume, not the checkpoint."""
    out = tmp_path / "run"
    first = launch(env, tmp_path / "first.log", [*RUN, "--job.output_dir", str(out)])
    wait_for_steps(first, out, 5)
    first.send_signal(signal.SIGUSR1)
    finish(first, tmp_path / "first.log", PREEMPTED_EXIT_CODE)
    preempted_at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    finish(
        launch(
            env,
            tmp_path / "second.log",
            [*RUN, "--optimizer.lr", "1e-3", "--optimizer.weight_decay", "0", "--job.output_dir", str(out)],
        ),
        tmp_path / "second.log",
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[preempted_at - 1], rows[preempted_at]
    # the debug config's lr is 2e-3: the cosine schedule's value at a step is proportional to the peak lr
    reference = finish(
        launch(env, tmp_path / "ref.log", [*RUN, "--optimizer.lr", "1e-3", "--job.output_dir", str(tmp_path / "ref")]),
        tmp_path / "ref.log",
    )
    assert reference
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert after["lr"] == ref_rows[preempted_at]["lr"] and before["lr"] == 2 * ref_rows[preempted_at - 1]["lr"]


def test_an_sdpa_run_continued_on_varlen_draws_the_uninterrupted_curve(env, tmp_path):
    """Checkpoints are portable between backends: preempted at step 5 on sdpa, continued on varlen, the curve
    equals an uninterrupted sdpa run's to fp32 noise (on CPU the backends agree to ~1e-6)."""
    reference, split = tmp_path / "reference", tmp_path / "split"
    finish(
        launch(env, tmp_path / "reference.log", [*RUN, "--job.output_dir", str(reference)]), tmp_path / "reference.log"
    )
    first = launch(env, tmp_path / "first.log", [*RUN, "--job.output_dir", str(split)])
    wait_for_steps(first, split, 5)
    first.send_signal(signal.SIGUSR1)
    finish(first, tmp_path / "first.log", PREEMPTED_EXIT_CODE)
    console = finish(
        launch(env, tmp_path / "varlen.log", [*RUN, "--model.attention", "varlen", "--job.output_dir", str(split)]),
        tmp_path / "varlen.log",
    )
    assert "model.attention 'sdpa' -> 'varlen'" in console
    gaps = [abs(a - b) for a, b in zip(losses(reference), losses(split), strict=True)]
    assert max(gaps) <= 1e-4, gaps


def test_steps_below_the_checkpoint_are_refused_and_nothing_changes(env, tmp_path):
    out = tmp_path / "run"
    finish(launch(env, tmp_path / "run.log", [*RUN, "--job.output_dir", str(out)]), tmp_path / "run.log")
    before = snapshot(out)
    console = finish(
        launch(env, tmp_path / "short.log", [*RUN, "--training.steps", "4", "--job.output_dir", str(out)]),
        tmp_path / "short.log",
        USER_ERROR_EXIT_CODE,
    )
    assert (
        console.strip().splitlines()[-1].startswith(f"error: training.steps: 4 is below step {STEPS} of the checkpoint")
    )
    assert snapshot(out) == before


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A real small disk: a tmpfs of `size` mounted on `folder` (the tests run as root), unmounted after."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    assert mounted.returncode == 0, f"this test mounts a tmpfs (root): {mounted.stderr.decode()}"
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_full_disk_at_a_save_stops_with_one_line_and_a_rerun_resumes(env, tmp_path):
    """A real full disk: the output folder on a small tmpfs that holds one checkpoint of the debug model (about
    8.5 MB: weights and AdamW's moments) but not two."""
    with tmpfs(tmp_path / "disk", "14m") as disk:
        out = disk / "run"
        args = [*RUN, "--checkpoint.interval", "1", "--checkpoint.keep", "3", "--job.output_dir", str(out)]
        console = finish(launch(env, tmp_path / "full.log", args), tmp_path / "full.log", IO_ERROR_EXIT_CODE)
        line = console.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"error: checkpoint: cannot write {re.escape(str(out))}/checkpoints/\.tmp-step-\d+ "
            r"\(ENOSPC: No space left on device.*\); the newest complete checkpoint step-\d+ is "
            r"intact; free space or fix the disk, then rerun the same command to resume",
            line,
        ), line
        intact = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
        assert intact
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        console = finish(launch(env, tmp_path / "again.log", args), tmp_path / "again.log")
        assert f"(step {int(intact[-1].removeprefix('step-'))})" in console  # resumed from the intact one
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))


@pytest.mark.parametrize("free_kib", [0, 4], ids=["no-room-at-all", "room-for-the-hold-only"])
def test_a_full_disk_before_the_first_step_is_one_line_and_blocks_nothing(env, tmp_path, free_kib):
    """A new run on a disk that fills before its first step (the hold, config.toml, metrics.jsonl): exit 74 with
    one line, and once space is freed the same command trains."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - free_kib * 1024))
        out = disk / "run"
        args = [*RUN, "--training.steps", "2", "--checkpoint.enable", "false", "--job.output_dir", str(out)]
        console = finish(launch(env, tmp_path / "full.log", args), tmp_path / "full.log", IO_ERROR_EXIT_CODE)
        assert "Traceback" not in console, console[-3000:]
        line = console.strip().splitlines()[-1]
        assert line.startswith("error: ") and "cannot write" in line and "ENOSPC" in line, line
        filler.unlink()  # space freed
        finish(launch(env, tmp_path / "again.log", args), tmp_path / "again.log")
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
