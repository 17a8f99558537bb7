"""HF checkpoints: logits parity with transformers' Qwen3ForCausalLM in both directions, shards, bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from recipes.errors import UserError
from recipes.qwen3.attention import BACKENDS, MASKS
from recipes.qwen3.hf import hf_config_to_qwen3, load_hf_weights, read_hf_config, save_hf_checkpoint
from recipes.qwen3.model import Qwen3Config, Qwen3Model

EOS = 5
SHAPE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
ROPE_THETA = 5000.0  # not any default, so a rope_theta read wrongly shows in the logits


def _hf_config(tied: bool) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(**SHAPE, rope_theta=ROPE_THETA, tie_word_embeddings=tied, eos_token_id=EOS)


def _hf_model(tied: bool, randomize_norms) -> transformers.Qwen3ForCausalLM:
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(_hf_config(tied)).eval()
    randomize_norms(model)
    return model


def _one_document_batch() -> torch.Tensor:
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    tokens[tokens == EOS] = EOS + 1
    return tokens


def load_hf_checkpoint(folder, **overrides) -> Qwen3Model:
    """What train.py does with model.init_from, in one process: the shape from config.json, then the weights."""
    model = Qwen3Model(read_hf_config(folder, **overrides))
    model.init_weights(seed=0)
    load_hf_weights(model, folder)
    return model


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    out = model(_one_document_batch())
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, randomize_norms):
    """{tied: (folder, logits)}: checkpoints that transformers' save_pretrained wrote, and their logits."""
    folders = {}
    for tied in (False, True):
        folder = tmp_path_factory.mktemp(f"hf_tied_{tied}")
        model = _hf_model(tied, randomize_norms)
        model.save_pretrained(folder)
        folders[tied] = folder, _logits(model)
    return folders


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("attention", BACKENDS)
def test_load_hf_checkpoint_matches_transformers(attention, mask, tied, hf_folders):
    folder, hf_logits = hf_folders[tied]
    ours = load_hf_checkpoint(folder, attention=attention, mask=mask)
    assert (ours.config.attention, ours.config.mask, ours.config.eos_id) == (attention, mask, EOS)
    assert ours.config.rope_theta == ROPE_THETA and ours.config.tie_embeddings == tied
    assert ours.tok_embeddings.weight.dtype == torch.float32
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    torch.testing.assert_close(_logits(ours), hf_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("attention", BACKENDS)
def test_saved_checkpoint_loads_in_transformers(attention, tied, tmp_path, randomize_norms):
    ours = Qwen3Model(hf_config_to_qwen3(_hf_config(tied).to_dict(), attention=attention))
    ours.init_weights(seed=2)
    randomize_norms(ours, seed=2)
    save_hf_checkpoint(ours, tmp_path)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings == tied
    torch.testing.assert_close(_logits(hf), _logits(ours), rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_loads(tmp_path, randomize_norms):
    hf = _hf_model(False, randomize_norms)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 2
    torch.testing.assert_close(
        _logits(load_hf_checkpoint(tmp_path, attention="varlen")), _logits(hf), rtol=1e-5, atol=1e-5
    )


def test_transformers4_config_spelling():
    """transformers 4 wrote rope_theta at the top level and torch_dtype; 5 writes rope_parameters and dtype."""
    config = dict(
        SHAPE,
        model_type="qwen3",
        rope_theta=ROPE_THETA,
        rope_scaling=None,
        tie_word_embeddings=True,
        eos_token_id=[EOS, EOS + 1],
    )
    assert hf_config_to_qwen3(config, mask="document") == Qwen3Config(
        vocab_size=320,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=96,
        norm_eps=1e-6,
        rope_theta=ROPE_THETA,
        max_seq_len=64,
        tie_embeddings=True,
        eos_id=EOS,
        mask="document",
    )


@pytest.mark.parametrize(
    "edit,named",
    [
        ({"model_type": "qwen3_moe"}, "model_type"),
        ({"hidden_size": None}, "hidden_size is missing"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
    ],
    ids=["moe", "missing", "rope-scaling", "bias"],
)
def test_unsupported_config_is_a_config_error(edit, named):
    config = {key: value for key, value in dict(_hf_config(False).to_dict(), **edit).items() if value is not None}
    with pytest.raises(UserError, match=named):
        hf_config_to_qwen3(config)


def _corrupt_drop(tensors, config):
    del tensors["model.layers.1.self_attn.k_norm.weight"]


def _corrupt_extra(tensors, config):
    tensors["model.layers.2.mlp.gate_proj.weight"] = tensors["model.layers.1.mlp.gate_proj.weight"].clone()


def _corrupt_shape(tensors, config):
    config["intermediate_size"] = 128


@pytest.mark.parametrize(
    "corrupt,named",
    [
        (_corrupt_drop, "model.layers.1.self_attn.k_norm.weight is missing"),
        (_corrupt_extra, "unexpected tensor model.layers.2.mlp.gate_proj.weight"),
        (_corrupt_shape, r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), config.json implies \(128, 64\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_checkpoint_names_the_tensor(corrupt, named, hf_folders, tmp_path):
    folder, _ = hf_folders[False]
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    corrupt(tensors, config)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=named):
        load_hf_checkpoint(tmp_path)


def test_missing_weights_file_is_a_config_error(tmp_path, hf_folders):
    folder, _ = hf_folders[True]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path)
