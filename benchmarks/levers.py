"""Speed levers measured one at a time in one process, without the data loader or a whole training run.

- blocks: transformer blocks of a flavor, forward + backward, compiled as in training, varlen document attention on
  packed documents of realistic lengths; variant bf16 or fp8 (training.float8: torchao, tensorwise). At 4B, fp8
  against bf16 is the lever's decision (it is kept only at >= 1.1x).
- adamw: the optimizer step of the flavor's whole model, FSDP2-sharded at world size 1 (DTensor parameters, as in
  training), fused against foreach.
- attention: one layer's varlen document attention, forward + backward, on the same packed documents: FA4 with its
  native GQA (K/V heads shared; its backward then sums dK/dV over the query heads of a group in float32 buffers
  with atomics, and a postprocess), FA4 on K/V repeated to every query head (autograd sums the repeats' gradients),
  and torch's varlen_attn. Also the host's time to launch one call, the part that binds when the GPU runs ahead.
- fa4-tiles: the same layer's FA4 forward + backward under the SM90 backward configuration FA4 picks and each
  tile shape FA4's own search finds feasible, with each one's gradients against FA4's pick.

Medians of CUDA-event times after warm-up. Run on the GPU machine:

    python benchmarks/levers.py --parts blocks,adamw --out results/levers.json
    python benchmarks/levers.py --parts blocks --flavor 1.7B --variants bf16,fp8
    python benchmarks/levers.py --parts attention --flavor 0.6B --tokens 24576
    python benchmarks/levers.py --parts fa4-tiles --flavor 0.6B --tokens 24576
    python benchmarks/levers.py --device cpu --flavor debug --tokens 256 --blocks 1 --repeats 2 --eager  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from loss import Timer  # noqa: E402  (benchmarks/loss.py: CUDA events, or wall time on CPU)

from recipes import build, parallel  # noqa: E402
from recipes.config import TrainingConfig  # noqa: E402
from recipes.qwen3.attention import build_backend  # noqa: E402
from recipes.qwen3.model import TransformerBlock, flavor_config, rope_cache  # noqa: E402

VARIANTS = ("bf16", "fp8")  # the blocks' matmuls in bfloat16, or in float8 (training.float8)
ATTENTION_VARIANTS = ("fa4", "fa4-repeat-kv", "torch")


def document_starts(rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    """(rows, seq) starts of documents with lognormal lengths (median ~700 tokens, as the standard library's files
    give with the Qwen3 tokenizer), packed and cut at row ends as the loader does."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.zeros(rows * seq, dtype=torch.bool)
    position = 0
    while position < rows * seq:
        starts[position] = True
        length = torch.empty(1).log_normal_(mean=6.55, std=1.0, generator=generator).item()
        position += max(1, int(length))
    return starts.view(rows, seq)


def packed_shape(args) -> tuple[int, int]:
    """(rows, seq): --tokens in rows of --seq-len (one shorter row when there are fewer tokens)."""
    seq = min(args.seq_len, args.tokens)
    return args.tokens // seq, seq


def median_ms(timer: Timer, fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(repeats))


