"""The backend proof, end to end on CPU: scripts/train_backends.sh --preset cpu (real torchrun processes, offline
W&B runs) pretrains sdpa, evaluates that checkpoint under every backend, continues it under sdpa, flex, varlen
and sdpa again, and compares them against the repeat. Each mutation of recipes/qwen3/mutation.py then continues
the same checkpoint through tests/process/train_mutated.py: compare_runs.py must pass the honest backends and fail
every mutant in the same comparison. On CPU the backends share one math kernel and agree to fp32 rounding (~1e-6);
every mutation moves the first steps' loss by more than 1e-3.
"""

from __future__ import annotations

import json
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from matplotlib.image import imread
from train_process import REPO, finish

from recipes.config import load_config
from recipes.errors import USER_ERROR_EXIT_CODE
from recipes.run.runs import load_run, read_metrics, read_wandb_summary

compare_script = runpy.run_path(str(REPO / "scripts" / "compare_runs.py"))
compare_main, compare_statistics = compare_script["main"], compare_script["STATISTICS"]
LAUNCHER = REPO / "scripts" / "train_backends.sh"
EVAL_MATRIX = REPO / "scripts" / "eval_matrix.py"
HONEST = ("sdpa", "flex", "varlen", "sdpa_repeat")
PRETRAIN, STEPS = 20, 12
MUTATED = {"layout": "varlen", "leak": "flex", "scale": "varlen"}  # mutation -> the backend it breaks


