"""The one user-error type and the exit codes, shared by train.py, the scripts and the tests.

A `UserError` is a problem the user can fix (a config value, an input file, a folder): its message is one line
naming the field or file and the fix, and the program exits with USER_ERROR_EXIT_CODE without a traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2  # a bad config value or input; nothing was written that blocks the corrected command
NONFINITE_EXIT_CODE = 3  # a step's loss or grad norm was not finite; the last good checkpoint is kept
IO_ERROR_EXIT_CODE = 74  # EX_IOERR: a checkpoint could not be written (disk full, read-only); the previous is intact
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a signal asked to stop, a checkpoint was saved; run again to continue


class UserError(ValueError):
    """A user-fixable problem with the configuration or the run's inputs (exit code 2)."""


ConfigError = UserError  # its name before recipes/errors.py, kept for code outside this repository that imports it
