"""The backend proof, end to end on CPU: scripts/train_backends.sh trains sdpa, flex and varlen (real torchrun
processes, offline W&B runs) and tests/process/train_mutated.py trains varlen with torchtitan 0.2.1's layout mistake on
the same seed and data. compare_runs.py, the W&B read-back and eval_matrix.py must pass the three and catch the
mutation. On CPU the backends share one math kernel, so they must agree to fp32 noise (1e-4); the mutation changes
the function the model computes, so it lands orders of magnitude further away (> 1e-2).
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread
from train_process import REPO, finish

from recipes.config import load_config
from recipes.errors import USER_ERROR_EXIT_CODE
from recipes.run.runs import load_run, read_metrics

compare_main = runpy.run_path(str(REPO / "scripts" / "compare_runs.py"))["main"]
EVAL_MATRIX = REPO / "scripts" / "eval_matrix.py"
BACKENDS = ("sdpa", "flex", "varlen")
MUTATION = "varlen (0.2.1 layout)"  # eval_matrix.py's column name
STEPS = 16
# configs/qwen3_<backend>.toml shrunk to the debug model in fp32: 16 steps of 2 x 64 tokens, checkpoints at 8 and 16.
OVERRIDES = ["--model.flavor", "debug", "--training.dtype", "float32", "--data.vocab_size", "2048",
             "--training.seq_len", "64", "--training.local_batch_size", "2", "--training.steps", str(STEPS),
             "--optimizer.warmup_steps", "2", "--checkpoint.interval", "8", "--metrics.log_every", "1",
             "--metrics.wandb", "true"]
CPU_TOLERANCE = ["--tolerance", "1e-4", "--mean-tolerance", "1e-4"]


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory) -> dict[str, Path]:
    """{backend: run dir} from the launcher, "mutated": the mutated varlen run, "launcher_log": its console.
    The launcher runs from another folder with a relative --out, which must land in that folder."""
    root = tmp_path_factory.mktemp("backend-proof")
    with open(root / "mutated.log", "w") as log:  # trains beside the launcher: two cores, one run each
        mutated = subprocess.Popen(
            [sys.executable, "tests/process/train_mutated.py", "--config", "configs/qwen3_varlen.toml", *OVERRIDES,
             "--metrics.wandb", "false", "--job.output_dir", str(root / "mutated")],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    launcher_log = root / "train_backends.log"
    with open(launcher_log, "w") as log:
        launcher = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "train_backends.sh"), "--out", "backends", "--nproc", "1", "--",
             *OVERRIDES],
            cwd=root, env={**env, "PYTHON": sys.executable}, stdout=log, stderr=subprocess.STDOUT)
    finish(launcher, launcher_log)
    finish(mutated, root / "mutated.log")
    return {**{backend: root / "backends" / f"qwen3_{backend}" for backend in BACKENDS},
            "mutated": root / "mutated", "launcher_log": launcher_log}


def test_launcher_trains_the_three_configs_into_one_folder_and_group_and_compares_them(runs):
    out = runs["sdpa"].parent
    for backend in BACKENDS:
        config = load_config(str(runs[backend] / "config.toml"))
        assert (config.model.attention, config.metrics.wandb_group) == (backend, "backends")
        assert [row["step"] for row in read_metrics(runs[backend])] == list(range(1, STEPS + 1))
        assert sorted(p.name for p in (runs[backend] / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]
    # Its own comparison, at the default (GPU) tolerance.
    assert json.loads((out / "compare.json").read_text())["passed"] is True
    assert imread(out / "compare.png").ndim == 3
    assert runs["launcher_log"].read_text().rstrip().endswith("result: all 3 pairs agree")


def test_compare_runs_passes_the_backends_and_fails_the_mutated_run(runs, tmp_path, capsys):
    png, table = tmp_path / "backends.png", tmp_path / "backends.json"
    arguments = [*(str(runs[b]) for b in BACKENDS), *CPU_TOLERANCE, "--png", str(png), "--json", str(table)]
    assert compare_main(arguments) == 0
    assert all(pair["max_abs_diff"] <= 1e-4 for pair in json.loads(table.read_text())["pairs"])
    height, width, _ = imread(png).shape  # a PNG that decodes, at the size compare_runs draws
    assert width > 600 and height > 400

    # The three again, with the mutated run: exactly its three pairs fail, by far more than the tolerance.
    table = tmp_path / "with_mutation.json"
    code = compare_main([*(str(runs[b]) for b in BACKENDS), str(runs["mutated"]), *CPU_TOLERANCE,
                         "--labels", f"sdpa,flex,varlen,{MUTATION}", "--png", str(tmp_path / "m.png"),
                         "--json", str(table)])
    assert code == 1, capsys.readouterr().out
    pairs = {(pair["a"], pair["b"]): pair for pair in json.loads(table.read_text())["pairs"]}
    assert sorted(key for key, pair in pairs.items() if not pair["passed"]) == [(b, MUTATION) for b in sorted(BACKENDS)]
    sdpa_vs_mutated = pairs[("sdpa", MUTATION)]
    assert sdpa_vs_mutated["max_abs_diff"] > 1e-2, sdpa_vs_mutated
    # Step 1 is the same weights on the same batch: the forward pass alone already differs.
    sdpa_loss, mutated_loss = (read_metrics(runs[name])[0]["loss"] for name in ("sdpa", "mutated"))
    assert abs(sdpa_loss - mutated_loss) > 1e-3


def test_offline_wandb_runs_of_the_three_backends_hold_their_metrics_jsonl(runs):
    for backend in BACKENDS:
        (offline_run,) = (runs[backend] / "wandb").glob("offline-run-*")
        # train.py sends W&B no None values (mfu on CPU, where no peak FLOP/s is known); every other value, exactly.
        logged = [{key: value for key, value in row.items() if value is not None}
                  for row in read_metrics(runs[backend])]
        read_back = load_run(str(offline_run))  # the history and the run's config, as compare_runs.py reads them
        assert read_back.rows == logged, backend
        assert read_back.label == backend


def eval_matrix(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EVAL_MATRIX), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_eval_matrix_rows_agree_and_the_mutation_column_does_not(runs, env, tmp_path):
    table = tmp_path / "matrix.json"
    result = eval_matrix(env, *(str(runs[b]) for b in BACKENDS), "--mutation", "--json", str(table))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: backends agree" in result.stdout
    rows = json.loads(table.read_text())["rows"]
    assert [(row["trained_with"], row["checkpoint"]) for row in rows] == [(b, "step-00000016") for b in BACKENDS]
    for row in rows:
        fork = [row["losses"][b] for b in BACKENDS]
        assert max(fork) - min(fork) <= 1e-4, row
        assert min(abs(row["losses"][MUTATION] - loss) for loss in fork) > 1e-2, row


@pytest.mark.parametrize("missing", ["checkpoints", "config.toml"])
def test_eval_matrix_refuses_a_run_it_cannot_evaluate_with_one_line(runs, env, tmp_path, missing):
    """Listed after a good run: every input is checked before any evaluation, so nothing else is printed."""
    bad = tmp_path / "qwen3_bad"
    bad.mkdir()
    if missing == "checkpoints":
        (bad / "config.toml").write_text((runs["sdpa"] / "config.toml").read_text())
    result = eval_matrix(env, str(runs["sdpa"]), str(bad))
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stdout == ""
    fix = (f"no complete checkpoint; train it first or pick --step from {bad / 'checkpoints'}"
           if missing == "checkpoints" else "no config.toml there; pass the job.output_dir of a train.py run")
    assert result.stderr == f"error: {bad}: {fix}\n"
