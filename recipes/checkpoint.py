"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, last K kept.

Layout: <output_dir>/checkpoints/step-00000100/ holds the DCP shards of model and optimizer, and
train_state.json (step, LR schedule, data position, RNG). Every rank writes into a hidden .tmp folder; only
when all ranks are done does rank 0 write train_state.json and rename the folder, so a folder named step-*
is always complete and a run killed mid-save leaves only a .tmp folder, which is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from recipes.config import ConfigError

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once it is named step-* and holds train_state)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / TRAIN_STATE).is_file())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save(root: Path, step: int, model, optimizer, scheduler, loader, keep: int) -> Path:
    final = step_folder(root, step)
    tmp = root / f".tmp-step-{step:08d}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        state = {"step": step, "scheduler": scheduler.state_dict(), "data": loader.state_dict(), "rng": _rng_state()}
        with open(tmp / TRAIN_STATE, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a checkpoint of the same step from an interrupted earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_latest(root: Path, model, optimizer, scheduler, loader) -> int:
    """Loads the newest complete checkpoint into the live objects; returns its step (0 when there is none)."""
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return 0
    folder = checkpoints[-1]
    state = json.loads((folder / TRAIN_STATE).read_text())
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    except Exception as error:  # DCP reports a shape or key mismatch as a generic CheckpointException
        raise ConfigError(f"checkpoint.resume: {folder} does not fit this model/optimizer ({_first_line(error)}); "
                          f"resume with the config that wrote it, or set checkpoint.resume=false and a new "
                          f"job.output_dir") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", folder, state["step"])
    return state["step"]


def load_model_weights(folder: Path, model) -> None:
    """Only the model part of a training checkpoint (e.g. to evaluate it with another attention backend)."""
    model_state = get_model_state_dict(model)
    dcp.load({"model": model_state}, checkpoint_id=str(folder))
    set_model_state_dict(model, model_state)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
