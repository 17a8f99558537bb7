"""Export a training checkpoint as a Hugging Face Qwen3 model folder that transformers loads.

    python scripts/export_hf.py RUN_DIR [--step N] [--dtype bfloat16] DEST

Writes DEST/config.json and DEST/model.safetensors (Qwen3ForCausalLM.from_pretrained(DEST) loads them), and the
tokenizer's files: the HF tokenizer folder's own tokenizer.json and tokenizer_config.json when the run used one,
else the run's default BPE as tokenizer.json with its EOS in tokenizer_config.json. The model is gathered whole in
this process (float32 by default: the training weights as they are). Exit code 2, with one line, on a DEST that
holds files, a step that has no checkpoint, or a run folder that is not one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from recipes import checkpoint, data
from recipes.build import model_shape
from recipes.cli import ArgumentParser, positive_int
from recipes.config import expand_path
from recipes.errors import USER_ERROR_EXIT_CODE, UserError
from recipes.qwen3.hf import save_hf_checkpoint
from recipes.qwen3.model import Qwen3Model
from recipes.run.runs import open_run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export(run_dir: Path, step: int | None, dest: Path, dtype: torch.dtype) -> Path:
    config, folder = open_run(run_dir, step)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"DEST: {dest} already holds files; name a new or empty folder")
    above = next(path for path in dest.parents if path.exists())
    if not above.is_dir():
        raise UserError(f"DEST: {above} is a file, so {dest} cannot be made under it; name another folder")
    tokenizer = data.build_tokenizer(config.data, data.default_cache_dir())
    model = Qwen3Model(model_shape(config, tokenizer.eos_id))
    checkpoint.load_model_weights(folder, model)
    # Written beside DEST and renamed into place: a killed export leaves only a hidden .tmp folder, never a DEST
    # that looks complete.
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_export(model.to(dtype), config, tokenizer, tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; an export is for sharing
        if dest.is_dir():
            dest.rmdir()  # checked empty above
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_export(model: Qwen3Model, config, tokenizer, dest: Path) -> None:
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
        (dest / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token}, indent=1) + "\n")


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("dest", type=Path, metavar="DEST")
    parser.add_argument("--step", type=positive_int, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    try:
        folder = export(args.run_dir, args.step, args.dest, getattr(torch, args.dtype))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(f"exported {folder} to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
