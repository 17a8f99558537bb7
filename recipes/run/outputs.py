"""The run's output folder: what must match to resume it (stated once, here), the config history, and the
resolved config.

Every config key is in exactly one of two sets (a test checks that a new key is classified):
- DEFINES_RUN: the model's shape and initialisation, the data and tokenizer, the seed and the row length. A
  folder holding a run with other values is refused: continuing it would be a different run.
- MAY_CHANGE: how the run is trained and watched from here on: learning rate and schedule, the attention
  backend and kernel (checkpoints are portable between them), the mask, float8 (the same parameters either way),
  logging, eval and checkpoint intervals, and steps (upward: fewer steps than the checkpoint's is refused). A
  change is recorded in <output_dir>/config_history.jsonl, one line in the log, and the W&B run's config.
What the checkpoint itself must match (the data stream's content, the global batch of rows) is checked against the
checkpoint when it loads (recipes.data.loader.PackedLoader.load_state_dict): that is about files and world size, not
config keys.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from recipes.config import Config, load_config, to_dict, to_toml
from recipes.errors import OutputWriteError, UserError, write_failed
from recipes.files import write_atomic

log = logging.getLogger(__name__)

DEFINES_RUN = frozenset(
    {
        "model.flavor",
        "model.init_from",
        "training.seq_len",
        "training.seed",
        "training.dtype",
        "data.dataset",
        "data.dataset_config",
        "data.split",
        "data.text_field",
        "data.tokenizer",
        "data.vocab_size",
        "data.eos_token",
    }
)
MAY_CHANGE = frozenset(
    {
        "model.attention",
        "model.mask",
        "model.kernel",
        "training.steps",
        "training.local_batch_size",
        "training.grad_accum_steps",
        "training.max_grad_norm",
        "training.compile",
        "training.float8",
        "training.activation_checkpoint",
        "training.deterministic",
        "training.skip_nonfinite",
        "optimizer.lr",
        "optimizer.weight_decay",
        "optimizer.beta1",
        "optimizer.beta2",
        "optimizer.eps",
        "optimizer.warmup_steps",
        "optimizer.decay",
        "optimizer.min_lr_ratio",
        "data.mask_boundary_loss",
        "parallel.replicate",
        "eval.interval",
        "eval.batches",
        "eval.sample_every",
        "eval.sample_prompt",
        "checkpoint.enable",
        "checkpoint.interval",
        "checkpoint.resume",
        "checkpoint.keep",
        "checkpoint.load_step",
        "checkpoint.export_hf",
        "job.output_dir",
        "job.name",
        "job.print_config",
        "metrics.log_every",
        "metrics.wandb",
        "metrics.wandb_project",
        "metrics.wandb_entity",
        "metrics.wandb_group",
        "metrics.wandb_tags",
        "metrics.profile",
        "metrics.tensorboard",
    }
)
SAVED_CONFIG = "config.toml"
CONFIG_HISTORY = "config_history.jsonl"
SUPERSEDED = "superseded"  # checkpoints a [checkpoint] load_step went back from


def config_keys(config: Config) -> dict[str, object]:
    """{"section.key": value} for every key of the config."""
    return {f"{section}.{key}": value for section, values in to_dict(config).items() for key, value in values.items()}


def differences(saved: Config, current: Config, keys: frozenset[str]) -> dict[str, tuple]:
    before, after = config_keys(saved), config_keys(current)
    return {key: (before[key], after[key]) for key in sorted(keys) if before[key] != after[key]}


def check_output_dir(output_dir: Path, config: Config, ignore: tuple[str, ...] = ()) -> Config | None:
    """Refuses a folder holding another run; returns the config of the run it holds (to be resumed), or None for a
    new run. `ignore` names files that do not count as contents (the run's hold, which has already refused a path
    through a file)."""
    saved_path = output_dir / SAVED_CONFIG
    if saved_path.is_file():
        saved = load_config(str(saved_path), source=str(saved_path))
        changed = differences(saved, config, DEFINES_RUN)
        if changed:
            key, (there, now) = next(iter(changed.items()))
            raise UserError(
                f"job.output_dir: {output_dir} holds a different run ({key}: {there!r} there, {now!r} "
                "now); choose a new job.output_dir"
            )
        if not config.checkpoint.resume:
            raise UserError(
                f"job.output_dir: {output_dir} already holds this run; set --checkpoint.resume true "
                "to continue it, or choose a new job.output_dir"
            )
        return saved
    if output_dir.is_dir() and any(p.name not in ignore for p in output_dir.iterdir()):
        raise UserError(
            f"job.output_dir: {output_dir} is not empty and holds no run of this recipe; choose a new or empty folder"
        )
    return None


def record_config(
    output_dir: Path, config: Config, saved: Config | None, step: int, is_main: bool, superseded: list[Path] = ()
) -> dict:
    """Writes <output_dir>/config.toml once every input has been checked (bad input writes nothing); on a resume
    with changed keys, first appends the change to config_history.jsonl and says it in the log. Checkpoints a
    [checkpoint] load_step went back from are moved to <output_dir>/superseded/<time>/ first, with the metrics
    of that history: config.toml then records the load_step as applied. Returns the changes, {key: (old, new)},
    for the W&B run's config."""
    changed = {} if saved is None else differences(saved, config, MAY_CHANGE - {"job.output_dir"})
    dist.barrier()
    failure = [None]
    if is_main:
        path = output_dir / SUPERSEDED
        try:
            if superseded:
                path = path / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                path.mkdir(parents=True)
                for folder in superseded:
                    os.replace(folder, path / folder.name)
                if (output_dir / "metrics.jsonl").is_file():
                    shutil.copy2(output_dir / "metrics.jsonl", path / "metrics.jsonl")
                log.warning(
                    "checkpoint.load_step: resuming from step %d; the later checkpoints (%s) and the "
                    "metrics as they were are kept in %s",
                    step,
                    ", ".join(f.name for f in superseded),
                    path,
                )
            path = output_dir / CONFIG_HISTORY
            if changed:
                entry = {
                    "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "step": step,
                    "changed": {key: {"from": there, "to": now} for key, (there, now) in changed.items()},
                }
                with open(path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                log.warning(
                    "resume at step %d with changed settings: %s",
                    step,
                    ", ".join(f"{key} {there!r} -> {now!r}" for key, (there, now) in changed.items()),
                )
            path = output_dir / SAVED_CONFIG
            write_atomic(path, lambda handle: handle.write(to_toml(config).encode()))
        except OSError as error:
            failure = [str(write_failed(path, error))]
    dist.broadcast_object_list(failure)  # rank 0's failure stops every rank
    if failure[0] is not None:
        raise OutputWriteError(failure[0])
    return changed
