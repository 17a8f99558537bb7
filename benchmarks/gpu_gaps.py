"""Where the GPU waits: reads a torch.profiler Chrome trace (train.py writes one with [metrics] profile = true, in
<output_dir>/profile/trace.json) and reports the time per step no kernel or copy ran, the gaps by size, and what the
threads that launch the work (the main one, and autograd's backward thread) were doing while the GPU waited: the CPU
ops running through each piece of the gaps, outermost and innermost, per thread (so rows may add up past the gaps).

    python benchmarks/gpu_gaps.py outputs/run/profile/trace.json [--min-gap-us 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation", "cuda_runtime", "python_function"}


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def analyse(trace: dict, min_gap_us: float) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = union([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES])
    steps = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")
    )
    # The threads that launch work: the main one (it carries the ProfilerStep marks) and autograd's backward thread.
    launchers = {(e["pid"], e["tid"]) for e in events if e.get("cat") == "cuda_runtime"}
    marked = {(e["pid"], e["tid"]) for e in events if e["name"].startswith("ProfilerStep#")}
    tag = {thread: "main" if thread in marked else f"thread {thread[1]}" for thread in launchers}
    host = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"], tag[(e["pid"], e["tid"])])
        for e in events
        if e.get("cat") in HOST_CATEGORIES
        and (e["pid"], e["tid"]) in launchers
        and not e["name"].startswith("ProfilerStep#")
    )
    host_starts = [h[0] for h in host]
    longest_host = max((h[1] - h[0] for h in host), default=0.0)

    gaps = [(a[1], b[0]) for a, b in zip(gpu, gpu[1:]) if b[0] - a[1] >= min_gap_us]
    outer: collections.Counter = collections.Counter()
    inner: collections.Counter = collections.Counter()
    for gap in gaps:
        lo = bisect.bisect_left(host_starts, gap[0] - longest_host)
        hi = bisect.bisect_right(host_starts, gap[1])
        active = [h for h in host[lo:hi] if overlap(gap, h[:2]) > 0]
        cuts = sorted({gap[0], gap[1], *(t for h in active for t in h[:2] if gap[0] < t < gap[1])})
        for piece in zip(cuts, cuts[1:]):  # each piece of the gap goes to the ops running all through it, per thread
            length = piece[1] - piece[0]
            running = [h for h in active if h[0] <= piece[0] and h[1] >= piece[1]]
            for thread in {h[3] for h in running}:
                mine = [h for h in running if h[3] == thread]
                outer[f"[{thread}] {min(mine, key=lambda h: (h[0], -h[1]))[2]}"] += length
                inner[f"[{thread}] {max(mine, key=lambda h: (h[0], -h[1]))[2]}"] += length
            if not running:
                outer["(no launching thread in an op)"] += length
    sizes = collections.Counter()
    for start, end in gaps:
        us = end - start
        sizes["<0.1 ms" if us < 100 else "0.1-1 ms" if us < 1000 else "1-10 ms" if us < 10_000 else ">=10 ms"] += us
    span = (gpu[0][0], gpu[-1][1]) if gpu else (0.0, 0.0)
    busy = sum(e - s for s, e in gpu)
    n_steps = max(len(steps), 1)
    return {
        "steps": len(steps),
        "step_ms": [round((e - s) / 1000, 2) for s, e, _ in steps],
        "gpu_span_ms_per_step": round((span[1] - span[0]) / 1000 / n_steps, 2),
        "gpu_busy_ms_per_step": round(busy / 1000 / n_steps, 2),
        "gaps_ms_per_step": round(sum(e - s for s, e in gaps) / 1000 / n_steps, 2),
        "gaps_ms_per_step_by_size": {k: round(v / 1000 / n_steps, 2) for k, v in sizes.items()},
        "largest_gaps_ms": sorted((round((e - s) / 1000, 2) for s, e in gaps), reverse=True)[:12],
        "host_outermost_during_gaps_ms_per_step": {k: round(v / 1000 / n_steps, 2) for k, v in outer.most_common(15)},
        "host_innermost_during_gaps_ms_per_step": {k: round(v / 1000 / n_steps, 2) for k, v in inner.most_common(20)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="a torch.profiler Chrome trace (trace.json)")
    parser.add_argument("--min-gap-us", type=float, default=20.0, help="shorter gaps are launch latency (default 20)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if not args.trace.is_file():
        parser.exit(2, f"gpu_gaps.py: {args.trace} is not a file; give the trace.json a profiled run wrote\n")
    report = analyse(json.loads(args.trace.read_text()), args.min_gap_us)
    if report["gpu_busy_ms_per_step"] == 0:
        parser.exit(2, f"gpu_gaps.py: {args.trace} has no GPU kernels; profile a run on a GPU\n")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
