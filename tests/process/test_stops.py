"""Ctrl-C stops a run the way a preemption does: the first checkpoints at the end of the step and exits 75 (run
again to continue), a second stops at once; neither prints a traceback."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from train_process import DEBUG_CONFIG, finish, launch

from recipes.checkpoint import complete_checkpoints
from recipes.errors import PREEMPTED_EXIT_CODE

# Steps of a few tenths of a second on 2 cores, so that two Ctrl-Cs 0.1 s apart land in the same step.
RUN = ["--config", str(DEBUG_CONFIG), "--training.steps", "400", "--training.seq_len", "256",
       "--training.local_batch_size", "8", "--metrics.log_every", "1", "--metrics.wandb", "false"]


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
