"""slurm/ on a real SLURM cluster (see conftest.py): one node, two nodes, preemption and requeue, cancellation,
and the backend array with its comparison job. Every job trains the real train.py for a few steps on CPU."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from recipes.config import load_config

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[3]

# The jobs inherit these through --export=ALL: the interpreter running the tests has the repo's dependencies.
JOB_ENV = {"RECIPES_PYTHON": sys.executable, "NPROC_PER_NODE": "2", "WANDB_MODE": "offline"}
QUICK = ["--training.seq_len", "64", "--metrics.wandb", "false", "--metrics.log_every", "1"]
# The backend configs are sized for GPUs; these make them a CPU debug run while keeping their attention setting.
CPU_BACKEND_OVERRIDES = [
    "--model.flavor",
    "debug",
    "--training.dtype",
    "float32",
    "--training.compile",
    "false",
    "--training.local_batch_size",
    "4",
    "--data.vocab_size",
    "2048",
    "--optimizer.warmup_steps",
    "2",
    "--training.steps",
    "6",
    *QUICK,
]
JOB_TIMEOUT_S = 420


def submit_train(cluster, log: Path, sbatch_options: list[str], config: str, overrides: list[str]) -> str:
    return cluster.sbatch(
        f"--output={log}", *sbatch_options, "slurm/train.sbatch", config, *overrides, cwd=REPO, env=JOB_ENV
    )


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_file_text(path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = path.exists() and re.search(pattern, path.read_text())
        if match:
            return match
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} did not appear in {path} within {timeout} s")


def test_one_node_two_processes(slurm_cluster, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = submit_train(
        slurm_cluster,
        log,
        ["--nodes=1"],
        "configs/qwen3_debug.toml",
        ["--training.steps", "6", "--job.output_dir", str(run), *QUICK],
    )
    fields = slurm_cluster.wait_until_finished(job, JOB_TIMEOUT_S)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text
    assert "world size 2 on cpu" in text
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "step-00000006").is_dir()


def test_two_nodes_preempted_by_sigusr1_requeue_and_resume(slurm_cluster, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    steps = 40
    job = submit_train(
        slurm_cluster,
        log,
        ["--nodes=2"],
        "configs/qwen3_debug.toml",
        # HSDP, one replica per node: gradients cross nodes, parameter gathers stay on each
        ["--training.steps", str(steps), "--job.output_dir", str(run), "--parallel.replicate", "0", *QUICK],
    )
    wait_for_file_text(run / "metrics.jsonl", r'"step": 2\b', JOB_TIMEOUT_S)
    # What --signal=B:USR1@SECONDS does before the time limit: SIGUSR1 to the batch shell only.
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", job)

    fields = slurm_cluster.wait_until_finished(job, JOB_TIMEOUT_S + slurm_cluster.cred_expire_s)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text
    assert fields["Restarts"] == "1", text
    assert fields["NodeList"] == "node[1-2]"
    assert "world size 4 on cpu" in text
    assert "HSDP: 2 replicas x 2 ranks sharding each" in text
    preempted_at = {int(step) for step in re.findall(r"preempted \(.*?\) at step (\d+)", text)}
    assert len(preempted_at) == 1, text  # all ranks stopped at the same step
    (stop_step,) = preempted_at
    assert 2 <= stop_step < steps
    assert len(re.findall(r"preempted \(.*?\) at step", text)) == 4  # every rank on both nodes
    assert f"requeueing job {job}" in text
    assert re.search(rf"resumed from \S+step-{stop_step:08d} \(step {stop_step}\)", text), text
    # The requeued job went on from the checkpoint instead of starting over: each step trained once.
    assert len(re.findall(r"\] step +1/", text)) == 1
    assert logged_steps(run) == list(range(1, steps + 1))


def test_cancelled_job_checkpoints_and_is_not_requeued(slurm_cluster, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = submit_train(
        slurm_cluster,
        log,
        [],
        "configs/qwen3_debug.toml",
        ["--training.steps", "1000", "--job.output_dir", str(run), *QUICK],
    )
    wait_for_file_text(run / "metrics.jsonl", r'"step": 1\b', JOB_TIMEOUT_S)
    slurm_cluster.command("scancel", job)
    fields = slurm_cluster.wait_until_finished(job, JOB_TIMEOUT_S)
    assert fields["JobState"] == "CANCELLED"
    time.sleep(slurm_cluster.cred_expire_s + 5)  # a requeued job would be pending or running again by now
    fields = slurm_cluster.job(job)
    text = log.read_text()
    assert "=== got SIGTERM" in text
    assert fields["JobState"] == "CANCELLED", text
    assert fields["Restarts"] == "0", text
    # SLURM's SIGTERM still reached the workers before its SIGKILL: they saved a checkpoint to resume from.
    assert list((run / "checkpoints").glob("step-*")), text
    assert "SignalException" not in text  # torchrun left the SIGTERM to its workers


def test_backend_array_then_comparison(slurm_cluster, tmp_path):
    group = "backends-test"
    result = slurm_cluster.command(
        "slurm/submit_backends.sh",
        "--time=20",
        "--",
        *CPU_BACKEND_OVERRIDES,
        cwd=REPO,
        env={**JOB_ENV, "RUNS_DIR": str(tmp_path), "RUN_GROUP": group},
    )
    array_job = re.search(r"job array (\d+)", result.stdout).group(1)
    repeat_job = re.search(r"repeat: +job (\d+)", result.stdout).group(1)
    compare_job = re.search(r"comparison: job (\d+)", result.stdout).group(1)
    group_dir = tmp_path / group

    compare = slurm_cluster.wait_until_finished(compare_job, 4 * JOB_TIMEOUT_S)
    tasks = [slurm_cluster.job(f"{array_job}_{task}") for task in range(3)] + [slurm_cluster.job(repeat_job)]
    compare_log = (group_dir / f"qwen3-compare-{compare_job}.log").read_text()
    for task, fields in enumerate(tasks[:3]):
        task_log = group_dir / f"qwen3-backends-{array_job}_{task}.log"
        assert fields["JobState"] == "COMPLETED", task_log.read_text()
    assert tasks[3]["JobState"] == "COMPLETED", (group_dir / f"qwen3-repeat-{repeat_job}.log").read_text()
    assert compare["JobState"] == "COMPLETED", compare_log
    # The repeat (sdpa twice) calibrates the verdict: 4 runs, 6 pairs, one of them the repeat.
    assert (
        "AGREE: all 6 pairs within tolerance (floor from sdpa (qwen3_sdpa) vs sdpa (qwen3_sdpa_repeat))" in compare_log
    )
    assert (group_dir / "compare.png").is_file() and json.loads((group_dir / "compare.json").read_text())["calibrated"]
    # afterok: the comparison started only after every training task had ended.
    assert datetime.fromisoformat(compare["StartTime"]) >= max(
        datetime.fromisoformat(fields["EndTime"]) for fields in tasks
    )

    for backend in ("sdpa", "flex", "varlen"):
        run = group_dir / f"qwen3_{backend}"
        recorded = load_config(str(run / "config.toml"))
        assert recorded.model.attention == backend
        assert recorded.metrics.wandb_group == group
        assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
