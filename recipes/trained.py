"""A trained run read back for use in one process (opened by recipes.run.runs.open_run): its model on any
attention backend (`load_model`), its Hugging Face export (`export`) and sample text (`generate`).
scripts/eval_matrix.py, scripts/export_hf.py, scripts/generate.py and train.py's `[checkpoint] export_hf` and
`[eval] sample_every` all use these.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from recipes import checkpoint, data
from recipes.build import model_shape
from recipes.config import Config, expand_path
from recipes.errors import UserError
from recipes.qwen3.hf import save_hf_checkpoint
from recipes.qwen3.model import Qwen3Model
from recipes.run.runs import open_run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(config: Config) -> data.Tokenizer:
    return data.build_tokenizer(config.data, data.default_cache_dir())


def load_model(config: Config, folder: Path, tokenizer: data.Tokenizer, attention: str | None = None) -> Qwen3Model:
    """The checkpoint's weights in a whole (unsharded) model, on the run's attention backend or `attention`."""
    shape = model_shape(config, tokenizer.eos_id)
    if attention is not None and attention != shape.attention:
        shape = dataclasses.replace(shape, attention=attention, kernel="auto")
    model = Qwen3Model(shape)
    checkpoint.load_model_weights(folder, model)
    return model


def export(run_dir: Path, step: int | None, dest: Path, dtype: torch.dtype, replace: bool = False) -> Path:
    """Writes the checkpoint of `step` (None: the newest) as an HF Qwen3 folder at `dest`; returns the checkpoint.
    `dest` must be new or empty unless `replace` (train.py's export at the end replaces its previous one)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not replace:
        raise UserError(f"DEST: {dest} already holds files; name a new or empty folder")
    above = next(path for path in dest.parents if path.exists())
    if not above.is_dir():
        raise UserError(f"DEST: {above} is a file, so {dest} cannot be made under it; name another folder")
    config, folder = open_run(run_dir, step)
    tokenizer = load_tokenizer(config)
    model = load_model(config, folder, tokenizer)
    # Written beside DEST and renamed into place: a killed export leaves only a hidden .tmp folder, never a DEST
    # that looks complete.
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_export(model.to(dtype), config, tokenizer, tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; an export is for sharing
        if dest.is_dir():
            shutil.rmtree(dest)  # empty, or the previous export being replaced
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_export(model: Qwen3Model, config: Config, tokenizer: data.Tokenizer, dest: Path) -> None:
    """config.json, model.safetensors and the run's tokenizer files into dest."""
    save_hf_checkpoint(model, dest)
    source = expand_path(config.data.tokenizer)
    source = source.parent if source.is_file() else source
    if config.data.tokenizer != "default" and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, dest / name)
    else:  # the default BPE, or a hub id (whose files were read through the hub cache)
        (dest / "tokenizer.json").write_text(tokenizer.engine.to_str())
        (dest / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token}, indent=1)
            + "\n"
        )


@torch.no_grad()
def generate(
    model: Qwen3Model,
    tokenizer: data.Tokenizer,
    prompt: str,
    new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> str:
    """The prompt's continuation: greedy at temperature 0, else sampled (from the top_k tokens when top_k > 0).
    Stops at EOS. The whole window is recomputed per token (no KV cache): for looking at a model, not serving it."""
    device = next(model.parameters()).device
    ids = tokenizer.encode_batch([prompt])[0] or [tokenizer.eos_id]  # an empty prompt starts a new document
    prompt_length = len(ids)
    for _ in range(new_tokens):
        window = torch.tensor([ids[-model.config.max_seq_len :]], device=device)
        logits = model(window)[0, -1].float()  # one row, one document
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if top_k:
                logits[logits < logits.topk(min(top_k, logits.numel())).values[-1]] = -float("inf")
            probabilities = (logits / temperature).softmax(-1)
            token = int(torch.multinomial(probabilities.cpu(), 1, generator=generator))
        if token == tokenizer.eos_id:
            break
        ids.append(token)
    return tokenizer.engine.decode(ids[prompt_length:])
