"""Each backend's real CUDA kernel (sdpa, compiled flex, varlen with torch's varlen_attn and with FlashAttention-4)
in bf16 against a float64 reference.

Run on a GPU machine with `pytest -m gpu tests/gpu`; the table of relative errors is printed at the end and,
when GPU_RESULTS_DIR is set, written there as attention_kernels.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from recipes.qwen3 import fa4
from recipes.qwen3.attention import MASKS, build_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BATCH, SEQ, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 2048, 16, 8, 128
BF16_TOLERANCE = 1e-2  # relative L2 error; bf16 keeps 8 bits of mantissa (~4e-3 per rounding)
# (backend, kernel): the kernel choice is varlen's; the fa4 row skips where FA4 cannot run.
CASES = [("sdpa", "auto"), ("flex", "auto"), ("varlen", "torch"), ("varlen", "fa4")]


@pytest.fixture(scope="module")
def error_table(pytestconfig):
    rows: list[dict] = []
    yield rows
    lines = [
        f"\nAttention kernels, bf16 vs float64, relative L2 error; {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}; batch {BATCH}, seq {SEQ}, heads {Q_HEADS}/{KV_HEADS}, head_dim {HEAD_DIM}",
        "| backend | kernel | mask | out | grad q | grad k | grad v |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['backend']} | {r['kernel']} | {r['mask']} | "
        + " | ".join(f"{r[key]:.1e}" for key in ("out", "q", "k", "v"))
        + " |"
        for r in rows
    ]
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines))
    if os.environ.get("GPU_RESULTS_DIR"):
        path = Path(os.environ["GPU_RESULTS_DIR"]) / "attention_kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = dict(batch=BATCH, seq=SEQ, q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        path.write_text(
            json.dumps(
                dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=shape, rows=rows), indent=2
            )
            + "\n"
        )


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def realistic_starts(packed_starts) -> torch.Tensor:
    """The fixture's odd short documents, plus a few of realistic length (hundreds of tokens)."""
    starts = packed_starts(SEQ)[:BATCH]
    starts[0, [701, 1502]] = True
    starts[1, 1024] = True
    return starts


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend_name,kernel", CASES, ids=[f"{b}-{k}" for b, k in CASES])
def test_kernel_matches_float64_reference(
    backend_name, kernel, mask, packed_starts, backend_and_reference, error_table
):
    if kernel == "fa4" and (reason := fa4.unavailable_reason(torch.device("cuda"))):
        pytest.skip(reason)
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (
        torch.randn(BATCH, SEQ, heads, HEAD_DIM, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
        for heads in (Q_HEADS, KV_HEADS, KV_HEADS)
    )
    grad_out = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device="cuda", generator=generator).to(torch.bfloat16)

    out, expected, grads = backend_and_reference(
        backend_name, mask, realistic_starts(packed_starts), q, k, v, grad_out, HEAD_DIM**-0.5, kernel
    )

    errors = {"out": _relative_error(out, expected)}
    errors.update({name: _relative_error(got, want) for name, got, want in grads})
    error_table.append(dict(backend=backend_name, kernel=kernel, mask=mask, **errors))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_varlen_metadata_from_host_starts_needs_no_device_sync(packed_starts):
    """train.py builds the metadata from the loader's host copy of the starts: varlen's lengths then cost no sync."""
    starts = realistic_starts(packed_starts)
    backend = build_backend("varlen", "document")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = backend.attention_meta(starts, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = backend.attention_meta(starts.cuda())
    assert torch.equal(meta.cu_seqlens, reference.cu_seqlens) and meta.max_seqlen == reference.max_seqlen
