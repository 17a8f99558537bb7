"""A real offline W&B run, written in a subprocess, reads back through recipes.run.runs exactly as it was logged."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.errors import USER_ERROR_EXIT_CODE
from recipes.run.runs import load_run

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_runs.py"
compare_main = runpy.run_path(str(SCRIPT))["main"]

# Values whose float64 repr has 17 significant digits, a NaN, and steps that start at 0 (W&B's proto omits 0).
LOGGED = [
    {"step": step, "loss": 10.0 / (step + 3), "lr": 3e-4 * (step + 1) / 7, "grad_norm": 1.0 + step / 3}
    for step in range(0, 12)
]
LOGGED[5]["grad_norm"] = math.nan

WRITE_RUN = """
import json, sys, wandb
rows = json.loads(sys.argv[2])
run = wandb.init(project="readback", dir=sys.argv[1], name="qwen3-flex", config={"model": {"attention": "flex"}})
for row in rows:
    run.log({key: value for key, value in row.items() if key != "step"}, step=row["step"])
run.finish()
"""


def offline_env(home: Path) -> dict:
    """No credentials and no network: what a cluster node without W&B access has."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    return {
        **env,
        "HOME": str(home),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> Path:
    """The offline-run-* folder of a run that logged LOGGED."""
    root = tmp_path_factory.mktemp("wandb_run")
    subprocess.run(
        [sys.executable, "-c", WRITE_RUN, str(root), json.dumps(LOGGED)], env=offline_env(root), check=True, timeout=120
    )
    (folder,) = (root / "wandb").glob("offline-run-*")
    return folder


def same_rows(read: list[dict], logged: list[dict]) -> bool:
    """Equal, with NaN equal to NaN."""
    return len(read) == len(logged) and all(
        a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)
        for a, b in zip(read, logged)
    )


def test_offline_run_reads_back_exactly_what_was_logged(offline_run):
    assert same_rows(load_run(str(offline_run)).rows, LOGGED)
    (log_file,) = offline_run.glob("run-*.wandb")
    assert same_rows(load_run(str(log_file)).rows, LOGGED)


def test_offline_run_is_labelled_by_its_config(offline_run):
    run = load_run(str(offline_run))
    assert run.label == "flex"
    assert same_rows(run.rows, LOGGED)


def test_compare_offline_run_against_its_metrics_jsonl(offline_run, tmp_path, capsys):
    run_dir = tmp_path / "qwen3_sdpa"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in LOGGED))
    table = tmp_path / "table.json"
    code = compare_main(
        [str(run_dir), str(offline_run), "--early-steps", "12", "--png", str(tmp_path / "c.png"), "--json", str(table)]
    )
    assert code == 0, capsys.readouterr().out
    (pair,) = json.loads(table.read_text())["pairs"]
    assert (pair["a"], pair["b"], pair["steps"], pair["values"]["early"]) == ("qwen3_sdpa", "flex", 12, 0.0)


def test_a_corrupt_run_log_exits_2(tmp_path, capsys):
    junk = tmp_path / "run-junk.wandb"
    junk.write_bytes(b"not a wandb log")
    other = tmp_path / "run"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert compare_main([str(other), str(junk), "--png", str(tmp_path / "x.png")]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert "run-junk.wandb: W&B could not read this run" in err and err.count("\n") == 1


def test_api_without_credentials_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "wandb:someone/readback/abc123", "wandb:someone/readback/def456"],
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("compare_runs.py: error: wandb:someone/readback/abc123: W&B API unreachable")
    assert "WANDB_API_KEY" in last_line


WORKSPACE_SCRIPT = SCRIPT.with_name("wandb_workspace.py")


def test_workspace_script_without_its_optional_package_exits_2(tmp_path):
    # sys.modules[name] = None makes `import name` fail as if it were not installed, wherever it is.
    code = (
        f"import runpy, sys; sys.modules['wandb_workspaces'] = None; sys.argv = ['wandb_workspace.py', '--entity', "
        f"'me', '--group', 'g']; runpy.run_path({str(WORKSPACE_SCRIPT)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stderr == (
        "wandb_workspace.py: error: wandb_workspaces is not installed; pip install wandb-workspaces\n"
    )


@pytest.mark.parametrize("kind", [[], ["--report"]])
def test_workspace_script_builds_the_view_and_needs_credentials_to_save(tmp_path, kind):
    pytest.importorskip("wandb_workspaces")
    result = subprocess.run(
        [sys.executable, str(WORKSPACE_SCRIPT), "--entity", "me", "--group", "g", *kind],
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stderr.startswith("wandb_workspace.py: error: could not save to W&B (No API key configured")
    assert result.stderr.count("\n") == 1
