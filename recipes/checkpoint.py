"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, last K kept.

Layout: <output_dir>/checkpoints/step-00000100/ holds the DCP shards of model and optimizer, train_state.json
(step, LR schedule, data position, RNG) and manifest.json (a checksum of every other file). Every rank writes into a
hidden .tmp folder, hashing each file as it writes it; only when all ranks are done does rank 0 write train_state.json,
then the manifest, and rename the folder, so a folder named step-NNNNNNNN is always complete and a run killed
mid-save leaves only a .tmp folder, which is never loaded. Exactly the names step_folder makes are checkpoints,
ordered by their number; anything else under checkpoints/ (a user's backup, another tool's step-3) is never loaded
nor pruned, and named once in the log at resume.

Every load verifies the manifest first (a flipped byte is refused, naming the file and the checkpoint before it),
checks train_state.json field by field, and lets DCP read only plain files inside the folder. A checkpoint saved
before manifests existed still loads, with one warning that it is unverified.

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
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from recipes.errors import OutputWriteError, UserError, os_reason

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"


MANIFEST = "manifest.json"
_HASH = "xxh3_128"  # ~10x faster than sha256 or blake2b here (benchmarks/checkpoint_cost.py); guards against damage
_CHUNK = 8 << 20
_STEP_NAME = re.compile(r"step-(\d{8,})")


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _step_of(path: Path) -> int | None:
    """The step of a folder named exactly as step_folder names it, else None (step-3, step-00000004.bak)."""
    match = _STEP_NAME.fullmatch(path.name)
    return int(match[1]) if match and step_folder(path.parent, int(match[1])).name == path.name else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first by step: folders named as step_folder names them, holding train_state."""
    if not root.is_dir():
        return []
    folders = [path for path in root.iterdir() if _step_of(path) is not None and (path / TRAIN_STATE).is_file()]
    return sorted(folders, key=_step_of)


def foreign_names(root: Path) -> list[str]:
    """What lies under checkpoints/ that this recipe did not name: never loaded, never pruned."""
    if not root.is_dir():
        return []
    return sorted(
        path.name
        for path in root.iterdir()
        if _step_of(path) is None and not re.fullmatch(r"\.tmp-step-\d{8,}", path.name)
    )


def find(root: Path, step: int | None = None) -> Path:
    """The complete checkpoint of `step` under `root`, or the newest one; a UserError naming the fix if none."""
    folders = complete_checkpoints(root)
    if step is not None:
        folders = [folder for folder in folders if folder == step_folder(root, step)]
    if not folders:
        raise UserError(
            f"{root.parent}: no complete checkpoint{'' if step is None else f' at step {step}'}; "
            f"train it first or pick --step from {root}"
        )
    return folders[-1]


def _file_hash(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _owner(name: str, world_size: int) -> int:
    """The rank that hashes a file: the one that wrote it (DCP names rank r's shards __r_N.distcp), so on many nodes
    each reads its own shards from its page cache; rank 0 hashes the rest (.metadata)."""
    match = re.match(r"__(\d+)_", name)
    return int(match[1]) if match and int(match[1]) < world_size else 0


def _hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    """{name: hash} of the files of `names`, each hashed by the rank that owns it, gathered from every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return _gathered({name: _file_hash(folder / name) for name in names if _owner(name, world) == rank})


def _gathered(mine: dict[str, str]) -> dict[str, str]:
    """Every rank's {name: hash} merged, where a process group of several ranks runs."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in part.items()}


class _HashingFile:
    """A file being written, hashing the bytes on their way to it."""

    def __init__(self, file, digest):
        self.file, self.digest = file, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def __getattr__(self, name: str):  # tell, flush, fileno, close: the file's own
        return getattr(self.file, name)


class _HashingFileSystem(FileSystem):
    """DCP's file system, hashing each file as DCP writes it: the bytes are hashed while in memory, with no second
    read. `.hashes`: {file name: hash} of the files this rank wrote, under their final names."""

    def __init__(self):
        super().__init__()
        self.hashes: dict[str, str] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            digest = xxhash.xxh3_128()
            yield _HashingFile(stream, digest)
        self.hashes[Path(path).name] = digest.hexdigest()

    def rename(self, path, new_path) -> None:  # DCP writes .metadata.tmp, then renames it to .metadata
        super().rename(path, new_path)
        self.hashes[Path(new_path).name] = self.hashes.pop(Path(path).name)


class _HashingWriter(FileSystemWriter):
    def __init__(self, path: Path):
        super().__init__(path)
        self.fs = _HashingFileSystem()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class CheckpointWriteError(OutputWriteError):
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
            return os_reason(current)
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
        raise CheckpointWriteError(
            f"checkpoint: cannot write {tmp} ({_os_reason(error)}); {kept}; free space or "
            "fix the disk, then rerun the same command to resume"
        ) from None


def _save(root: Path, tmp: Path, step: int, model, optimizer, scheduler, loader, keep: int) -> Path:
    final = step_folder(root, step)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    writer = _HashingWriter(tmp)
    dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=writer)
    hashes = _gathered(writer.fs.hashes)
    failure = [None]
    if dist.get_rank() == 0:
        try:
            state = {
                "step": step,
                "scheduler": scheduler.state_dict(),
                "data": loader.state_dict(),
                "rng": _rng_state(),
            }
            _write_synced(tmp / TRAIN_STATE, json.dumps(state))
            hashes[TRAIN_STATE] = _file_hash(tmp / TRAIN_STATE)
            _write_synced(tmp / MANIFEST, json.dumps({"hash": _HASH, "files": hashes}, indent=0, sort_keys=True))
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


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's .metadata (dataclasses, torch.Size, dtypes, layouts, paths) and refuses any other global,
    so a crafted file cannot name a callable to run."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _GLOBALS = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
    }

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
        folder = Path(self.path).resolve()
        for info in (metadata.storage_data or {}).values():
            # DCP joins these to the folder as they are: an absolute path or ../ would read another run's tensors
            name = getattr(info, "relative_path", None)
            if (
                not isinstance(name, str)
                or Path(name).name != name
                or name in ("", ".", "..")
                or (folder / name).resolve().parent != folder
            ):
                raise ValueError(f".metadata names the storage file {name!r}, which is not a file inside {folder}")
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
    return UserError(
        f"checkpoint.resume: {folder} cannot be loaded ({reason}); if it is damaged, move it out of "
        f"{folder.parent} to resume from the one before; if it is another run's, resume with the "
        f"config that wrote it, or set checkpoint.resume=false and a new job.output_dir"
    )


def _read_train_state(folder: Path, steps: int | None = None) -> dict:
    """train_state.json, checked field by field; with `steps` (training.steps), a step beyond it is refused."""
    try:
        state = json.loads((folder / TRAIN_STATE).read_text())
        missing = {"step", "scheduler", "data", "rng"} - set(state)
    except (ValueError, TypeError) as error:  # not JSON, not UTF-8, or not an object
        raise _unloadable(folder, f"{TRAIN_STATE}: {_first_line(error)}") from None
    if missing:
        raise _unloadable(folder, f"{TRAIN_STATE} lacks {', '.join(sorted(missing))}")
    rng = state["rng"]
    checks = {  # field: whether its value is one this recipe writes
        "step": type(state["step"]) is int and state["step"] == _step_of(folder),
        "scheduler": isinstance(state["scheduler"], dict)
        and type(state["scheduler"].get("last_epoch")) is int
        and state["scheduler"]["last_epoch"] >= 0,
        "data": isinstance(state["data"], dict) and all(type(v) is not int or v >= 0 for v in state["data"].values()),
        "rng": isinstance(rng, dict)
        and all(
            isinstance(rng.get(key, []), list) and all(type(v) is int and 0 <= v < 256 for v in rng.get(key, []))
            for key in ("torch", "cuda")
        )
        and bool(rng.get("torch")),
    }
    for field, ok in checks.items():
        if not ok:
            raise _unloadable(
                folder, f"{TRAIN_STATE}: field {field!r} holds {str(state[field])[:60]!r}, not what this recipe writes"
            )
    if steps is not None and state["step"] > steps:
        raise UserError(
            f"training.steps: {steps} is below step {state['step']} of the checkpoint {folder}; set it "
            f"to at least {state['step']} to continue this run (nothing was changed)"
        )
    return state


def verify(folder: Path) -> None:
    """Checks every file against the checkpoint's manifest.json (on every rank, each hashing its own shards);
    a mismatch is a UserError naming the file and the checkpoint before it. One without a manifest (saved before
    manifests existed) loads with a warning."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        log.warning("%s has no %s (saved before checkpoints carried checksums): loaded unverified", folder, MANIFEST)
        return
    except (ValueError, TypeError) as error:
        raise _unloadable(folder, f"{MANIFEST}: {_first_line(error)}") from None
    expected = manifest.get("files") if isinstance(manifest, dict) and manifest.get("hash") == _HASH else None
    if not isinstance(expected, dict):
        raise _unloadable(folder, f"{MANIFEST}: not a {_HASH} manifest of this recipe")
    present = [name for name in sorted(expected) if (folder / name).is_file()]
    hashes = _hash_files(folder, present)
    bad = next((name for name in sorted(expected) if hashes.get(name) != expected[name]), None)
    if bad is not None:
        earlier = [path for path in complete_checkpoints(folder.parent) if _step_of(path) < _step_of(folder)]
        before = f"the previous complete checkpoint is {earlier[-1]}" if earlier else "there is no earlier checkpoint"
        raise UserError(
            f"checkpoint: {folder}/{bad} {'does not match its checksum' if bad in hashes else 'is missing'}"
            f" ({MANIFEST}): step {_step_of(folder)} is damaged; move {folder} out of {folder.parent} "
            f"(the next resume then loads the one before); {before}"
        )


def resume_point(root: Path, load_step: int, applied: bool) -> tuple[Path | None, int, list[Path]]:
    """The checkpoint a resume loads, its step (None and 0: start afresh) and the later ones it leaves behind: the
    newest and none; or with [checkpoint] load_step, unless that was applied already, that step's and every one
    after it. A UserError, before anything is touched, if that step has no complete checkpoint."""
    foreign = foreign_names(root)
    if foreign:
        log.warning("%s also holds %s, not named by this recipe: never loaded nor pruned", root, ", ".join(foreign))
    folders = complete_checkpoints(root)
    if not load_step or applied:
        return (folders[-1], _step_of(folders[-1]), []) if folders else (None, 0, [])
    chosen = [folder for folder in folders if _step_of(folder) == load_step]
    if not chosen:
        there = ", ".join(str(_step_of(folder)) for folder in folders) or "none yet"
        raise UserError(
            f"checkpoint.load_step: {root} has no complete checkpoint of step {load_step} (steps there: "
            f"{there}); pick one of them, or 0 for the newest"
        )
    return chosen[0], load_step, [folder for folder in folders if _step_of(folder) > load_step]


def load(folder: Path, model, optimizer, scheduler, loader, steps: int) -> int:
    """Loads the checkpoint `folder` into the live objects; returns its step. Refuses one beyond `steps`
    (training.steps) before touching anything."""
    state = _read_train_state(folder, steps)
    verify(folder)
    model_state, optim_state = get_state_dict(model, optimizer)
    _load_dcp({"model": model_state, "optimizer": optim_state}, folder)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", folder, state["step"])
    return state["step"]


def check_readable(folder: Path, steps: int | None = None) -> None:
    """A UserError now if the checkpoint's train state or DCP index cannot be read, a file does not match its
    checksum, or (given training.steps) its step is beyond them (before any long work)."""
    _read_train_state(folder, steps)
    verify(folder)
    try:
        _DataOnlyReader(folder).read_metadata()
    except Exception as error:
        raise _unloadable(folder, f".metadata: {_first_line(error)}") from None


def load_model_weights(folder: Path, model) -> None:
    """Only the model part of a training checkpoint (e.g. to evaluate it with another attention backend)."""
    verify(folder)
    model_state = get_model_state_dict(model)
    with warnings.catch_warnings():  # one process without a process group is what this is for; no warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load_dcp({"model": model_state}, folder)
    set_model_state_dict(model, model_state)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
