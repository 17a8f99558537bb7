"""scripts/export_hf.py on checkpoints of real train.py runs: transformers loads the export, and its logits equal
ours (fp32), for tied and untied heads; bad input is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from train_process import REPO, debug_run, finish, launch

from recipes import checkpoint
from recipes.build import model_shape
from recipes.config import load_config
from recipes.data import build_tokenizer
from recipes.errors import USER_ERROR_EXIT_CODE
from recipes.qwen3.model import Qwen3Model, flavor_config

EXPORT = REPO / "scripts" / "export_hf.py"
RUN = debug_run(steps=3, seq_len=32, local_batch_size=None, checkpoint_interval=2)


def untied_hf_folder(path):
    """An untied HF Qwen3 (transformers' own save_pretrained) with the debug shape, to fine-tune from."""
    debug = flavor_config("debug")
    config = transformers.Qwen3Config(
        vocab_size=debug.vocab_size,
        hidden_size=debug.dim,
        intermediate_size=debug.hidden_dim,
        num_hidden_layers=debug.n_layers,
        num_attention_heads=debug.n_heads,
        num_key_value_heads=debug.n_kv_heads,
        head_dim=debug.head_dim,
        max_position_embeddings=debug.max_seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    extra = {"tied": [], "untied": ["--model.init_from", str(untied_hf_folder(root / "hf-untied"))]}
    started = {
        name: launch(env, root / f"{name}.log", [*RUN, *args, "--job.output_dir", str(root / name)])
        for name, args in extra.items()
    }
    for name, process in started.items():
        finish(process, root / f"{name}.log")
    return {name: root / name for name in started}


def export(env, *args):
    return subprocess.run(
        [sys.executable, str(EXPORT), *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_transformers_loads_the_export_with_our_logits(runs, env, tmp_path, name):
    run = runs[name]
    result = export(env, run, tmp_path / "hf", "--step", "2")
    assert result.returncode == 0, result.stderr
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == (name == "tied")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")

    config = load_config(str(run / "config.toml"))
    ours = Qwen3Model(model_shape(config, build_tokenizer(config.data, Path(env["RECIPES_CACHE"])).eos_id))
    checkpoint.load_model_weights(checkpoint.find(run / "checkpoints", 2), ours)
    ids = torch.tensor([tokenizer.encode("def export(run):\n    return run.save()\n")])
    assert tokenizer.decode(ids[0]) == "def export(run):\n    return run.save()\n"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert checkpoint.find(run / "checkpoints") != checkpoint.find(run / "checkpoints", 2)  # --step chose step 2


@pytest.mark.parametrize("case", ["dest-holds-files", "missing-step", "not-a-run", "dest-under-a-file"])
def test_bad_input_is_one_line_and_exit_2(runs, env, tmp_path, case):
    dest = tmp_path / "dest"
    run, step = runs["tied"], "2"
    if case == "dest-holds-files":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    elif case == "missing-step":
        step = "1"
    elif case == "dest-under-a-file":
        (tmp_path / "a-file").write_text("mine")
        dest = tmp_path / "a-file" / "dest"
    else:
        run = tmp_path
    result = export(env, run, dest, "--step", step)
    assert result.returncode == USER_ERROR_EXIT_CODE and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    expected = {
        "dest-holds-files": "already holds files",
        "missing-step": "no complete checkpoint at step 1",
        "not-a-run": "no config.toml there",
        "dest-under-a-file": "is a file, so",
    }[case]
    assert expected in result.stderr
    if case != "dest-holds-files":
        assert not dest.exists()  # refused before anything was written


@pytest.mark.parametrize("args", [["--step", "0"], ["--step", "-3"], ["--step", "two"]])
def test_bad_script_arguments_are_refused_by_argparse(runs, env, tmp_path, args):
    result = export(env, runs["tied"], tmp_path / "dest", *args)
    assert result.returncode == USER_ERROR_EXIT_CODE and "error: argument --step" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "dest").exists()
