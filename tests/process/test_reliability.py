"""Long jobs die; the recipe must lose no work. Each failure happens for real: torchrun workers killed with
SIGKILL (mid-run and mid-save) or sent SIGTERM, a learning rate that overflows the model, W&B without
credentials, without network or behind a server that answers 500, checkpoints and HF folders carrying pickled
code. On CPU a run that survives a failure must draw the uninterrupted run's loss curve bit for bit, with every
step in metrics.jsonl exactly once.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict
from train_process import debug_run, finish, launch, worker_pids

from recipes.checkpoint import MANIFEST, complete_checkpoints, load_model_weights
from recipes.errors import NONFINITE_EXIT_CODE
from recipes.qwen3.hf import save_hf_checkpoint
from recipes.qwen3.model import Qwen3Model, flavor_config
from recipes.run.runs import load_run

STEPS = 16
# The debug config shortened: 16 steps of 2 ranks x 2 rows x 64 tokens, a checkpoint every 4 steps, all kept.
RUN = debug_run(steps=STEPS, warmup_steps=2, checkpoint_interval=4, checkpoint_keep=5)
API_KEY = "0123456789abcdef" * 2 + "fedcba98"  # W&B keys are 40 characters


def logged_steps(out: Path) -> list[int]:
    """The steps of metrics.jsonl as written, repeats included."""
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_until(condition, process: subprocess.Popen, poll: float = 0.05) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before the moment to strike"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(poll)


def checkpoint_steps(out: Path) -> list[int]:
    return [int(path.name.removeprefix("step-")) for path in complete_checkpoints(out / "checkpoints")]


def resumed_step(console: str) -> int:
    (step,) = re.findall(r"\] resumed from \S+ \(step (\d+)\)", console)
    return int(step)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> list[float]:
    """The uninterrupted run's losses: 2 ranks under torchrun, as in the tests below."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(launch(env, out.parent / "run.log", [*RUN, "--job.output_dir", str(out)], nproc=2), out.parent / "run.log")
    assert logged_steps(out) == list(range(1, STEPS + 1))
    return losses(out)


# ----------------------------------------------------------------------------------------------- killed ranks


def test_a_killed_rank_is_restarted_and_the_run_continues_exactly(env, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    torchrun = launch(env, log, [*RUN, "--job.output_dir", str(out)], nproc=2, max_restarts=1)
    wait_until(lambda: len(logged_steps(out)) >= 6, torchrun)  # past the step-4 checkpoint
    victim = worker_pids(torchrun)[1]
    os.kill(victim, signal.SIGKILL)
    logged_before = len(logged_steps(out))
    time.sleep(0.5)  # long enough for rank 0 to fail, too short for the restarted ranks to start
    saved = checkpoint_steps(out)

    console = finish(torchrun, log)
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {victim})" in console
    assert resumed_step(console) == saved[-1] >= 4  # the newest complete checkpoint
    assert logged_before < STEPS  # killed before the end, so the restart had steps to redo
    assert logged_steps(out) == list(range(1, STEPS + 1))  # the redone steps replaced, not appended
    assert losses(out) == reference


