"""Helpers for tests that run train.py as real processes: `python train.py` or `torchrun` (gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from recipes.config import load_config
from recipes.data import build_dataloader, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
DEBUG_CONFIG = REPO / "configs" / "qwen3_debug.toml"


def train_env(cache: Path, wandb_home: Path) -> dict:
    """The environment for train.py: the default tokenizer and the tokenized corpus built once into `cache` (so
    concurrent runs only read it), W&B offline and writing under `wandb_home`, one thread per process (runs share
    the cores, and a resumed run must reduce in the same order as an uninterrupted one to match it bit for bit), and
    torchrun restarts on a fresh store (see docs/troubleshooting.md, "torchrun restarts fail to connect"), and this
    checkout's recipes/ first on the path (scripts/*.py would otherwise import the installed one)."""
    data = load_config(str(DEBUG_CONFIG)).data
    build_dataloader(data, build_tokenizer(data, cache), 64, 2, 0, 1, 0, cache)
    return {
        **{key: value for key, value in os.environ.items() if not key.startswith("WANDB_")},
        "RECIPES_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(wandb_home),
        "WANDB_CACHE_DIR": str(wandb_home),
        "WANDB_DATA_DIR": str(wandb_home),
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }


def debug_run(
    *more: str,
    steps: int | None,
    seq_len: int = 64,
    local_batch_size: int | None = 2,
    warmup_steps: int | None = None,
    log_every: int = 1,
    wandb: bool | None = False,
    checkpoint_interval: int | None = None,
    checkpoint_keep: int | None = None,
) -> list[str]:
    """train.py's arguments for a short run of the debug config: `steps` of `local_batch_size` rows of `seq_len`
    tokens, a metrics row every `log_every` steps, W&B off, then `more`. A setting given as None is left to the
    config."""
    overrides = {
        "training.steps": steps,
        "training.seq_len": seq_len,
        "training.local_batch_size": local_batch_size,
        "optimizer.warmup_steps": warmup_steps,
        "metrics.log_every": log_every,
        "metrics.wandb": None if wandb is None else str(wandb).lower(),
        "checkpoint.interval": checkpoint_interval,
        "checkpoint.keep": checkpoint_keep,
    }
    given = [item for field, value in overrides.items() if value is not None for item in (f"--{field}", str(value))]
    return ["--config", str(DEBUG_CONFIG), *given, *more]


def train_command(args: list[str], nproc: int = 1, max_restarts: int = 0) -> list[str]:
    if nproc == 1 and not max_restarts:
        return [sys.executable, "train.py", *args]
    return [
        str(TORCHRUN),
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "train.py",
        *args,
    ]


def launch(env: dict, log: Path, args: list[str], nproc: int = 1, max_restarts: int = 0) -> subprocess.Popen:
    """Starts train.py with its console output in `log` (a file, not a pipe, so concurrent runs never block)."""
    with open(log, "w") as output:
        return subprocess.Popen(
            train_command(args, nproc, max_restarts),
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )


def finish(process: subprocess.Popen, log: Path, code: int = 0) -> str:
    process.wait(timeout=600)
    text = log.read_text()
    assert process.returncode == code, f"{' '.join(process.args)} exited {process.returncode}:\n{text[-4000:]}"
    return text


def worker_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the workers torchrun runs now (its child processes, by the RANK in their environment)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            parent = int(status.split("PPid:")[1].split()[0])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # not a process, or one that has just exited
            continue
        rank = next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)
        if parent == torchrun.pid and rank is not None:
            workers[rank] = int(entry.name)
    return workers
