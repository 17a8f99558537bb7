"""The one way a file is written whole: through a private temporary file beside it, renamed over it, so a reader
(another rank, a resumed run, a crash) sees the old file or the new one, never half of one. The hold
(recipes/run/hold.py: created exclusively) and checkpoints (recipes/checkpoint.py: folders) have their own rules."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls `write(handle)` on a private temporary file, then renames it to `path`; the temporary file is gone
    afterwards whatever happened. OSError (a full disk) reaches the caller with `path` unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
