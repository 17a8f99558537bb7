"""Sample text from a training checkpoint: a quick look at what a run has learnt, on any attention backend.

    python scripts/generate.py RUN_DIR [--step N] --prompt "def main(" [--prompt ...] [--tokens 64]
        [--temperature 0.8 --top-k 50 --samples 3 --seed 0] [--attention varlen]

Greedy by default (temperature 0: the same text every time); with --temperature > 0 each of --samples
continuations is sampled. Runs in this process on the GPU if there is one, else the CPU. Exit code 2, with one
line, on a run folder that is not one or a step that has no checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from recipes.cli import ArgumentParser, nonnegative_float, nonnegative_int, positive_int
from recipes.errors import USER_ERROR_EXIT_CODE, UserError
from recipes.qwen3.attention import BACKENDS
from recipes.run.runs import open_run
from recipes.trained import generate, load_model, load_tokenizer


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="job.output_dir of a train.py run")
    parser.add_argument(
        "--prompt", action="append", required=True, help="text to continue; repeat --prompt for several"
    )
    parser.add_argument("--step", type=positive_int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--tokens",
        type=positive_int,
        default=64,
        help="new tokens per continuation at most (it stops earlier at EOS; default 64)",
    )
    parser.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=0.0,
        help="0: greedy (default); above 0: sampled, flatter as it grows",
    )
    parser.add_argument(
        "--top-k", type=nonnegative_int, default=0, help="sample only among the k likeliest tokens (0: all; default)"
    )
    parser.add_argument("--samples", type=positive_int, default=1, help="continuations per prompt when sampling")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the sampling")
    parser.add_argument("--attention", choices=BACKENDS, help="attention backend (default: the run's)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config, folder = open_run(args.run_dir, args.step)
        tokenizer = load_tokenizer(config)
        model = load_model(config, folder, tokenizer, args.attention)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # varlen's CUDA kernel needs 16-bit inputs
    model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    samples = args.samples if args.temperature > 0 else 1
    print(
        f"# {folder} ({model.config.attention} attention on {device.type}, "
        f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature:g}, top-k {args.top_k}'})"
    )
    for prompt in args.prompt:
        for _ in range(samples):
            text = generate(model, tokenizer, prompt, args.tokens, args.temperature, args.top_k, generator)
            print(f"--- {prompt!r}\n{prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
