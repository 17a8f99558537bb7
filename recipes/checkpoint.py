"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, last K kept.

Layout: <output_dir>/checkpoints/step-00000100/ holds the DCP shards of model and optimizer, and
train_state.json (step, LR schedule, data position, RNG). Every rank writes into a hidden .tmp folder; only
when all ranks are done does rank 0 write train_state.json and rename the folder, so a folder named step-*
is always complete and a run killed mid-save leaves only a .tmp folder, which is never loaded.

Loading executes no code from the checkpoint: DCP's own reader unpickles .metadata with plain pickle and its
planner unpickles non-tensor values (the optimizer's hyperparameters) with weights_only=False, so both are
replaced here by readers that accept only data.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from recipes.errors import UserError

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once it is named step-* and holds train_state)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / TRAIN_STATE).is_file())


def find(root: Path, step: int | None = None) -> Path:
    """The complete checkpoint of `step` under `root`, or the newest one; a UserError naming the fix if none."""
    folders = complete_checkpoints(root)
    if step is not None:
        folders = [folder for folder in folders if folder == step_folder(root, step)]
    if not folders:
        raise UserError(f"{root.parent}: no complete checkpoint{'' if step is None else f' at step {step}'}; "
                        f"train it first or pick --step from {root}")
    return folders[-1]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written: the one-line message names the folder, the OS's reason and the newest
    complete checkpoint, which is intact (train.py exits with IO_ERROR_EXIT_CODE)."""


def _os_reason(error: BaseException) -> str:
    """The OS's reason behind a failed write, through DCP's per-rank wrapping and exception chains."""
    pending = [error]
    while pending:
        current = pending.pop(0)
        if isinstance(current, CheckpointException):
            pending += [failure[0] for failure in current.failures.values()]
        if isinstance(current, OSError) and current.errno:
            return f"{errno.errorcode.get(current.errno, current.errno)}: {os.strerror(current.errno)}"
        if "unexpected pos" in str(current):  # torch's file writer reports a full disk only this way
            return f"ENOSPC: {os.strerror(errno.ENOSPC)} (the writer reported 'unexpected pos')"
        pending += [cause for cause in (current.__cause__, current.__context__) if cause is not None]
    return _first_line(error)


def save(root: Path, step: int, model, optimizer, scheduler, loader, keep: int) -> Path:
    tmp = root / f".tmp-step-{step:08d}"
    try:
        return _save(root, tmp, step, model, optimizer, scheduler, loader, keep)
    except (OSError, CheckpointException) as error:
        previous = complete_checkpoints(root)
        kept = f"the newest complete checkpoint {previous[-1].name} is intact" if previous else "no checkpoint yet"
        raise CheckpointWriteError(f"checkpoint: cannot write {tmp} ({_os_reason(error)}); {kept}; free space or "
                                   "fix the disk, then rerun the same command to resume") from None


def _save(root: Path, tmp: Path, step: int, model, optimizer, scheduler, loader, keep: int) -> Path:
    final = step_folder(root, step)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()
    failure = [None]
    if dist.get_rank() == 0:
        try:
            state = {"step": step, "scheduler": scheduler.state_dict(), "data": loader.state_dict(),
                     "rng": _rng_state()}
            with open(tmp / TRAIN_STATE, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # a checkpoint of the same step from an interrupted earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
        except OSError as error:
            failure = [error]
    dist.broadcast_object_list(failure)  # rank 0's own writes failing must stop every rank, not leave them waiting
    if failure[0] is not None:
        raise failure[0]
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's .metadata (dataclasses, torch.Size, dtypes, layouts, paths) and refuses any other global,
    so a crafted file cannot name a callable to run."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath")}

    def find_class(self, module: str, name: str):
        # Checked before super() imports anything: importing a module can run its code.
        if module in self._MODULES:
            found = super().find_class(module, name)
            allowed = isinstance(found, type) and found.__module__ == module
        elif (module, name) in self._GLOBALS:
            found, allowed = super().find_class(module, name), True
        else:
            found = getattr(torch, name, None) if module == "torch" else None
            allowed = isinstance(found, torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")
        return found


class _DataOnlyReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _DataOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # Unpickled with weights_only=True, then handed on re-serialized: the default planner's own
        # weights_only=False load then sees only the plain values this produced.
        try:
            plain = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:  # torch's own message suggests weights_only=False, the very hole
            raise pickle.UnpicklingError(f"{read_item.dest_index.fqn} holds pickled objects, not plain data") from None
        checked = io.BytesIO()
        torch.save(plain, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def _load_dcp(state: dict, folder: Path) -> None:
    """Loads `state` in place from the DCP checkpoint `folder`; a damaged or foreign one is a UserError."""
    reader = _DataOnlyReader(folder)
    try:
        reader.read_metadata()  # dcp.load swallows why metadata is unreadable and reports only "metadata is None"
    except Exception as error:  # .metadata missing, truncated or not DCP's
        raise _unloadable(folder, f".metadata: {_first_line(error)}") from None
    try:
        dcp.load(state, storage_reader=reader, planner=_DataOnlyPlanner())
    except CheckpointException as error:  # a BaseException: what each rank raised is in .failures
        raise _unloadable(folder, _first_line(next(iter(error.failures.values()))[0])) from None
    except Exception as error:
        raise _unloadable(folder, _first_line(error)) from None


def _unloadable(folder: Path, reason: str) -> UserError:
    return UserError(f"checkpoint.resume: {folder} cannot be loaded ({reason}); if it is damaged, move it out of "
                     f"{folder.parent} to resume from the one before; if it is another run's, resume with the "
                     f"config that wrote it, or set checkpoint.resume=false and a new job.output_dir")


def _read_train_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / TRAIN_STATE).read_text())
        missing = {"step", "scheduler", "data", "rng"} - set(state)
    except (ValueError, TypeError) as error:  # not JSON, not UTF-8, or not an object
        raise _unloadable(folder, f"{TRAIN_STATE}: {_first_line(error)}") from None
    if missing:
        raise _unloadable(folder, f"{TRAIN_STATE} lacks {', '.join(sorted(missing))}")
    return state


def load_latest(root: Path, model, optimizer, scheduler, loader, steps: int) -> int:
    """Loads the newest complete checkpoint into the live objects; returns its step (0 when there is none).
    Refuses one beyond `steps` (training.steps) before touching anything."""
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return 0
    folder = checkpoints[-1]
    state = _read_train_state(folder)
    if state["step"] > steps:
        raise UserError(f"training.steps: {steps} is below step {state['step']} of the checkpoint {folder}; set it "
                        f"to at least {state['step']} to continue this run (nothing was changed)")
    model_state, optim_state = get_state_dict(model, optimizer)
    _load_dcp({"model": model_state, "optimizer": optim_state}, folder)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", folder, state["step"])
    return state["step"]


def check_readable(folder: Path) -> None:
    """A UserError now if the checkpoint's train state or DCP index cannot be read (before any long work)."""
    _read_train_state(folder)
    try:
        _DataOnlyReader(folder).read_metadata()
    except Exception as error:
        raise _unloadable(folder, f".metadata: {_first_line(error)}") from None


def load_model_weights(folder: Path, model) -> None:
    """Only the model part of a training checkpoint (e.g. to evaluate it with another attention backend)."""
    model_state = get_model_state_dict(model)
    with warnings.catch_warnings():  # one process without a process group is what this is for; no warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load_dcp({"model": model_state}, folder)
    set_model_state_dict(model, model_state)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
