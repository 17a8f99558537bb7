"""Hugging Face Qwen3 checkpoints (config.json + safetensors, one file or sharded) to and from our Qwen3Model.

Weights only, through safetensors: nothing is unpickled. Our parameter names are torchtitan's; the mapping to
HF's names is `hf_name`. `read_hf_config` gives the shape, `load_hf_weights` fills a built (possibly sharded)
model. Loading never needs transformers; what `save_hf_checkpoint` writes loads with
`transformers.Qwen3ForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from recipes.errors import UserError
from recipes.qwen3.model import Qwen3Config, Qwen3Model, local_rows

_TOP_LEVEL = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_IN_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_SINGLE_FILE, _SHARD_INDEX = "model.safetensors", "model.safetensors.index.json"
_DEFAULT_ROPE_THETA = 10000.0  # transformers' default when config.json names none
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def hf_name(name: str) -> str:
    """Our parameter name (e.g. layers.3.attention.wq.weight) -> HF's (model.layers.3.self_attn.q_proj.weight)."""
    module, _, tensor = name.rpartition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{tensor}"
    _, index, inner = module.split(".", 2)
    return f"model.layers.{index}.{_IN_LAYER[inner]}.{tensor}"


def hf_config_to_qwen3(hf: dict, **overrides) -> Qwen3Config:
    """A config.json dict of an HF Qwen3 model -> Qwen3Config; `overrides` set our own fields (attention, ...)."""
    if hf.get("model_type") != "qwen3":
        raise UserError(
            f"config.json: model_type {hf.get('model_type')!r} is not 'qwen3'; only dense Qwen3 checkpoints load here"
        )
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise UserError(f"config.json: {missing[0]} is missing; an HF Qwen3 config.json names {', '.join(_REQUIRED)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spelling
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias")),
        "use_sliding_window": bool(hf.get("use_sliding_window")),
        "rope_type": rope.get("rope_type", rope.get("type", "default")) != "default",
    }
    for field, present in unsupported.items():
        if present:
            raise UserError(
                f"config.json: {field} is not supported by this Qwen3 fork; "
                "use a plain Qwen3 dense checkpoint (silu, no bias, full attention, default RoPE)"
            )
    eos = hf.get("eos_token_id")
    heads = hf["num_attention_heads"]
    config = Qwen3Config(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA))),
        max_seq_len=hf.get("max_position_embeddings", Qwen3Config.max_seq_len),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **({} if eos is None else {"eos_id": eos[0] if isinstance(eos, list) else eos}),
    )
    return replace(config, **overrides)


def qwen3_to_hf_config(config: Qwen3Config, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": config.norm_eps,
        # transformers 4 reads rope_theta, transformers 5 rope_parameters; each ignores the other's key.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "eos_token_id": config.eos_id,
        "use_sliding_window": False,
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers 4's key; 5 reads "dtype"
        "dtype": str(dtype).removeprefix("torch."),
    }


def read_hf_config(path: str | Path, **overrides) -> Qwen3Config:
    """The shape of the HF Qwen3 checkpoint in folder `path`, from its config.json."""
    config_json = Path(path) / "config.json"
    if not config_json.is_file():
        raise UserError(f"{path}: no config.json; point model.init_from at an HF Qwen3 checkpoint folder")
    try:
        hf = json.loads(config_json.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"model.init_from: {config_json} is not JSON ({error}); fix or replace it") from None
    return hf_config_to_qwen3(hf, **overrides)


@contextlib.contextmanager
def _open_safetensors(file: Path):
    """safe_open, with a damaged or cut-short file (its header is checked against its size) as a UserError."""
    try:
        with safe_open(file, "pt") as f:
            yield f
    except (SafetensorError, OSError) as error:
        raise UserError(
            f"model.init_from: {file} cannot be read as safetensors ({error}); it is damaged or cut "
            "short: copy it again, or point model.init_from at an intact HF Qwen3 folder"
        ) from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF name -> the safetensors file that holds it, for one file or a sharded checkpoint."""
    if (path / _SHARD_INDEX).is_file():
        try:
            weight_map = json.loads((path / _SHARD_INDEX).read_text())["weight_map"]
            return {name: path / shard for name, shard in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, or not an index
            raise UserError(
                f"model.init_from: {path / _SHARD_INDEX} is not a safetensors index ({error!r}); copy "
                "it again, or point model.init_from at an intact HF Qwen3 folder"
            ) from None
    if (path / _SINGLE_FILE).is_file():
        with _open_safetensors(path / _SINGLE_FILE) as f:
            return {name: path / _SINGLE_FILE for name in f.keys()}
    raise UserError(
        f"{path}: neither {_SINGLE_FILE} nor {_SHARD_INDEX} found; "
        "point model.init_from at an HF Qwen3 folder saved with safetensors"
    )


@torch.no_grad()
def load_hf_weights(model: Qwen3Model, path: str | Path) -> None:
    """Copy an HF Qwen3 checkpoint's weights into `model`, whole or FSDP-sharded: each process reads only the rows
    of each tensor it holds (safetensors slices), so no process ever holds the whole checkpoint."""
    path = Path(path)
    files = _tensor_files(path)
    config = model.config
    # the tied head is the embedding: named once; names as they are in the model, without activation
    # checkpointing's wrapper
    expected = {name.replace(_CHECKPOINT_PREFIX, ""): param for name, param in model.named_parameters()}
    unexpected = set(files) - {hf_name(name) for name in expected}
    if config.tie_embeddings:
        unexpected.discard(hf_name("output.weight"))  # some exporters write the tied head too; checked below
    if unexpected:
        raise UserError(
            f"{path}: unexpected tensor {sorted(unexpected)[0]} ({len(unexpected)} in all); "
            "only dense Qwen3 checkpoints load here"
        )
    for name, param in expected.items():
        key = hf_name(name)
        if key not in files:
            raise UserError(
                f"{path}: tensor {key} is missing; the checkpoint is incomplete or its config.json does not describe it"
            )
        local, rows = local_rows(param)
        with _open_safetensors(files[key]) as f:
            stored = f.get_slice(key)
            if tuple(stored.get_shape()) != tuple(param.shape):
                raise UserError(
                    f"{path}: tensor {key} has shape {tuple(stored.get_shape())}, config.json implies "
                    f"{tuple(param.shape)}; fix config.json or the checkpoint"
                )
            local.copy_(stored[rows])
    head = hf_name("output.weight")
    if config.tie_embeddings and head in files:
        local, rows = local_rows(model.tok_embeddings.weight)
        with _open_safetensors(files[head]) as f:
            if not torch.equal(f.get_slice(head)[rows].to(local.dtype), local):
                raise UserError(
                    f"{path}: lm_head.weight differs from model.embed_tokens.weight although "
                    "tie_word_embeddings is true; set it false in config.json"
                )


def save_hf_checkpoint(model: Qwen3Model, path: str | Path) -> None:
    """Write config.json + model.safetensors that transformers' Qwen3ForCausalLM loads.

    Takes an unsharded model; gather an FSDP model's full state dict first.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {
        hf_name(name): tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (config.tie_embeddings and name == "output.weight")
    }
    save_file(tensors, path / _SINGLE_FILE, metadata={"format": "pt"})
    dtype = model.tok_embeddings.weight.dtype
    (path / "config.json").write_text(json.dumps(qwen3_to_hf_config(config, dtype), indent=2) + "\n")
