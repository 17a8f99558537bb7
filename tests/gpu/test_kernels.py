"""Each backend's real CUDA kernel (sdpa, compiled flex, varlen_attn) in bf16 against a float64 reference.

Run on a GPU machine with `pytest -m gpu tests/gpu`; the table of relative errors is printed at the end and,
when GPU_RESULTS_DIR is set, written there as attention_kernels.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from recipes.qwen3.attention import BACKENDS, MASKS, build_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BATCH, SEQ, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 2048, 16, 8, 128
EOS = 0
BF16_TOLERANCE = 1e-2  # relative L2 error; bf16 keeps 8 bits of mantissa (~4e-3 per rounding)


@pytest.fixture(scope="module")
def error_table(pytestconfig):
    rows: list[dict] = []
    yield rows
    lines = [f"\nAttention kernels, bf16 vs float64, relative L2 error; {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}; batch {BATCH}, seq {SEQ}, heads {Q_HEADS}/{KV_HEADS}, head_dim {HEAD_DIM}",
             "| backend | mask | out | grad q | grad k | grad v |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['mask']} | " + " | ".join(f"{r[key]:.1e}" for key in ("out", "q", "k", "v"))
              + " |" for r in rows]
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines))
    if os.environ.get("GPU_RESULTS_DIR"):
        path = Path(os.environ["GPU_RESULTS_DIR"]) / "attention_kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = dict(batch=BATCH, seq=SEQ, q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        shape=shape, rows=rows), indent=2) + "\n")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_kernel_matches_float64_reference(backend_name, mask, packed_tokens, backend_and_reference, error_table):
    tokens = packed_tokens(SEQ, vocab=1000, eos_id=EOS)[:BATCH]
    tokens[0, [700, 1501]] = EOS  # a few documents of realistic length on top of the short ones
    tokens[1, 1023] = EOS
    tokens = tokens.cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(BATCH, SEQ, heads, HEAD_DIM, device="cuda", generator=generator)
               .to(torch.bfloat16).requires_grad_() for heads in (Q_HEADS, KV_HEADS, KV_HEADS))
    grad_out = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device="cuda", generator=generator).to(torch.bfloat16)
    scale = HEAD_DIM**-0.5

    out, expected, grads = backend_and_reference(backend_name, mask, tokens, EOS, q, k, v, grad_out, scale)

    errors = {"out": _relative_error(out, expected)}
    errors.update({name: _relative_error(got, want) for name, got, want in grads})
    error_table.append(dict(backend=backend_name, mask=mask, **errors))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_varlen_metadata_from_host_tokens_needs_no_device_sync(packed_tokens):
    """train.py builds the metadata from the loader's host copy of the tokens: varlen's lengths then cost no sync."""
    tokens = packed_tokens(SEQ, vocab=1000, eos_id=EOS)
    backend = build_backend("varlen", "document")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = backend.build_meta(tokens, EOS, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = backend.build_meta(tokens.cuda(), EOS)
    assert torch.equal(meta.cu_seqlens, reference.cu_seqlens) and meta.max_seqlen == reference.max_seqlen