def blocks_case(args, variant: str, device: torch.device, timer: Timer) -> dict:
    if variant not in VARIANTS:
        raise SystemExit(f"levers.py: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    config = flavor_config(args.flavor, attention="varlen", mask="document")
    backend = build_backend("varlen", "document", "auto")
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([TransformerBlock(config, backend) for _ in range(args.blocks)])
    blocks = blocks.to(device=device, dtype=torch.bfloat16)
    if variant == "fp8":
        build.apply_float8(blocks)
    if not args.eager:
        for block in blocks:
            block.compile(fullgraph=True)
    rows, seq = packed_shape(args)
    rope = rope_cache(config.head_dim, seq, config.rope_theta, device=device)
    meta = backend.attention_meta(document_starts(rows, seq), device)
    x = torch.randn(rows, seq, config.dim, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step():
        h = x
        for block in blocks:
            h = block(h, rope, meta)
        h.float().square().mean().backward()

    started = time.perf_counter()
    step()  # compiles
    compile_s = time.perf_counter() - started
    ms = median_ms(timer, step, args.warmup, args.repeats)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "part": "blocks",
        "flavor": args.flavor,
        "variant": variant,
        "blocks": args.blocks,
        "tokens": rows * seq,
        "ms": ms,
        "ms_per_block": ms / args.blocks,
        "first_call_s": compile_s,
    }


def attention_inputs(args, variant: str, device: torch.device):
    """One layer's varlen document attention on packed documents: (call, meta, q, k, v); call() runs forward and
    backward, with no accumulation into earlier gradients."""
    config = flavor_config(args.flavor)
    backend = build_backend("varlen", "document", "torch" if variant == "torch" else "fa4")
    rows, seq = packed_shape(args)
    meta = backend.attention_meta(document_starts(rows, seq), device)
    torch.manual_seed(0)
    shape = (rows, seq, config.n_heads, config.head_dim)
    q = torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(
            shape[:2] + (config.n_kv_heads, config.head_dim), device=device, dtype=torch.bfloat16, requires_grad=True
        )
        for _ in range(2)
    )
    grad = torch.randn_like(q)
    group = config.n_heads // config.n_kv_heads

    def call():
        q.grad = k.grad = v.grad = None
        kv = (k, v) if variant != "fa4-repeat-kv" else (k.repeat_interleave(group, 2), v.repeat_interleave(group, 2))
        backend(q, *kv, meta, config.head_dim**-0.5).backward(grad)

    return call, meta, q, k, v


def attention_case(args, variant: str, device: torch.device, timer: Timer) -> dict:
    if variant not in ATTENTION_VARIANTS:
        raise SystemExit(f"levers.py: attention variant {variant!r} is not one of {', '.join(ATTENTION_VARIANTS)}")
    call, meta, *_ = attention_inputs(args, variant, device)
    started = time.perf_counter()
    call()  # compiles the kernels
    first_s = time.perf_counter() - started
    ms = median_ms(timer, call, args.warmup, args.repeats)
    host = []
    for _ in range(args.repeats):  # launch `calls` in a row while the GPU is still busy with the first ones
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(args.calls):
            call()
        host.append((time.perf_counter() - started) * 1e3 / args.calls)
    return {
        "part": "attention",
        "flavor": args.flavor,
        "variant": variant,
        "tokens": meta.cu_seqlens[-1].item(),
        "documents": len(meta.cu_seqlens) - 1,
        "max_seqlen": meta.max_seqlen,
        "ms": ms,
        "host_ms_per_call": statistics.median(host),
        "first_call_s": first_s,
    }


