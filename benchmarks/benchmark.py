"""Throughput, MFU and memory of the recipe per attention backend, beside torchtitan 0.2.2's own Trainer.

Each case is a real `torchrun train.py` run (FSDP over the node's GPUs, packed documents from the offline default
corpus) read back from its metrics.jsonl; the torchtitan baseline runs `torchrun -m torchtitan.train` on the same
model shape, documents, tokenizer and batch. Run on the GPU machine:

    python benchmarks/benchmark.py --tokenizer /path/to/qwen3-tokenizer --out results/   # table on stdout
    python benchmarks/benchmark.py --cases varlen-document-8192-compile-fa4 varlen-document-8192-compile-fa4-b8 \
        --torchtitan none --nproc 1

A case is BACKEND-MASK-SEQ-MODE[-OPTION...]: MODE is compile or eager; options are a varlen kernel (torch, fa4),
bN (local batch N; default 16k tokens per GPU per step), ac=none|full|selective, f=FLAVOR (default --flavor),
fp8 (training.float8 = true; torchao; torchtitan's Trainer is run without it), and Inductor's tuning for the
compiled code, set by its environment: autotune (max-autotune for the GEMMs: Triton templates against cuBLAS) and
cdt (coordinate-descent tuning of the generated kernels' launch configurations).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# backend-mask-seq_len-(compile|eager); local batch keeps 16k tokens per GPU per step.
DEFAULT_CASES = [
    "varlen-document-4096-compile",
    "flex-document-4096-compile",
    "sdpa-causal-4096-compile",
    "sdpa-document-4096-compile",
    "varlen-document-8192-compile",
    "sdpa-causal-8192-compile",
    "sdpa-causal-4096-eager",
    "varlen-document-4096-eager",
]
DEFAULT_TORCHTITAN = ["sdpa-causal-4096-compile", "varlen-document-8192-compile"]
TOKENS_PER_GPU = 16384
TORCHTITAN_MASK = {"causal": "causal", "document": "block_causal"}
INDUCTOR_OPTIONS = {
    "autotune": {"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM": "1"},
    "cdt": {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"},
}


def parse_case(case: str, flavor: str) -> dict:
    backend, mask, seq_len, mode, *options = case.split("-")
    if mode not in ("compile", "eager") or not seq_len.isdigit():
        raise SystemExit(f"benchmark.py: case {case!r} is not BACKEND-MASK-SEQ-(compile|eager)[-OPTION...]")
    seq = int(seq_len)
    spec = {
        "case": case,
        "backend": backend,
        "mask": mask,
        "seq_len": seq,
        "compile": mode == "compile",
        "local_batch_size": max(1, TOKENS_PER_GPU // seq),
        "kernel": "auto",
        "ac": "none",
        "flavor": flavor,
        "float8": False,
        "inductor_env": {},
    }
    for option in options:
        if option in ("torch", "fa4"):
            spec["kernel"] = option
        elif option == "fp8":
            spec["float8"] = True
        elif re.fullmatch(r"b\d+", option):
            spec["local_batch_size"] = int(option[1:])
        elif option.startswith("ac="):
            spec["ac"] = option[3:]
        elif option.startswith("f="):
            spec["flavor"] = option[2:]
        elif option in INDUCTOR_OPTIONS:
            spec["inductor_env"] |= INDUCTOR_OPTIONS[option]
        else:
            raise SystemExit(f"benchmark.py: unknown option {option!r} in case {case!r}")
    return spec


def summarize(rows: list[dict], skip: int) -> dict:
    """Medians over the steps after the first `skip` (compilation and warm-up)."""
    timed = rows[skip:] or rows[-1:]

    def median(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "tokens_per_sec_per_gpu": median("tokens_per_sec_per_gpu"),
        "mfu": median("mfu"),
        "mfu_torchtitan": median("mfu_torchtitan"),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in rows),
        "steps": rows[-1]["step"],
    }


def case_env(spec: dict, **extra: str) -> dict:
    """The environment of a case's run: this process's, without Inductor's tuning unless the case asks for it (a
    default case stays default where the shell had set it), and `extra`."""
    tuning = {"TORCHINDUCTOR_MAX_AUTOTUNE", *(key for option in INDUCTOR_OPTIONS.values() for key in option)}
    return {**{k: v for k, v in os.environ.items() if k not in tuning}, **spec["inductor_env"], **extra}


def stop_runs_on_sigterm() -> None:
    """SIGTERM (a `timeout` around benchmark.py) exits through Python, so run_case's `finally` stops the run too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def run_case(command: list[str], log, timeout: int, env: dict | None = None) -> int | str:
    """The case's exit code, or a timeout (reported as the case's failure; the next case runs). The run has its
    own process group, killed whenever this one stops waiting for it (a timeout, or SIGTERM from a `timeout`
    around benchmark.py), so no worker of torchrun's keeps the GPU busy after its case."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout} s"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def torchrun_case(program: list[str], spec: dict, args, *flags: str) -> list[str]:
    """torchrun of `program` on --nproc processes with `flags`, then the case's batch and the run's length, which
    train.py and torchtitan.train spell alike."""
    return [
        *[sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", *program],
        *flags,
        *["--training.seq_len", str(spec["seq_len"]), "--training.local_batch_size", str(spec["local_batch_size"])],
        *["--training.steps", str(args.steps)],
    ]


def run_ours(spec: dict, args, work: Path) -> dict:
    out = work / f"ours-{spec['case']}"
    shutil.rmtree(out, ignore_errors=True)  # a rerun measures anew instead of being refused by the old folder
    command = torchrun_case(
        [str(REPO / "train.py")],
        spec,
        args,
        "--config",
        str(REPO / "configs" / f"qwen3_{spec['backend']}.toml"),
        "--model.flavor",
        spec["flavor"],
        "--model.mask",
        spec["mask"],
        "--model.kernel",
        spec["kernel"],
        "--training.activation_checkpoint",
        spec["ac"],
        "--training.float8",
        str(spec["float8"]).lower(),
        "--training.compile",
        str(spec["compile"]).lower(),
        "--training.dtype",
        "bfloat16",
        "--optimizer.warmup_steps",
        "10",
        "--data.tokenizer",
        args.tokenizer,
        "--checkpoint.enable",
        "false",
        "--checkpoint.resume",
        "false",
        "--metrics.log_every",
        "1",
        "--metrics.wandb",
        "false",
        "--job.output_dir",
        str(out),
        "--metrics.profile",
        str(spec["case"] in args.profile).lower(),
    )
    log = work / f"ours-{spec['case']}.log"
    started = time.time()
    with open(log, "w") as f:
        rc = run_case(command, f, args.case_timeout, case_env(spec))
    metrics = out / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        return {
            **spec,
            "impl": "ours",
            "error": f"rc={rc}, see {log.name}",
            "log_tail": log.read_text()[-3000:],
            "wall_s": time.time() - started,
        }
    from recipes.run.runs import read_metrics

    rows = read_metrics(out)
    kernel = re.search(r"attention: varlen runs (.*?) on", log.read_text())
    result = {
        **spec,
        "impl": "ours",
        **summarize(rows, args.skip),
        "wall_s": time.time() - started,
        "kernel_ran": kernel[1] if kernel else None,
    }
    if (out / "profile" / "top_kernels.txt").is_file():
        result["profile"] = (out / "profile" / "top_kernels.txt").read_text()
    return result


def torchtitan_setup(args, work: Path) -> Path:
    """torchtitan reads documents as a jsonl folder and the tokenizer from hf_assets_path."""
    from recipes.data.sources import stdlib_documents

    corpus = work / "tt_corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    with open(corpus / "data.json", "w") as f:
        for text in stdlib_documents():
            f.write(json.dumps({"text": text}) + "\n")
    return corpus


def run_torchtitan(spec: dict, args, work: Path, corpus: Path) -> dict:
    tt = REPO / "benchmarks" / "torchtitan"
    command = torchrun_case(
        ["-m", "torchtitan.train"],
        spec,
        args,
        "--job.config_file",
        str(tt / "base.toml"),
        "--job.dump_folder",
        str(work / f"tt-{spec['case']}"),
        "--model.hf_assets_path",
        args.tokenizer,
        "--experimental.custom_import",
        "ttflavors",
        "--model.flavor",
        f"{spec['flavor']}_{spec['backend']}_{TORCHTITAN_MASK[spec['mask']]}",
        "--training.dataset_path",
        str(corpus),
        "--metrics.log_freq",
        "1",
        "--compile.enable" if spec["compile"] else "--compile.no-enable",
    )
    env = case_env(spec, PYTHONPATH=f"{tt}:{os.environ.get('PYTHONPATH', '')}")
    log = work / f"tt-{spec['case']}.log"
    started = time.time()
    with open(log, "w") as f:
        rc = run_case(command, f, args.case_timeout, env)
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    rows = [
        {
            "step": int(m[1]),
            "peak_memory_gib": float(m[2]),
            "tokens_per_sec_per_gpu": float(m[3].replace(",", "")),
            "mfu_torchtitan": float(m[4]) / 100,
            "mfu": None,
        }
        for m in re.finditer(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+).*?mfu:\s*([\d.]+)%", text)
    ]
    if rc != 0 or not rows:
        return {
            **spec,
            "impl": "torchtitan-0.2.2",
            "error": f"rc={rc}, see {log.name}",
            "log_tail": text[-3000:],
            "wall_s": time.time() - started,
        }
    return {**spec, "impl": "torchtitan-0.2.2", **summarize(rows, args.skip), "wall_s": time.time() - started}


def gqa_memory(
    seq_len: int = 8192, batch: int = 2, q_heads: int = 16, kv_heads: int = 8, head_dim: int = 128
) -> list[dict]:
    """Peak memory of attention forward+backward with GQA in the kernel vs K/V repeated to the query heads."""
    import torch
    import torch.nn.functional as F

    results = []
    for repeat in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        q = torch.randn(batch, q_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (
            torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2)
        )
        base = torch.cuda.memory_allocated()
        if repeat:
            kr, vr = (t.repeat_interleave(q_heads // kv_heads, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()
        torch.cuda.synchronize()
        results.append(
            {
                "kv": "repeated" if repeat else "gqa in kernel",
                "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
            }
        )
        del q, k, v, out
    return results


def markdown(results: list[dict]) -> str:
    lines = [
        "| impl | case | flavor | seq × local batch | AC | tokens/s/GPU | MFU (useful) | MFU (torchtitan) | "
        "peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['impl']} | {r['case']} | {r['flavor']} | {r['seq_len']} × {r['local_batch_size']} | {r['ac']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | |")
            continue
        pct = lambda x: "—" if x is None else f"{x:.1%}"
        lines.append(
            f"{head} {r['tokens_per_sec_per_gpu']:,.0f} | {pct(r['mfu'])} | {pct(r['mfu_torchtitan'])} | "
            f"{r['peak_memory_gib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (the real Qwen3 one)")
    parser.add_argument("--flavor", default="0.6B", help="model flavor of every case without f=FLAVOR")
    parser.add_argument(
        "--cases",
        nargs="*",
        default=DEFAULT_CASES,
        metavar="CASE",
        help="recipe cases, BACKEND-MASK-SEQ-MODE[-OPTION...] (default: %(default)s)",
    )
    parser.add_argument(
        "--torchtitan",
        nargs="*",
        default=DEFAULT_TORCHTITAN,
        metavar="CASE",
        help="cases for torchtitan's own Trainer, or 'none' (default: %(default)s)",
    )
    parser.add_argument(
        "--gqa-memory",
        action="store_true",
        help="also measure attention memory with GQA in the kernel against K/V repeated",
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per case")
    parser.add_argument("--profile", nargs="*", default=[], help="cases to run with [metrics] profile")
    parser.add_argument("--steps", type=int, default=25, help="training steps per case")
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the medians (compile, warm-up)")
    parser.add_argument("--case-timeout", type=int, default=240, help="seconds before a case is stopped")
    parser.add_argument("--work", default="/tmp/benchmark", help="scratch folder for the runs and their logs")
    parser.add_argument("--out", default=None, help="folder for benchmark.json and benchmark.md")
    args = parser.parse_args()
    stop_runs_on_sigterm()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    report = {"results": []}
    if args.gqa_memory:
        report["gqa_memory"] = gqa_memory()
        print(json.dumps(report["gqa_memory"]), flush=True)
    plan = [("torchtitan", c) for c in args.torchtitan if c != "none"] + [("ours", case) for case in args.cases]
    corpus = torchtitan_setup(args, work) if any(impl == "torchtitan" for impl, _ in plan) else None
    for impl, case in plan:
        spec = parse_case(case, args.flavor)
        result = run_ours(spec, args, work) if impl == "ours" else run_torchtitan(spec, args, work, corpus)
        report["results"].append(result)
        print(markdown([result]).splitlines()[-1], flush=True)
        if args.out:  # after every case, so a run cut short still leaves what it measured
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "benchmark.json").write_text(json.dumps(report, indent=1))
            (out / "benchmark.md").write_text(markdown(report["results"]) + "\n")
    print(markdown(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
