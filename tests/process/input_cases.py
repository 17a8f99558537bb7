"""Runs train.py's entry point (train.run) once per case, each in a process of its own forked from this one: torch is
imported once, and every case still has its own process, exit code, stdout, stderr and working folder. Test-only:
tests/process/test_bad_input.py feeds it the cases generated from the config's dataclasses.

    python tests/process/input_cases.py CASES.json    # [{"name", "argv", "folder"}]; prints {name: exit code} as JSON

A case runs in its folder, with its stdout and stderr in <folder>.stdout and <folder>.stderr.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: find train.py and recipes/

import train  # noqa: E402


def run_case(argv: list[str], folder: str) -> int:
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    try:  # the child: never returns into the loop
        os.chdir(folder)
        for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
            os.dup2(os.open(folder + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        train.run(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - what `python train.py` would print
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps({case["name"]: run_case(case["argv"], case["folder"]) for case in cases}))