def test_a_rank_killed_while_saving_leaves_a_checkpoint_that_is_never_loaded(env, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    torchrun = launch(env, log, [*RUN, "--job.output_dir", str(out)], nproc=2, max_restarts=1)
    wait_until(lambda: len(logged_steps(out)) >= 1, torchrun)
    rank0 = worker_pids(torchrun)[0]  # rank 0 renames a finished save into place, so it dies before that
    half_written = out / "checkpoints" / ".tmp-step-00000008"
    wait_until(half_written.exists, torchrun, poll=0.001)
    os.kill(rank0, signal.SIGKILL)
    time.sleep(0.5)
    assert half_written.is_dir() and checkpoint_steps(out) == [4]

    console = finish(torchrun, log)
    assert resumed_step(console) == 4
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == [
        f"step-{step:08d}" for step in (4, 8, 12, 16)
    ]  # the re-done save replaced the .tmp folder
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert losses(out) == reference


# ----------------------------------------------------------------------------------------------- preemption


def test_sigterm_to_one_rank_checkpoints_exits_75_and_torchrun_restarts_into_the_same_curve(env, reference, tmp_path):
    """SLURM or torchrun may signal any rank: the flag travels with the step's all-reduce, so every rank
    checkpoints at the same step boundary and exits 75, which torchrun (with restarts left) answers by
    restarting the workers; the restarted run resumes from that checkpoint."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    torchrun = launch(env, log, [*RUN, "--job.output_dir", str(out)], nproc=2, max_restarts=1)
    wait_until(lambda: len(logged_steps(out)) >= 2, torchrun)
    os.kill(worker_pids(torchrun)[1], signal.SIGTERM)

    console = finish(torchrun, log)
    (stopped,) = re.findall(r"\[rank0\] preempted \(signal on another rank\) at step (\d+): checkpoint saved", console)
    assert f"[rank1] preempted (SIGTERM) at step {stopped}: checkpoint saved" in console
    assert re.search(r"failed \(exitcode: 75\) local_rank: [01]", console)
    assert resumed_step(console) == int(stopped) < STEPS
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert losses(out) == reference


# ----------------------------------------------------------------------------------------------- non-finite steps


def test_a_non_finite_step_stops_the_run_then_skip_nonfinite_resumes_past_it(env, tmp_path):
    """lr 1e6 on the debug model overflows the backward pass within a couple of steps (the first step, at
    lr 1e5 after warmup, already throws the weights far out)."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = [
        *RUN,
        "--training.steps",
        "8",
        "--optimizer.lr",
        "1e6",
        "--checkpoint.interval",
        "1",
        "--job.output_dir",
        str(out),
    ]
    console = finish(launch(env, log, args), log, NONFINITE_EXIT_CODE)
    last_line = console.splitlines()[-1]
    match = re.fullmatch(
        r"error: step (\d+): non-finite loss \S+ or grad norm \S+; the last good checkpoint is kept\. "
        r"Lower optimizer\.lr, or set training\.skip_nonfinite=true to skip such steps",
        last_line,
    )
    assert match, console[-3000:]
    bad = int(match[1])
    assert checkpoint_steps(out) == list(range(1, bad))[-5:]  # every good step saved, the bad one not
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert logged_steps(out) == list(range(1, bad))

    console = finish(
        launch(env, tmp_path / "skip.log", [*args, "--training.skip_nonfinite", "true"]), tmp_path / "skip.log"
    )
    assert resumed_step(console) == bad - 1  # the last good checkpoint loads
    assert logged_steps(out) == list(range(1, 9))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    non_finite = [row["step"] for row in rows if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]))]
    skipped = [
        int(step)
        for step in re.findall(r"step (\d+): non-finite .*: step skipped \(training.skip_nonfinite\)", console)
    ]
    assert skipped == non_finite and skipped[0] == bad
    model = Qwen3Model(flavor_config("debug"))
    load_model_weights(out / "checkpoints" / "step-00000008", model)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # skipped steps never reached the weights


# ----------------------------------------------------------------------------------------------- W&B failures


