"""Path-like inputs are checked before use: empty strings, an unknown ~user, over-long components, a BOM, and
[[ ]] tables each get one line naming the field or file."""

from __future__ import annotations

import pytest

from recipes.config import load_config
from recipes.errors import UserError


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--data.dataset", ""], "data.dataset: must not be empty"),
        (["--data.tokenizer", ""], "data.tokenizer: must not be empty"),
        (["--data.dataset", "hf:"], "data.dataset: 'hf:' names no dataset"),
        (
            ["--data.dataset", "~no-such-user-here/corpus.jsonl"],
            "data.dataset: '~no-such-user-here/corpus.jsonl' names a "
            "home folder (~no-such-user-here) that does not exist",
        ),
        (["--model.init_from", "~no-such-user-here/Qwen3"], "model.init_from: '~no-such-user-here/Qwen3' names a home"),
        (["--job.output_dir", "outputs/" + "x" * 300], "job.output_dir: the path component 'xxxx"),
        (["--data.tokenizer", "/tmp/" + "é" * 130 + "/tokenizer.json"], "is 260 bytes, over the 255"),
    ],
)
def test_bad_paths_are_one_line_naming_the_field(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_empty_init_from_means_random_init():
    assert load_config(None, ["--model.init_from", ""]).model.init_from == ""


def test_a_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[training]\nsteps = 7\n".encode())
    assert load_config(str(path)).training.steps == 7


def test_array_of_tables_is_named_as_such(tmp_path):
    path = tmp_path / "array.toml"
    path.write_text("[[training]]\nsteps = 7\n")
    with pytest.raises(UserError, match=r"\[\[training\]\] is an array of tables; write \[training\] once"):
        load_config(str(path))


def test_errors_in_a_run_folders_config_name_that_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[training\n")
    with pytest.raises(UserError) as error:
        load_config(str(path), source=str(path))
    assert str(error.value).startswith(f"{path}: {path} is not valid TOML")
    assert "--config" not in str(error.value)
