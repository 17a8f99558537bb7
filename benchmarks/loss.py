"""Output-head loss, forward + backward: today's logits + compiled cross-entropy against our chunked
linear_cross_entropy (recipes/qwen3/loss.py) and, where they are installed, cut-cross-entropy, QuACK's
chunked_linear_cross_entropy (quack-kernels, which FlashAttention-4 brings) and Liger's fused linear cross-entropy
(liger-kernel: its Triton kernel, and its Hopper CuTe DSL kernel). A path that refuses the shape is listed with its
reason.

For each token count: median time (CUDA events, after warm-up) and the peak memory above the inputs
(torch.cuda.max_memory_allocated; the bf16 gradients of hidden and weight are part of it in every path), and each
path's loss and gradient difference against today's. Run on the GPU machine:

    python benchmarks/loss.py --out results/loss.json
    python benchmarks/loss.py --tokens 16384 --chunks 1024,2048,4096,8192     # chunk-size sweep of ours
    python benchmarks/loss.py --device cpu --tokens 300 --dim 64 --vocab 1000 --repeats 2   # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recipes.qwen3.loss import CHUNK_TOKENS, linear_cross_entropy  # noqa: E402

GIB = 2**30


def today_path(compile_: bool):
    """train.py before the fused loss: the whole logits, then a compiled mean cross-entropy in float32."""

    def ce(logits, labels):
        return F.cross_entropy(logits.float(), labels)

    ce = torch.compile(ce) if compile_ else ce

    def run(hidden, weight, labels):
        return ce(hidden @ weight.t(), labels)

    return run


def ours_path(chunk: int):
    def run(hidden, weight, labels):
        return linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk) / (labels != -100).sum()

    return run


def cce_path():
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        return None

    def run(hidden, weight, labels):
        return cce(hidden, weight, labels, impl="cce")  # its defaults: mean, ignore_index -100, gradient filter

    return run


def skipped(name: str, error: Exception) -> None:
    print(f"{name}: skipped ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})", file=sys.stderr)


def others_paths(device: torch.device) -> dict:
    """Other libraries' fused linear cross-entropy on CUDA, each a mean over the labels like the paths above; one
    that does not import, for whatever reason (quack-kernels 0.6.5's module raises TypeError on import beside
    nvidia-cutlass-dsl 4.8.1), is named with its reason."""
    paths = {}
    try:
        from quack.linear_cross_entropy import chunked_linear_cross_entropy

        paths["quack chunked"] = chunked_linear_cross_entropy  # (x, weight, target), mean by default
    except Exception as error:
        skipped("quack chunked", error)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # its grad_weight summed in float32, as ours and QuACK's (its default sums in the input's dtype)
        paths["liger triton"] = lambda hidden, weight, labels: liger_fused_linear_cross_entropy(
            hidden, weight, labels, accum_dtype=torch.float32
        )
    except Exception as error:
        skipped("liger triton", error)
    if torch.cuda.get_device_capability(device) != (9, 0):
        return paths
    try:
        from liger_kernel.ops.cutedsl.ops.fused_linear_cross_entropy_sm90 import liger_fused_linear_cross_entropy_sm90

        paths["liger CuTe SM90"] = liger_fused_linear_cross_entropy_sm90
    except Exception as error:
        skipped("liger CuTe SM90", error)
    return paths


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        """Milliseconds of one fn()."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def fwd_bwd(path, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = path(hidden, weight, labels)
    loss.backward()
    return loss.detach()


def measure(path, hidden, weight, labels, warmup: int, repeats: int, timer: Timer) -> dict:
    cuda = hidden.device.type == "cuda"
    for _ in range(warmup):
        fwd_bwd(path, hidden, weight, labels)
    times = [timer(lambda: fwd_bwd(path, hidden, weight, labels)) for _ in range(repeats)]
    hidden.grad = weight.grad = None
    extra = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(path, hidden, weight, labels)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / GIB
    loss = fwd_bwd(path, hidden, weight, labels)
    return {
        "ms": statistics.median(times),
        "extra_gib": extra,
        "loss": loss.item(),
        "grad_hidden": hidden.grad.float(),
        "grad_weight": weight.grad.float(),
    }


