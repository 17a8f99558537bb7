"""Does a finished torchrun run exit 0 on every rank, every time? N rounds of: a 2-rank torchrun run whose rank 1 is
killed (SIGKILL) after step 6, then the same command again, which resumes and finishes. Writes one JSON row per
rerun: torchrun's exit status, whether "done" was logged and whether any rank aborted at exit. tests/quick checks
the committed result (docs/results/cpu/clean_exits.json).

    python tests/process/clean_exits.py --rounds 20 --json docs/results/cpu/clean_exits.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: find recipes/

import torch  # noqa: E402
from train_process import debug_run, launch, train_env, worker_pids  # noqa: E402

# W&B on (offline), as in the debug config: rank 0 then exits last.
RUN = debug_run(steps=12, warmup_steps=2, wandb=None, checkpoint_interval=4)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def one_round(env: dict, root: Path) -> dict:
    out = root / "run"
    killed = launch(env, root / "killed.log", [*RUN, "--job.output_dir", str(out)], nproc=2)
    while logged_steps(out) < 6 and killed.poll() is None:
        time.sleep(0.05)
    os.kill(worker_pids(killed)[1], signal.SIGKILL)
    killed.wait(timeout=600)
    rerun = launch(env, root / "rerun.log", [*RUN, "--job.output_dir", str(out)], nproc=2)
    rerun.wait(timeout=600)
    console = (root / "rerun.log").read_text()
    return {
        "killed_exit": killed.returncode,
        "rerun_exit": rerun.returncode,
        "done": "] done: " in console,
        "aborted": "terminate called" in console or "SIGABRT" in console or "exitcode: -6" in console,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clean-exits-") as tmp:
        env = train_env(Path(tmp) / "cache", Path(tmp) / "wandb")
        rows = []
        for index in range(args.rounds):
            root = Path(tmp) / f"round{index}"
            root.mkdir()
            rows.append(one_round(env, root))
            print(index, rows[-1], flush=True)
    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "rounds": rows,
        "clean": sum(row["rerun_exit"] == 0 and row["done"] and not row["aborted"] for row in rows),
    }
    print(json.dumps({key: value for key, value in result.items() if key != "rounds"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
