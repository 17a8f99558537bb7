"""The error types a run can stop with, each carrying its exit code; shared by train.py, the scripts and the tests.

A `UserError` is a problem the user can fix (a config value, an input file, a folder): its message is one line
naming the field or file and the fix, and the program exits with USER_ERROR_EXIT_CODE without a traceback.
train.py catches `RecipeError` once, prints its one line and exits with its code. Preemption (75) is no error: the
run saved a checkpoint and returns the code. docs/troubleshooting.md has the table of exit codes.
"""

from __future__ import annotations

import errno
import os

USER_ERROR_EXIT_CODE = 2  # a bad config value or input; nothing was written that blocks the corrected command
NONFINITE_EXIT_CODE = 3  # a step's loss or grad norm was not finite; the last good checkpoint is kept
IO_ERROR_EXIT_CODE = 74  # EX_IOERR: an output could not be written (full or failing disk); what was written is intact
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a signal asked to stop, a checkpoint was saved; run again to continue


class RecipeError(Exception):
    """An error that ends a run with one line and `exit_code`, without a traceback."""

    exit_code = 1


class UserError(RecipeError, ValueError):
    """A user-fixable problem with the configuration or the run's inputs (exit code 2)."""

    exit_code = USER_ERROR_EXIT_CODE


class NonFiniteError(RecipeError, RuntimeError):
    """A step's loss or grad norm was not finite (exit code 3); the last good checkpoint is kept."""

    exit_code = NONFINITE_EXIT_CODE


class OutputWriteError(RecipeError, RuntimeError):
    """An output (a checkpoint, the hold, config.toml, config_history.jsonl, metrics.jsonl) could not be written: a
    full or failing disk (exit code 74). What was written before is intact; freeing space and rerunning continues."""

    exit_code = IO_ERROR_EXIT_CODE


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line (for one-line reports), or its type's name where it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def os_reason(error: OSError) -> str:
    """'ENOSPC: No space left on device' for an OSError that carries an errno, else its first line."""
    if error.errno in errno.errorcode:
        return f"{errno.errorcode[error.errno]}: {os.strerror(error.errno)}"
    return first_line(error)


def write_failed(path, error: OSError) -> OutputWriteError:
    return OutputWriteError(
        f"{path}: cannot write ({os_reason(error)}); free space or fix the disk, then rerun the "
        "same command (it resumes from the newest checkpoint)"
    )
