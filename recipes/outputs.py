"""The run's output folder: refuse one that holds a different run, then record the resolved config."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from recipes.config import Config, ConfigError, load_config, to_dict, to_toml

# What makes a run the same run: changing any of these would continue a different loss curve.
IDENTITY = {
    "model": None,  # every key
    "data": None,
    "optimizer": None,
    "training": ("seq_len", "local_batch_size", "grad_accum_steps", "seed", "dtype", "max_grad_norm"),
}


def _identity_differences(saved: Config, current: Config) -> list[str]:
    saved_dict, current_dict = to_dict(saved), to_dict(current)
    differences = []
    for section, keys in IDENTITY.items():
        for key in keys or saved_dict[section]:
            if saved_dict[section][key] != current_dict[section][key]:
                differences.append(f"{section}.{key}: {saved_dict[section][key]!r} there, {current_dict[section][key]!r} now")
    return differences


def check_output_dir(output_dir: Path, config: Config) -> bool:
    """Refuses a folder holding another run; returns whether this run resumes what the folder holds."""
    existing = next(path for path in (output_dir, *output_dir.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"job.output_dir: {existing} is a file, not a folder; choose another job.output_dir")
    saved_path = output_dir / "config.toml"
    resuming = False
    if saved_path.is_file():
        differences = _identity_differences(load_config(str(saved_path)), config)
        if differences:
            raise ConfigError(f"job.output_dir: {output_dir} holds a different run ({differences[0]}); choose a new "
                              f"job.output_dir")
        if not config.checkpoint.resume:
            raise ConfigError(f"job.output_dir: {output_dir} already holds this run; set --checkpoint.resume true "
                              f"to continue it, or choose a new job.output_dir")
        resuming = True
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConfigError(f"job.output_dir: {output_dir} is not empty and holds no run of this recipe; choose a new "
                          f"or empty folder")
    return resuming


def record_config(output_dir: Path, config: Config, is_main: bool) -> None:
    """Writes <output_dir>/config.toml, once every input has been checked (bad input writes nothing)."""
    saved_path = output_dir / "config.toml"
    dist.barrier()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_suffix(".toml.tmp")
        tmp.write_text(to_toml(config))
        os.replace(tmp, saved_path)
    dist.barrier()
