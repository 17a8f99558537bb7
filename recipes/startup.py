"""What a start reads before it writes anything: the inputs (tokenizer, data, the model's shape), each long phase
announced and timed; and `train.py --dry-run`, which runs every such check and says what the run would do.

A dry run writes nothing into the output folder (it takes no hold and makes no folder); like a real start it may
fill the tokenizer and corpus cache ($RECIPES_CACHE), which is not the run's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from recipes import checkpoint, data, parallel
from recipes.build import check_fits, model_shape
from recipes.config import Config, to_toml
from recipes.metrics import corpus_line, human_count, timed
from recipes.run import outputs
from recipes.run.hold import HOLD_FILE, is_hold_file

log = logging.getLogger(__name__)


def inputs(config: Config, dist_: parallel.Distributed):
    """(tokenizer, training loader, held-out batches, model shape), every one checked against the others. Rank 0
    fills the cache first, the others then read it."""
    t = config.training
    cache_dir = data.default_cache_dir()
    with parallel.main_rank_first():
        with timed("tokenizer: loading (trained and cached on first use)"):
            tokenizer = data.build_tokenizer(config.data, cache_dir)
        with timed("data: loading (tokenized and cached on first use)"):
            loader = data.build_dataloader(
                config.data, tokenizer, t.seq_len, t.local_batch_size, dist_.rank, dist_.world_size, t.seed, cache_dir
            )
            heldout = data.heldout_batches(config, tokenizer, dist_.rank, dist_.world_size, cache_dir)
    log.info(corpus_line(loader, t.steps))
    shape = model_shape(config, tokenizer.eos_id)
    check_fits(shape, t.seq_len, tokenizer)
    return tokenizer, loader, heldout, shape


def model_line(config: Config, model, shape, tokenizer, dist_: parallel.Distributed) -> str:
    """What a start trains, in one line: the model, its backend, the data and where it runs."""
    return (
        f"model: {config.run_name}, {model.num_params() / 1e6:.1f}M parameters, attention={shape.attention} "
        f"mask={shape.mask}; data: {config.data.dataset}; tokenizer: {tokenizer.name}; world size "
        f"{dist_.world_size} on {dist_.device.type}"
    )


def resume_point(output_dir: Path, config: Config, saved: Config | None):
    """checkpoint.resume_point for this run: a load_step counts as applied once the folder's config.toml has it."""
    applied = saved is not None and saved.checkpoint.load_step == config.checkpoint.load_step
    return checkpoint.resume_point(output_dir / "checkpoints", config.checkpoint.load_step, applied)


def dry_run(config: Config, dist_: parallel.Distributed, output_dir: Path) -> int:
    """Every check of a start, then what the run would do; 0 when all pass (a UserError, exit 2, otherwise)."""
    from recipes.qwen3.model import Qwen3Model

    held = output_dir.is_dir() and (output_dir / HOLD_FILE).exists()
    ignore = tuple(path.name for path in output_dir.iterdir() if is_hold_file(path.name)) if held else ()
    saved = outputs.check_output_dir(output_dir, config, ignore=ignore)
    folder, step, superseded = resume_point(output_dir, config, saved)
    if folder is not None:
        checkpoint.check_readable(folder, config.training.steps)
    tokenizer, _, _, shape = inputs(config, dist_)
    parallel.device_mesh(config.parallel.replicate, dist_.device)  # replicas that do not divide the world: refused
    with torch.device("meta"):  # the shape's parameter count, without memory
        parameters = Qwen3Model(shape).num_params()
    if folder is None:
        plan = f"a new run into {output_dir}" if saved is None else f"start {output_dir} again from step 0"
    elif superseded:
        plan = (
            f"go back to {folder.name} and train steps {step + 1}-{config.training.steps}; the later "
            f"checkpoints ({', '.join(f.name for f in superseded)}) would move to {output_dir}/superseded/"
        )
    elif step == config.training.steps:
        plan = f"nothing: {output_dir} is finished ({folder.name})"
    else:
        plan = f"resume from {folder.name} and train steps {step + 1}-{config.training.steps}"
    if saved is not None:
        changed = outputs.differences(saved, config, outputs.MAY_CHANGE - {"job.output_dir"})
        plan += "".join(f"\n  would change {key}: {there!r} -> {now!r}" for key, (there, now) in changed.items())
    t = config.training
    log.info("resolved config:\n%s", to_toml(config))
    log.info(
        "dry run: every check passed (config, output folder, checkpoint, tokenizer, data, model shape, mesh); "
        "nothing was written to %s\n  would do: %s\n  model: %s, %s parameters, attention=%s mask=%s; "
        "tokenizer %s\n  global batch: %d rows x %d tokens (world size %d on %s)%s",
        output_dir,
        plan,
        config.run_name,
        human_count(parameters),
        shape.attention,
        shape.mask,
        tokenizer.name,
        t.local_batch_size * dist_.world_size,
        t.seq_len,
        dist_.world_size,
        dist_.device.type,
        f"\n  note: {output_dir / HOLD_FILE} is there: a run may hold the folder now" if held else "",
    )
    return 0
