"""checkpoint.resume_point: which checkpoint a resume loads (the newest, or [checkpoint] load_step's) and which
later ones a load_step leaves behind; a load_step without its checkpoint is one line naming the steps there."""

import pytest

from recipes import checkpoint
from recipes.errors import UserError


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        folder = checkpoint.step_folder(root, step)
        folder.mkdir(parents=True)
        (folder / checkpoint.TRAIN_STATE).write_text("{}")
    (root / ".tmp-step-00000008").mkdir()  # a save cut short: never a resume point
    return root


def test_the_newest_without_load_step(root):
    assert checkpoint.resume_point(root, 0, applied=False) == (checkpoint.step_folder(root, 6), 6, [])


def test_load_step_goes_back_and_names_the_later_ones(root):
    folder, step, later = checkpoint.resume_point(root, 2, applied=False)
    assert (folder, step) == (checkpoint.step_folder(root, 2), 2)
    assert later == [checkpoint.step_folder(root, 4), checkpoint.step_folder(root, 6)]


def test_an_applied_load_step_resumes_the_newest(root):
    assert checkpoint.resume_point(root, 2, applied=True) == (checkpoint.step_folder(root, 6), 6, [])


def test_a_fresh_run_starts_at_zero(tmp_path):
    assert checkpoint.resume_point(tmp_path / "checkpoints", 0, applied=False) == (None, 0, [])


@pytest.mark.parametrize("load_step, there", [(3, "2, 4, 6"), (8, "2, 4, 6")])
def test_a_load_step_without_its_checkpoint_is_refused(root, load_step, there):
    with pytest.raises(
        UserError,
        match=rf"checkpoint.load_step: .* no complete checkpoint of step {load_step} "
        rf"\(steps there: {there}\); pick one of them, or 0 for the newest",
    ):
        checkpoint.resume_point(root, load_step, applied=False)
    assert checkpoint.step_folder(root, 6).is_dir()


def test_a_load_step_on_a_new_run_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"steps there: none yet"):
        checkpoint.resume_point(tmp_path / "checkpoints", 2, applied=False)
