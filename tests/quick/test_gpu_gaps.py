"""benchmarks/gpu_gaps.py on a hand-made trace: which gaps it finds, and to which thread's ops it gives them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_gaps  # noqa: E402


def event(category, name, start, duration, thread):
    return {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration, "pid": 1, "tid": thread}


def test_gaps_go_to_the_ops_each_launching_thread_ran_meanwhile():
    main, backward, gpu = 1, 2, 7
    trace = {
        "traceEvents": [
            event("user_annotation", "ProfilerStep#1", 0, 2000, main),
            event("cuda_runtime", "cudaLaunchKernel", 1, 2, main),
            event("cuda_runtime", "cudaLaunchKernel", 100, 2, backward),  # during a kernel: no gap
            event("cpu_op", "Optimizer.step", 1000, 900, main),  # gap 2: [1000, 1800)
            event("cpu_op", "aten::_fused_adamw_", 1200, 200, main),
            event("cpu_op", "FlashBackward", 1100, 300, backward),
            event("kernel", "k1", 0, 500, gpu),
            event("kernel", "k2", 510, 490, gpu),  # a 10 us gap: launch latency, not counted
            event("kernel", "k3", 1800, 200, gpu),
        ]
    }
    report = gpu_gaps.analyse(trace, min_gap_us=20)
    assert report["steps"] == 1 and report["gaps_ms_per_step"] == 0.8
    assert report["gpu_busy_ms_per_step"] == 1.19
    outer, inner = report["host_outermost_during_gaps_ms_per_step"], report["host_innermost_during_gaps_ms_per_step"]
    assert outer == {"[main] Optimizer.step": 0.8, "[thread 2] FlashBackward": 0.3}
    assert inner == {"[main] Optimizer.step": 0.6, "[main] aten::_fused_adamw_": 0.2, "[thread 2] FlashBackward": 0.3}
