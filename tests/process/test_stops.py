"""Ctrl-C stops a run the way a preemption does: the first checkpoints at the end of the step and exits 75 (run
again to continue), a second stops at once; neither prints a traceback. A SIGTERM to torchrun gets the checkpoint
written before torchrun's SIGKILL, even while a step takes longer than that."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from train_process import REPO, TORCHRUN, debug_run, finish, launch

from recipes.checkpoint import complete_checkpoints
from recipes.errors import PREEMPTED_EXIT_CODE

# Steps of a few tenths of a second on 2 cores, so that two Ctrl-Cs 0.1 s apart land in the same step.
RUN = debug_run(steps=400, seq_len=256, local_batch_size=8)


def started(out: Path, process, steps: int = 2) -> None:
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, f"the run ended (exit {process.returncode}) early"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_ctrl_c_checkpoints_and_exits_75_without_a_traceback(env, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    process = launch(env, log, [*RUN, "--job.output_dir", str(out)])
    started(out, process)
    process.send_signal(signal.SIGINT)
    console = finish(process, log, PREEMPTED_EXIT_CODE)
    assert "Traceback" not in console and "KeyboardInterrupt" not in console, console[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert f"preempted (SIGINT) at step {last}: checkpoint saved" in console
    assert [path.name for path in complete_checkpoints(out / "checkpoints")] == [f"step-{last:08d}"]


def test_a_second_ctrl_c_stops_at_once(env, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    process = launch(env, log, [*RUN, "--job.output_dir", str(out)])
    started(out, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    console = finish(process, log, 130)
    assert "Traceback" not in console and "KeyboardInterrupt" not in console, console[-3000:]
    assert "stopped at once (second Ctrl-C)" in console
    assert not complete_checkpoints(out / "checkpoints")


def test_sigterm_to_torchrun_in_a_step_longer_than_its_grace_period_checkpoints_before_the_sigkill(env, tmp_path):
    """torchrun passes SIGTERM on to its workers and SIGKILLs them 30 s later. With steps of 3 micro-batches of
    12 s each (tests/process/train_slow.py), a step signalled at its start ends after that; the ranks agree between
    micro-batches to abandon it, save the step before and exit 75 in time, and the hold is released."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = debug_run("--training.grad_accum_steps", "3", "--job.output_dir", str(out), steps=4, local_batch_size=3)
    with open(log, "w") as output:
        torchrun = subprocess.Popen(
            [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "tests/process/train_slow.py", "12", *args],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    started(out, torchrun, steps=1)  # step 2 has begun: it would end 36 s from now
    torchrun.send_signal(signal.SIGTERM)
    torchrun.wait(timeout=300)
    console = log.read_text()
    assert "forcefully exiting via" not in console, console[-3000:]
    assert "[rank0] preempted (SIGTERM) at step 1 (step 2 abandoned" in console, console[-3000:]
    assert [path.name for path in complete_checkpoints(out / "checkpoints")] == ["step-00000001"]
    state = json.loads((out / "checkpoints" / "step-00000001" / "train_state.json").read_text())
    assert state["data"]["tokens_consumed"] == 2 * 3 * 65  # step 1's batch only: step 2's comes first on resume
    assert not (out / ".hold").exists()