def launcher(env: dict, *args: str, cwd: Path = REPO, log: Path | None = None) -> subprocess.Popen:
    output = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(
        ["bash", str(LAUNCHER), *args],
        cwd=cwd,
        env={**env, "PYTHON": sys.executable},
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def proof(env, tmp_path_factory) -> dict[str, Path]:
    """{name: run dir} of the proof ("start", the four continuations) and of the three mutants, "out": its folder,
    "log": its console. The launcher runs from another folder with a relative --out, which must land there."""
    root = tmp_path_factory.mktemp("backend-proof")
    log = root / "train_backends.log"
    finish(
        launcher(
            env,
            "--preset",
            "cpu",
            "--pretrain-steps",
            str(PRETRAIN),
            "--steps",
            str(STEPS),
            "--out",
            "backends",
            "--nproc",
            "1",
            "--",
            "--metrics.wandb",
            "true",
            cwd=root,
            log=log,
        ),
        log,
    )
    out = root / "backends"
    runs = {"out": out, "log": log, "start": out / "start", **{name: out / f"qwen3_{name}" for name in HONEST}}
    for mutation, backend in MUTATED.items():
        # The honest continuation's resolved config: the mutant differs from it in its attention code alone.
        run_dir = root / f"mutant_{mutation}"
        run_dir.mkdir()
        (run_dir / "config.toml").write_text((runs[backend] / "config.toml").read_text())
        subprocess.run(["cp", "-r", str(runs["start"] / "checkpoints"), str(run_dir)], check=True)
        with open(root / f"{mutation}.log", "w") as output:
            mutant = subprocess.Popen(
                [
                    sys.executable,
                    "tests/process/train_mutated.py",
                    mutation,
                    "--config",
                    str(run_dir / "config.toml"),
                    "--job.output_dir",
                    str(run_dir),
                    "--metrics.wandb",
                    "false",
                ],
                cwd=REPO,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        finish(mutant, root / f"{mutation}.log")
        runs[mutation] = run_dir
    return runs


def test_the_launcher_pretrains_once_and_continues_every_backend_from_it(proof):
    out = proof["out"]
    assert [row["step"] for row in read_metrics(proof["start"])] == list(range(1, PRETRAIN + 1))
    for name in HONEST:
        backend = name.removesuffix("_repeat")
        config = load_config(str(proof[name] / "config.toml"))
        assert (config.model.attention, config.metrics.wandb_group, config.job.name) == (
            backend,
            "backends",
            f"qwen3_{name}",
        )
        assert [row["step"] for row in read_metrics(proof[name])] == list(range(PRETRAIN + 1, PRETRAIN + STEPS + 1))
        history = [json.loads(line) for line in (proof[name] / "config_history.jsonl").read_text().splitlines()]
        assert history[0]["step"] == PRETRAIN
        assert ("model.attention" in history[0]["changed"]) == (backend != "sdpa")
    result = json.loads((out / "compare.json").read_text())
    assert (result["verdict"], result["calibrated"], result["dtype"]) == ("AGREE", True, "float32")
    assert result["repeats"] == ["sdpa (qwen3_sdpa) vs sdpa (qwen3_sdpa_repeat)"]
    assert all(pair["values"]["early"] <= 1e-5 for pair in result["pairs"])
    assert result["eval_matrix"]["agree"] and result["eval_matrix"]["rows"][0]["checkpoint"] == f"step-{PRETRAIN:08d}"
    assert imread(out / "compare.png").ndim == 3
    assert (out / "eval_matrix.md").read_text().startswith("| trained with")
    log = proof["log"].read_text()
    assert (
        "AGREE: all 6 pairs within tolerance (floor from sdpa (qwen3_sdpa) vs sdpa (qwen3_sdpa_repeat)); "
        "eval matrix spread" in log
    )
    assert log.rstrip().endswith(f"scripts/eval_matrix.py {out}/start --mutation")
    assert f"scripts/compare_runs.py {out}/{{qwen3_sdpa,qwen3_flex,qwen3_varlen,qwen3_sdpa_repeat}}" in log


def test_the_w_and_b_runs_read_back_and_carry_the_verdict(proof):
    for name in HONEST:
        training, verdict = sorted((proof[name] / "wandb").glob("offline-run-*"))
        # train.py sends W&B no None values (mfu on CPU, where no peak FLOP/s is known); every other value, exactly.
        logged = [{key: value for key, value in row.items() if value is not None} for row in read_metrics(proof[name])]
        assert load_run(str(training)).rows == logged, name
        summary, tags = read_wandb_summary(verdict)
        assert (summary["proof/verdict"], summary["proof/calibrated"], tags) == ("AGREE", True, ["proof:AGREE"])


@pytest.mark.parametrize("mutation", MUTATED)
def test_every_mutation_disagrees_while_the_honest_backends_agree(proof, mutation, tmp_path, capsys):
    backend = MUTATED[mutation]
    honest = [name for name in HONEST if name != backend]  # the honest run of its backend would be its repeat
    label = f"{backend} MUTATED ({mutation})"
    table = tmp_path / "compare.json"
    code = compare_main(
        [
            *(str(proof[name]) for name in honest),
            str(proof[mutation]),
            "--json",
            str(table),
            "--labels",
            ",".join(honest + [label]),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    result = json.loads(table.read_text())
    failed = {pair["a"] + " vs " + pair["b"]: pair for pair in result["pairs"] if pair["failed"]}
    assert sorted(failed) == sorted(f"{name} vs {label}" for name in honest)
    # Rows of 128 tokens rarely hold a document boundary, so the leak shows in val_loss (held-out rows, which do);
    # the other two change every row's attention, and the first steps show them.
    decisive = "val" if mutation == "leak" else "early"
    assert all(pair["values"][decisive] > 1e-3 for pair in failed.values()), failed
    assert f"DISAGREE: sdpa vs {label}: {compare_statistics[decisive]}" in out


def test_the_start_checkpoint_agrees_under_every_backend_and_not_through_the_layout_mistake(proof, env, tmp_path):
    table = tmp_path / "matrix.json"
    result = eval_matrix(env, str(proof["start"]), "--mutation", "--json", str(table))
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = json.loads(table.read_text())["rows"]
    fork = [row["losses"][b] for b in ("sdpa", "flex", "varlen")]
    assert max(fork) - min(fork) <= 1e-5
    assert min(abs(row["losses"]["varlen (0.2.1 layout)"] - loss) for loss in fork) > 1e-2


def eval_matrix(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EVAL_MATRIX), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("missing", ["checkpoints", "config.toml"])
def test_eval_matrix_refuses_a_run_it_cannot_evaluate_with_one_line(proof, env, tmp_path, missing):
    """Listed after a good run: every input is checked before any evaluation, so nothing else is printed."""
    bad = tmp_path / "qwen3_bad"
    bad.mkdir()
    if missing == "checkpoints":
        (bad / "config.toml").write_text((proof["start"] / "config.toml").read_text())
    result = eval_matrix(env, str(proof["start"]), str(bad))
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stdout == ""
    fix = (
        f"no complete checkpoint; train it first or pick --step from {bad / 'checkpoints'}"
        if missing == "checkpoints"
        else "no config.toml there; pass the job.output_dir of a train.py run"
    )
    assert result.stderr == f"error: {bad}: {fix}\n"


def descendants(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children |= {int(child) for child in (task / "children").read_text().split()}
        except OSError:  # the thread or process has just exited
            pass
    return children | {grandchild for child in children for grandchild in descendants(child)}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_terminating_the_launcher_stops_the_runs_it_started(env, tmp_path):
    out = tmp_path / "stopped"
    process = launcher(
        env,
        "--preset",
        "cpu",
        "--pretrain-steps",
        "100000",
        "--out",
        str(out),
        "--nproc",
        "1",
        "--",
        "--metrics.wandb",
        "false",
    )
    deadline = time.monotonic() + 120
    while not (out / "start" / "metrics.jsonl").is_file():  # pretraining is under way
        assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    started = descendants(process.pid)
    assert any("train.py" in Path(f"/proc/{pid}/cmdline").read_text() for pid in started if alive(pid))
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert f"train_backends.sh: stopped; the runs so far are in {out}" in output
    assert not [pid for pid in started if alive(pid)]
    assert "checkpoint saved" in output  # train.py got the TERM and saved before it exited


def test_help_and_the_cpu_warning(env, tmp_path):
    result = subprocess.run(["bash", str(LAUNCHER), "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "--preset cpu" in result.stdout and "--from-scratch" in result.stdout
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    result = subprocess.run(["bash", str(LAUNCHER), "--out", str(taken)], capture_output=True, text=True, env=env)
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert f"--out {taken} is not empty; choose a new folder" in result.stderr
    gpu = subprocess.run(["sh", "-c", "nvidia-smi -L | grep -q GPU"], capture_output=True).returncode == 0
    assert ("would take hours on this CPU; Ctrl-C and pass --preset cpu" in result.stderr) is not gpu
