"""Held-out loss of each training checkpoint evaluated under every attention backend: a backends × backends table.

    python scripts/eval_matrix.py outputs/qwen3_{sdpa,flex,varlen} [--step 300] [--mutation]

Row = the backend a checkpoint was trained with, column = the backend that evaluates it. With the fork every row
agrees across its columns (same weights, same function). --mutation adds, per checkpoint, the column "varlen
(0.2.1 layout)": the same weights evaluated through torchtitan 0.2.1's layout mistake (recipes.qwen3.mutation,
reachable only from here and the tests), where the loss collapses to noise. Exit code 1 when a row's backends
disagree beyond --tolerance, 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from recipes import data
from recipes.cli import ArgumentParser, nonnegative_float, positive_int
from recipes.config import Config
from recipes.errors import USER_ERROR_EXIT_CODE, UserError
from recipes.evaluation import validation_loss
from recipes.qwen3.attention import BACKENDS
from recipes.qwen3.mutation import inject_varlen_layout_mistake
from recipes.run.runs import open_run
from recipes.trained import load_model, load_tokenizer

MUTATION = "varlen (0.2.1 layout)"
# Default agreement tolerance on the loss spread within a row: in fp32 the backends differ by rounding (~1e-6 on the
# debug model); in bf16 by the kernels' bf16 error, which measured up to ~5e-3 on 2×H100 (docs/results.md).
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-2}


def evaluate_run(run_dir: Path, config: Config, folder: Path, args, device: torch.device) -> dict:
    tokenizer = load_tokenizer(config)
    loader = data.build_dataloader(
        config.data,
        tokenizer,
        config.training.seq_len,
        args.batch_size,
        0,
        1,
        config.training.seed,
        data.default_cache_dir(),
        heldout=True,
    )
    batches = [next(loader) for _ in range(args.batches)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # varlen's CUDA kernel needs 16-bit inputs
    columns = list(BACKENDS) + ([MUTATION] if args.mutation else [])
    losses = {}
    for column in columns:
        model = load_model(config, folder, tokenizer, attention="varlen" if column == MUTATION else column)
        if column == MUTATION:
            inject_varlen_layout_mistake(model)
        model.to(device=device, dtype=dtype).eval()
        losses[column] = validation_loss(model, batches, device)
    return {"run": str(run_dir), "trained_with": config.model.attention, "checkpoint": folder.name, "losses": losses}


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0]["losses"])
    lines = [
        "| trained with ↓ / evaluated with → | " + " | ".join(columns) + " | max spread (fork) |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for row in rows:
        fork = [row["losses"][b] for b in BACKENDS]
        lines.append(
            f"| {row['trained_with']} ({row['checkpoint']}) | "
            + " | ".join(f"{row['losses'][c]:.5f}" for c in columns)
            + f" | {max(fork) - min(fork):.2e} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="job.output_dir of a train.py run (config.toml and checkpoints/); one row each",
    )
    parser.add_argument("--step", type=positive_int, help="checkpoint step (default: each run's newest)")
    parser.add_argument("--batches", type=positive_int, default=4, help="held-out batches evaluated per cell")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="rows per held-out batch")
    parser.add_argument("--mutation", action="store_true", help="add the 0.2.1 layout mistake as a column")
    parser.add_argument(
        "--tolerance",
        type=nonnegative_float,
        default=None,
        help=f"max loss spread within a row (default {TOLERANCE['cpu']:g} on CPU/fp32, "
        f"{TOLERANCE['cuda']:g} on CUDA/bf16)",
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[device.type]
    try:
        inputs = [(run, *open_run(run, args.step)) for run in args.runs]  # all checked before any evaluation
        rows = [evaluate_run(run, config, folder, args, device) for run, config, folder in inputs]
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(markdown(rows))
    spreads = [max(r["losses"][b] for b in BACKENDS) - min(r["losses"][b] for b in BACKENDS) for r in rows]
    agree = max(spreads) <= tolerance
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "tolerance": tolerance,
                    "max_spread": max(spreads),
                    "agree": agree,
                    "rows": rows,
                },
                indent=1,
            )
        )
    print(
        f"verdict: {'backends agree' if agree else 'backends DISAGREE'} (max spread {max(spreads):.2e}, "
        f"tolerance {tolerance:.0e})"
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
