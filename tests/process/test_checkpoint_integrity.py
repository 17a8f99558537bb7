"""Checkpoints that cannot lie: a damaged file, a storage path outside the folder, a train_state.json of the wrong
shape and folders the recipe did not name are each caught before anything is loaded, by resume, eval_matrix and
export_hf alike. Every case starts from one real run of train.py."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_process import REPO, debug_run, finish, launch

from recipes.checkpoint import MANIFEST, _MetadataUnpickler, complete_checkpoints

RUN = debug_run(steps=None, warmup_steps=1, checkpoint_interval=2, checkpoint_keep=5)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory) -> Path:
    """A run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("trained") / "run"
    finish(
        launch(env, out.parent / "run.log", [*RUN, "--training.steps", "4", "--job.output_dir", str(out)]),
        out.parent / "run.log",
    )
    assert [path.name for path in complete_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def resume(env, out: Path, steps: int, code: int, *extra: str) -> str:
    log = out.parent / "resume.log"
    return finish(
        launch(env, log, [*RUN, "--training.steps", str(steps), "--job.output_dir", str(out), *extra]), log, code
    )


def script(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def shard(folder: Path) -> Path:
    return next(path for path in sorted(folder.iterdir()) if path.suffix == ".distcp")


def test_every_file_of_a_checkpoint_is_in_its_manifest(trained):
    for folder in complete_checkpoints(trained / "checkpoints"):
        manifest = json.loads((folder / MANIFEST).read_text())
        assert sorted(manifest["files"]) == sorted(path.name for path in folder.iterdir() if path.name != MANIFEST)


def test_a_flipped_byte_in_a_shard_is_refused_by_resume_eval_matrix_and_export(env, run, tmp_path):
    step4 = run / "checkpoints" / "step-00000004"
    damaged = shard(step4)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(255 - b for b in data[len(data) // 2 : len(data) // 2 + 64])
    damaged.write_bytes(bytes(data))
    metrics_before = (run / "metrics.jsonl").read_text()

    last = resume(env, run, 6, 2).strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint: {damaged} does not match its checksum"), last
    assert "step 4 is damaged" in last and f"previous complete checkpoint is {run}/checkpoints/step-00000002" in last
    assert (run / "metrics.jsonl").read_text() == metrics_before  # refused before anything was written

    for args in (
        ["scripts/eval_matrix.py", str(run), "--batches", "1"],
        ["scripts/export_hf.py", str(run), str(tmp_path / "hf")],
    ):
        result = script(env, *args)
        assert result.returncode == 2, result.stderr
        assert f"{damaged} does not match its checksum" in result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists()

    shutil.move(step4, tmp_path / "aside")  # what the message advises: the run resumes from step 2
    assert "resumed from" in resume(env, run, 6, 0) and (run / "checkpoints" / "step-00000006").is_dir()


def test_a_storage_path_outside_the_folder_is_refused(env, run, tmp_path):
    """A crafted .metadata (its manifest rewritten to match, as an attacker would) naming another run's shard."""
    folder = run / "checkpoints" / "step-00000004"
    other = tmp_path / "other-run.distcp"
    shutil.copy(shard(folder), other)
    with open(folder / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    for info in metadata.storage_data.values():
        info.relative_path = str(Path("..") / ".." / ".." / other.name)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    (folder / MANIFEST).unlink()  # with no manifest the checkpoint loads unverified, so the path check must hold

    last = resume(env, run, 6, 2).strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint.resume: {folder} cannot be loaded ("), last
    assert "not a file inside" in last


@pytest.mark.parametrize("field,value", [("step", "4"), ("step", 3), ("scheduler", []), ("rng", {"torch": [300]})])
def test_train_state_is_checked_field_by_field(env, run, field, value):
    folder = run / "checkpoints" / "step-00000004"
    state = json.loads((folder / "train_state.json").read_text())
    state[field] = value
    (folder / "train_state.json").write_text(json.dumps(state))
    (folder / MANIFEST).unlink()

    last = resume(env, run, 6, 2).strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint.resume: {folder} cannot be loaded (train_state.json: field '{field}'"), (
        last
    )


def test_only_the_recipes_own_names_are_loaded_and_pruned(env, run):
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "step-00000002", checkpoints / "step-3")  # another tool's name, sorts last
    shutil.copytree(checkpoints / "step-00000004", checkpoints / "step-00000004.bak")  # a user's backup
    (checkpoints / "step-999").mkdir()  # junk that looks like a checkpoint
    (checkpoints / "step-999" / "train_state.json").write_text("{}")

    console = resume(env, run, 8, 0, "--checkpoint.keep", "1")
    assert "resumed from" in console and "(step 4)" in console
    assert console.count("not named by this recipe") == 1
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        "step-00000004.bak",
        "step-00000008",
        "step-3",
        "step-999",
    ]  # only the recipe's own were pruned


def test_export_is_renamed_into_place_with_shareable_modes(env, trained, tmp_path):
    dest = tmp_path / "exports" / "hf"
    result = script(env, "scripts/export_hf.py", str(trained), str(dest))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in dest.parent.iterdir()) == ["hf"]  # no temporary folder left beside it
    modes = {path.name: path.stat().st_mode & 0o777 for path in dest.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
