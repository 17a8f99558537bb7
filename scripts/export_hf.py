"""Export a training checkpoint as a Hugging Face Qwen3 model folder that transformers loads.

    python scripts/export_hf.py RUN_DIR [--step N] [--dtype bfloat16] DEST

Writes DEST/config.json and DEST/model.safetensors (Qwen3ForCausalLM.from_pretrained(DEST) loads them), and the
tokenizer's files: the HF tokenizer folder's own tokenizer.json and tokenizer_config.json when the run used one,
else the run's default BPE as tokenizer.json with its EOS in tokenizer_config.json. The model is gathered whole in
this process (float32 by default: the training weights as they are). Exit code 2, with one line, on a DEST that
holds files, a step that has no checkpoint, or a run folder that is not one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from recipes.cli import ArgumentParser, positive_int
from recipes.errors import USER_ERROR_EXIT_CODE, UserError
from recipes.trained import export


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="job.output_dir of a train.py run")
    parser.add_argument("dest", type=Path, metavar="DEST", help="a new or empty folder for the HF model")
    parser.add_argument("--step", type=positive_int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the saved weights (default: float32, the training weights as they are)",
    )
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