class _Answer500(BaseHTTPRequestHandler):
    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_wandb_server():
    """A real HTTP server on localhost that answers every request with 500."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer500)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def seconds(log_line: str) -> int:
    hours, minutes, secs = log_line[:8].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + int(secs)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("failure", ["no_credentials", "no_network", "server_error"])
def test_wandb_failures_leave_one_line_an_offline_run_and_every_metric(env, tmp_path, failure, failing_wandb_server):
    home = tmp_path / "home"
    home.mkdir()
    run_env = {key: value for key, value in env.items() if key != "WANDB_MODE"}
    run_env.update(HOME=str(home), NETRC=str(home / ".netrc"))
    server_url = f"http://127.0.0.1:{failing_wandb_server.server_port}"
    closed_url = f"http://127.0.0.1:{_closed_port()}"
    if failure != "no_credentials":
        run_env.update(WANDB_API_KEY=API_KEY, WANDB_BASE_URL=server_url if failure == "server_error" else closed_url)
    expected = {
        "no_credentials": "wandb: offline (no credentials (WANDB_API_KEY or ~/.netrc)); sync later with",
        "no_network": f"wandb: offline (W&B server unreachable: [Errno 111] Connection refused at {closed_url}); "
        "sync later with",
        "server_error": f"wandb: offline (W&B server error: HTTP 500 from {server_url}); sync later with",
    }[failure]
    out, log = tmp_path / "run", tmp_path / "run.log"
    process = launch(run_env, log, [*RUN, "--metrics.wandb", "true", "--job.output_dir", str(out)])
    wait_until(lambda: "] done: " in log.read_text(), process, poll=0.1)
    done_at = time.monotonic()
    console = finish(process, log)
    assert time.monotonic() - done_at < 5, "W&B held the exit back"

    (line,) = [line for line in console.splitlines() if "wandb:" in line]
    assert line.split("] ", 1)[1].startswith(expected), line
    first_step = next(line for line in console.splitlines() if re.search(r"\] step +1/", line))
    assert seconds(first_step) - seconds(line) <= 10, f"W&B held the start back:\n{line}\n{first_step}"
    assert logged_steps(out) == list(range(1, STEPS + 1))
    (offline,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert [row["step"] for row in load_run(str(offline)).rows] == list(range(1, STEPS + 1))
    if failure == "server_error":  # only the recipe's probe: W&B itself never sat retrying the server
        assert failing_wandb_server.requests == ["POST /graphql"]
    # The API key reaches no log, config dump, metric or W&B file.
    for path in [log, *out.rglob("*")]:
        assert not path.is_file() or API_KEY.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------------------------- pickled code


class _Payload:
    """Unpickling this runs `touch marker`: what a crafted checkpoint would do to whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def short_run(env, tmp_path_factory) -> Path:
    """A finished 2-step, one-process run with its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("short") / "run"
    args = [*RUN, "--training.steps", "2", "--job.output_dir", str(out)]
    finish(launch(env, out.parent / "run.log", args), out.parent / "run.log")
    return out


def _load_with_dcp_defaults(folder: Path) -> None:
    """What torch.distributed.checkpoint.load does with a checkpoint when given no reader or planner."""
    model = Qwen3Model(flavor_config("debug"))
    model_state, optim_state = get_state_dict(model, torch.optim.AdamW(model.parameters()))
    try:
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    except (Exception, CheckpointException):  # what matters is whether the payload ran, not how loading ended
        pass


def _pickled_metadata(out: Path, marker: Path) -> None:
    folder = out / "checkpoints" / "step-00000002"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / MANIFEST).unlink(missing_ok=True)  # an attacker drops the checksums: loading must still run no code


def _pickled_optimizer_value(out: Path, marker: Path) -> None:
    """A well-formed DCP checkpoint whose optimizer hyperparameter (a non-tensor value, stored pickled) is code."""
    folder = out / "checkpoints" / "step-00000002"
    for path in folder.iterdir():  # the manifest too, as an attacker would
        if path.name != "train_state.json":
            path.unlink()
    model = Qwen3Model(flavor_config("debug"))
    optimizer = torch.optim.AdamW(model.parameters())
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # train.py's schedule adds initial_lr
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = _Payload(marker)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder), no_dist=True)


@pytest.mark.parametrize("craft", [_pickled_metadata, _pickled_optimizer_value], ids=["metadata", "optimizer_value"])
def test_a_checkpoint_carrying_pickled_code_is_refused_without_running_it(env, short_run, tmp_path, craft):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    craft(out, tmp_path / "ran-by-dcp")
    _load_with_dcp_defaults(out / "checkpoints" / "step-00000002")
    assert (tmp_path / "ran-by-dcp").exists()  # the payload is live: DCP's own loader runs it

    craft(out, tmp_path / "ran-by-train")
    log = tmp_path / "resume.log"
    console = finish(launch(env, log, [*RUN, "--training.steps", "4", "--job.output_dir", str(out)]), log, 2)
    assert console.splitlines()[-1].startswith(
        f"error: checkpoint.resume: {out}/checkpoints/step-00000002 cannot be loaded ("
    )
    assert "UnpicklingError" in console.splitlines()[-1]
    assert not (tmp_path / "ran-by-train").exists()


def test_hf_weights_load_only_from_safetensors(env, tmp_path):
    """A model.init_from folder offering only a pickled pytorch_model.bin is refused; the pickle is never opened."""
    folder = tmp_path / "hf"
    save_hf_checkpoint(Qwen3Model(flavor_config("debug")), folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    log = tmp_path / "run.log"
    console = finish(
        launch(env, log, [*RUN, "--model.init_from", str(folder), "--job.output_dir", str(tmp_path / "run")]), log, 2
    )
    assert console.splitlines()[-1] == (
        f"error: {folder}: neither model.safetensors nor model.safetensors.index.json "
        "found; point model.init_from at an HF Qwen3 folder saved with safetensors"
    )
    assert not marker.exists() and not (tmp_path / "run").exists()