def fa4_tiles_case(args, device: torch.device, timer: Timer, record) -> None:
    """FA4's SM90 backward under the configuration FA4 picks ("fa4", measured first and again last) and each tile
    shape FA4's own search (flash_attn/cute/sm90_config_search.py) finds feasible for the flavor's head_dim, the one
    it ranks first for each shape: one layer's attention, forward + backward, and each one's gradients against FA4's
    pick (largest difference over the largest gradient; NaN shows). Each configuration compiles into an empty kernel
    cache: FA4 4.0.0b36's cache key leaves out some fields (num_stages_PdS), so two configurations can share a key."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        raise SystemExit("levers.py: fa4-tiles measures FA4's SM90 backward: it needs a compute capability 9.x GPU")
    from flash_attn.cute import interface
    from flash_attn.cute.cache_utils import JITCache
    from flash_attn.cute.sm90_config_search import find_feasible_bwd_configs

    head_dim = flavor_config(args.flavor).head_dim
    fa4_choice, fa4_cache = interface._tile_size_bwd_sm90, interface._flash_attn_bwd.compile_cache
    fa4_pick = fa4_choice(head_dim, head_dim, True, False)
    configs, shapes = [("fa4", fa4_pick)], set()
    for c in find_feasible_bwd_configs(head_dim, head_dim):  # best first
        if (c["tile_m"], c["tile_n"]) not in shapes:  # FA4's shape too: the search may rank other stages first
            shapes.add((c["tile_m"], c["tile_n"]))
            config = interface.BwdConfig(
                c["tile_m"], c["tile_n"], c["Q_stage"], c["dO_stage"], c["PdS_stage"], c["SdP_swapAB"],
                c["dKV_swapAB"], c["dQ_swapAB"], c["AtomLayoutMSdP"], c["AtomLayoutNdKV"], c["AtomLayoutMdQ"],
                c["num_wg"],
            )  # fmt: skip
            if config != fa4_pick:
                configs.append((f"{c['tile_m']}x{c['tile_n']}", config))
    configs.append(("fa4 (again)", fa4_pick))  # the card's drift over the sweep shows as a change from the first
    call, meta, *inputs = attention_inputs(args, "fa4", device)
    reference = None
    try:
        for name, config in configs:
            interface._tile_size_bwd_sm90 = lambda *_, config=config, **__: config
            interface._flash_attn_bwd.compile_cache = JITCache()
            row = {
                "part": "fa4-tiles",
                "flavor": args.flavor,
                "variant": name,
                "config": repr(config),
                "tokens": int(meta.cu_seqlens[-1]),
                "documents": len(meta.cu_seqlens) - 1,
            }
            try:
                call()  # compiles this configuration's kernel
            except Exception as error:  # a shape the search admits that the kernel refuses: listed with its reason
                if reference is None:
                    raise  # FA4's own pick must run: it is what the others are measured against
                record([{**row, "error": f"{type(error).__name__}: {str(error)[:300]}"}])
                continue
            grads = [t.grad.float() for t in inputs]
            reference = grads if reference is None else reference
            difference = torch.stack([(g - r).abs().max() / r.abs().max() for g, r in zip(grads, reference)]).max()
            record(
                [{**row, "grad_difference": difference.item(), "ms": median_ms(timer, call, args.warmup, args.repeats)}]
            )
    finally:
        interface._tile_size_bwd_sm90, interface._flash_attn_bwd.compile_cache = fa4_choice, fa4_cache


def adamw_case(args, device: torch.device, timer: Timer) -> list[dict]:
    """The optimizer step over the flavor's whole model as train.py builds it (FSDP2 DTensors)."""
    parallel.init_distributed()
    training = TrainingConfig(dtype="bfloat16" if device.type == "cuda" else "float32")
    model = build.build_model(flavor_config(args.flavor), training, "", device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    for implementation in ("fused", "foreach"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **{implementation: True})
        ms = median_ms(timer, optimizer.step, args.warmup, args.repeats)
        rows.append(
            {"part": "adamw", "flavor": args.flavor, "variant": implementation, "ms": ms, "params": model.num_params()}
        )
        del optimizer
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="blocks,adamw", help="comma-separated: blocks, adamw, attention, fa4-tiles")
    parser.add_argument("--flavor", default="4B", help="the blocks' flavor")
    parser.add_argument("--adamw-flavor", default="0.6B")
    parser.add_argument("--variants", default="bf16,fp8", help="comma-separated block variants: bf16, fp8")
    parser.add_argument(
        "--attention-variants", default=",".join(ATTENTION_VARIANTS), help="comma-separated: fa4, fa4-repeat-kv, torch"
    )
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens a step, in packed rows of --seq-len")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=28, help="attention: calls launched in a row for the host time")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eager", action="store_true", help="do not compile the blocks")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (after every case)")
    args = parser.parse_args(argv)
    if args.tokens > args.seq_len and args.tokens % args.seq_len:
        parser.error(f"--tokens {args.tokens} is no whole number of rows of --seq-len {args.seq_len}: give a multiple")
    device = torch.device(args.device)
    timer = Timer(device)
    rows = []

    def record(new: list[dict]) -> None:
        for row in new:
            print(json.dumps(row), flush=True)
        rows.extend(new)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            args.out.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=1))

    parts = args.parts.split(",")
    if "blocks" in parts:
        for variant in args.variants.split(","):
            record([blocks_case(args, variant, device, timer)])
            torch.compiler.reset()
    if "attention" in parts:
        for variant in args.attention_variants.split(","):
            record([attention_case(args, variant, device, timer)])
    if "fa4-tiles" in parts:
        fa4_tiles_case(args, device, timer, record)
    if "adamw" in parts:
        record(adamw_case(argparse.Namespace(**{**vars(args), "flavor": args.adamw_flavor}), device, timer))
    print("\n| part | flavor | variant | ms | host ms a call |\n|---|---|---|---|---|")
    for row in [row for row in rows if "ms" in row]:
        host = f"{row['host_ms_per_call']:.2f}" if "host_ms_per_call" in row else ""
        print(f"| {row['part']} | {row['flavor']} | {row['variant']} | {row['ms']:.2f} | {host} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