def fp32_reference(hidden, weight, labels, chunk: int = 4096) -> dict:
    """Plain autograd in float32 (full-precision matmuls), a chunk of rows at a time so that it fits: the loss is a
    sum over rows, so each chunk's backward gives its rows of grad_hidden and adds its share to grad_weight."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    count, total = (labels != -100).sum(), 0.0
    for start in range(0, h.shape[0], chunk):
        loss = F.cross_entropy(h[start : start + chunk] @ w.t(), labels[start : start + chunk], reduction="sum") / count
        loss.backward()
        total += loss.item()
    return {"loss": total, "grad_hidden": h.grad, "grad_weight": w.grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="16384,32768,65536", help="comma-separated token counts")
    parser.add_argument("--dim", type=int, default=1024, help="hidden size")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen3's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--chunks", default=str(CHUNK_TOKENS), help="comma-separated chunk sizes for ours")
    parser.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of labels set to -100")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the hidden states and weight")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda where available, else cpu"
    )
    parser.add_argument("--eager", action="store_true", help="today's path without torch.compile")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    timer = Timer(device)
    paths = {
        "today (logits + compiled CE)" if not args.eager else "today (logits + eager CE)": today_path(not args.eager)
    }
    for chunk in (int(c) for c in args.chunks.split(",")):
        paths[f"ours (chunk {chunk})"] = ours_path(chunk)
    cce = cce_path() if device.type == "cuda" else None
    if cce is not None:
        paths["cut-cross-entropy cce"] = cce
    else:
        print("cut-cross-entropy: skipped (not importable, or no CUDA)", file=sys.stderr)
    others = others_paths(device) if device.type == "cuda" else {}
    paths.update(others)

    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        generator = torch.Generator(device).manual_seed(tokens)
        hidden = torch.randn(tokens, args.dim, device=device, generator=generator).to(dtype).requires_grad_()
        weight = (torch.randn(args.vocab, args.dim, device=device, generator=generator) * 0.02).to(dtype)
        weight.requires_grad_()
        labels = torch.randint(0, args.vocab, (tokens,), device=device, generator=generator)
        labels[torch.rand(tokens, device=device, generator=generator) < args.ignore_frac] = -100
        exact = fp32_reference(hidden, weight, labels)
        reference = None
        for name, path in paths.items():
            try:
                result = measure(path, hidden, weight, labels, args.warmup, args.repeats, timer)
            except (NotImplementedError, ValueError, TypeError, AssertionError) as refusal:  # their shape checks
                if name not in others:
                    raise
                reason = f"{type(refusal).__name__}: {(str(refusal).splitlines() or [''])[0][:200]}"
                rows.append({"tokens": tokens, "path": name, "refused": reason})
                print(f"{name} at {tokens} tokens: refused ({reason})", file=sys.stderr)
                continue
            reference = reference or result
            rows.append(
                {
                    "tokens": tokens,
                    "path": name,
                    "ms": result["ms"],
                    "extra_gib": result["extra_gib"],
                    "loss": result["loss"],
                    "loss_diff": abs(result["loss"] - reference["loss"]),
                    "grad_hidden_rel_diff": rel(result["grad_hidden"], reference["grad_hidden"]),
                    "grad_weight_rel_diff": rel(result["grad_weight"], reference["grad_weight"]),
                    "fp32_loss_diff": abs(result["loss"] - exact["loss"]),
                    "fp32_grad_hidden_rel_diff": rel(result["grad_hidden"], exact["grad_hidden"]),
                    "fp32_grad_weight_rel_diff": rel(result["grad_weight"], exact["grad_weight"]),
                }
            )
            del result
        del hidden, weight, labels, reference, exact
        if device.type == "cuda":
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\n{where}, torch {torch.__version__}; dim {args.dim}, vocab {args.vocab}, {args.dtype}, fwd+bwd, "
        f"median of {args.repeats}; differences (loss: absolute; gradients: relative norm, hidden/weight) "
        f"against today's path and against plain float32 autograd\n"
    )
    print(
        "| tokens | path | ms | extra peak GiB | loss | loss diff vs today | grad diff vs today | "
        "loss diff vs fp32 | grad diff vs fp32 |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "refused" in r:
            print(f"| {r['tokens']} | {r['path']} | refused: {r['refused']} |")
            continue
        memory = "n/a" if r["extra_gib"] is None else f"{r['extra_gib']:.2f}"
        print(
            f"| {r['tokens']} | {r['path']} | {r['ms']:.1f} | {memory} | {r['loss']:.6f} | {r['loss_diff']:.1e} | "
            f"{r['grad_hidden_rel_diff']:.1e} / {r['grad_weight_rel_diff']:.1e} | {r['fp32_loss_diff']:.1e} | "
            f"{r['fp32_grad_hidden_rel_diff']:.1e} / {r['fp32_grad_weight_rel_diff']:.1e} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "device": where,
                    "torch": torch.__version__,
                    "dim": args.dim,
                    "vocab": args.vocab,
                    "dtype": args.dtype,
                    "repeats": args.repeats,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
