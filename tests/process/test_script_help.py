"""Every script answers --help with its usage and exit code 0, and does nothing else: no file written in the
repository or the working folder, no program started (python, pip, sbatch, srun, torchrun, nvidia-smi and wandb
on PATH are replaced by recorders that only note they ran)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    path.relative_to(REPO).as_posix()
    for pattern in (
        "train.py",
        "scripts/*.py",
        "scripts/*.sh",
        "slurm/*.sh",
        "slurm/*.sbatch",
        "benchmarks/*.py",
        "benchmarks/*.sh",
    )
    for path in REPO.glob(pattern)
    if path.suffix == ".py" or path.read_text().startswith("#!")
)  # not sourced ones
RECORDED = ("python", "python3", "pip", "sbatch", "srun", "scontrol", "torchrun", "nvidia-smi", "wandb")


def _repository_files() -> str:
    """Untracked and ignored files too: what a script run in the repository would leave."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture
def sandbox(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "started.log"
    for name in RECORDED:
        recorder = bin_dir / name
        recorder.write_text(f'#!/bin/sh\necho {name} "$@" >> {started}\nexit 1\n')
        recorder.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "PYTHON": str(bin_dir / "python3"),
        "RECIPES_PYTHON": str(bin_dir / "python3"),
        "VENV": str(tmp_path / "venv"),
        "OUT": str(tmp_path / "out"),
        "RECIPES_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    return work, env, started


def test_every_script_is_covered():
    assert {"train.py", "scripts/install.sh", "slurm/train.sbatch", "scripts/export_hf.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_does_nothing(script, sandbox):
    work, env, started = sandbox
    before = _repository_files()
    command = [sys.executable if script.endswith(".py") else "bash", str(REPO / script), "--help"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    usage = "usage:" if script.endswith(".py") else script
    assert usage in result.stdout, f"{script} --help printed no usage:\n{result.stdout}"
    assert not started.exists(), f"{script} --help started: {started.read_text()}"
    assert list(work.iterdir()) == [], f"{script} --help wrote into the working folder"
    assert not any((work.parent / name).exists() for name in ("venv", "out", "cache")), "something was created"
    assert _repository_files() == before, f"{script} --help changed the repository"
