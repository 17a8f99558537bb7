"""What checkpoint checksums cost: recipes.checkpoint.save against the bare DCP save it wraps, and verify()
against the DCP load, for a flavor's model and AdamW state, in one process (gloo, world size 1).

    python benchmarks/checkpoint_cost.py --flavor 0.6B --dir /tmp/ckpt-cost [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from recipes import checkpoint
from recipes.qwen3.model import Qwen3Model, flavor_config


class _Position:  # the loader and scheduler parts of a checkpoint are a few bytes: stand-ins suffice
    def state_dict(self):
        return {"last_epoch": 1}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine the disk and other processes blur the first;
    the second is the work the save itself does, hashing included."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="0.6B", help="model flavor (recipes/qwen3/model.py)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2, help="timed saves of each kind")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-cost-"))
    model = Qwen3Model(flavor_config(args.flavor))
    optimizer = torch.optim.AdamW(model.parameters())
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # fills exp_avg and exp_avg_sq: the checkpoint holds what a real one holds
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def bare(i: int) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(root / f"bare-{i}"))

    def recipe(i: int) -> None:  # keeps every checkpoint: pruning is no part of the comparison
        checkpoint.save(root / "checkpoints", i + 1, model, optimizer, scheduler, _Position(), keep=args.repeats)

    rows = {"flavor": args.flavor, "machine": f"{platform.node()}, {os.cpu_count()} CPUs"}
    rows.update({key: [] for key in ("bare_save_s", "save_s", "bare_save_cpu_s", "save_cpu_s", "verify_s", "load_s")})
    for i in range(args.repeats):
        for kind in ("bare", "recipe") if i % 2 == 0 else ("recipe", "bare"):  # alternated: no order advantage
            wall, cpu = timed(lambda i=i, kind=kind: bare(i) if kind == "bare" else recipe(i))
            prefix = "bare_save" if kind == "bare" else "save"
            rows[f"{prefix}_s"].append(wall)
            rows[f"{prefix}_cpu_s"].append(cpu)
        shutil.rmtree(root / f"bare-{i}")
    folder = checkpoint.complete_checkpoints(root / "checkpoints")[-1]
    rows["bytes"] = sum(path.stat().st_size for path in folder.iterdir())
    rows["verify_s"].append(timed(lambda: checkpoint.verify(folder))[0])
    rows["load_s"].append(timed(lambda: checkpoint.load_model_weights(folder, model))[0])  # includes its verify
    best = {key: min(value) for key, value in rows.items() if key.endswith("_s")}
    rows["save_overhead"] = best["save_s"] / best["bare_save_s"] - 1
    rows["save_cpu_overhead"] = best["save_cpu_s"] / best["bare_save_cpu_s"] - 1
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.dir is None:
        shutil.rmtree(root)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
