"""recipes.run.runs.load_run's refusals that need no W&B log parsing (tests/process/test_wandb_readback.py reads real
offline runs back)."""

import pytest

from recipes.errors import UserError
from recipes.run.runs import load_run


def test_a_folder_with_two_run_logs_is_refused(tmp_path):
    for name in ("run-a.wandb", "run-b.wandb"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match="expected one run-\\*.wandb file there, found 2"):
        load_run(str(tmp_path))


def test_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="neither metrics.jsonl nor a run-\\*.wandb file there"):
        load_run(str(tmp_path))


def test_api_run_path_must_have_three_parts():
    with pytest.raises(UserError, match="wandb:ENTITY/PROJECT/RUN_ID"):
        load_run("wandb:entity/run_id")
