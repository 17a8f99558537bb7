"""FlashAttention-4 inside the varlen backend (kernel "fa4"), on Hopper or Blackwell: as accurate as torch's
FlashAttention-2 against float64, close to it, and traceable in a block compiled with fullgraph=True.

Run on a GPU machine with flash-attn-4 installed: `pytest -m gpu tests/gpu/test_fa4.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_kernels import realistic_starts

from recipes.qwen3 import fa4
from recipes.qwen3.attention import build_backend
from recipes.qwen3.model import Qwen3Config, TransformerBlock, rope_cache

pytest.importorskip("flash_attn.cute", reason="flash-attn-4 is not installed")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BATCH, SEQ, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 2048, 16, 8, 128


@pytest.fixture(autouse=True)
def _fa4_can_run():
    if reason := fa4.unavailable_reason(torch.device("cuda")):
        pytest.skip(reason)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _out_and_grads(attention, starts, q, k, v, grad_out, dtype) -> list[torch.Tensor]:
    """[out, grad q, grad k, grad v] of `attention` (a backend, or the float64 reference) on copies of q, k, v."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, attention.attention_meta(starts, q.device), HEAD_DIM**-0.5)
    out.backward(grad_out.to(dtype))
    return [out, q.grad, k.grad, v.grad]


@pytest.fixture
def runs(packed_starts, reference_attention) -> dict[str, list[torch.Tensor]]:
    """The same bf16 inputs (documents of odd lengths, GQA 16/8) through FA4, torch's varlen and float64."""
    starts = realistic_starts(packed_starts)
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v, grad_out = (
        torch.randn(BATCH, SEQ, heads, HEAD_DIM, device="cuda", generator=generator).to(torch.bfloat16)
        for heads in (Q_HEADS, KV_HEADS, KV_HEADS, Q_HEADS)
    )
    attentions = {kernel: build_backend("varlen", "document", kernel) for kernel in ("fa4", "torch")}
    result = {name: _out_and_grads(a, starts, q, k, v, grad_out, torch.bfloat16) for name, a in attentions.items()}
    result["float64"] = _out_and_grads(reference_attention("document"), starts, q, k, v, grad_out, torch.float64)
    return result


def test_fa4_is_as_accurate_as_fa2_against_float64(runs):
    for name, fa4_got, fa2_got, want in zip(("out", "q", "k", "v"), runs["fa4"], runs["torch"], runs["float64"]):
        assert fa4_got.dtype == torch.bfloat16 and fa4_got.shape == want.shape, name
        fa4_error, fa2_error = _relative_error(fa4_got, want), _relative_error(fa2_got, want)
        assert fa4_error < min(max(1.25 * fa2_error, 3e-3), 1e-2), (name, fa4_error, fa2_error)


def test_fa4_matches_torch_varlen(runs):
    for name, got, want in zip(("out", "q", "k", "v"), runs["fa4"], runs["torch"]):
        assert _relative_error(got, want) < 1e-2, name


def test_compiled_block_with_fa4_matches_eager(packed_starts):
    """fullgraph=True fails on any graph break; two batches with different document boundaries (other
    cu_seqlens length and max_seqlen) must both run compiled and agree with eager."""
    config = Qwen3Config(
        dim=512,
        n_heads=8,
        n_kv_heads=4,
        head_dim=64,
        hidden_dim=1024,
        max_seq_len=SEQ,
        attention="varlen",
        mask="document",
        kernel="fa4",
    )
    torch.manual_seed(0)
    eager = TransformerBlock(config, build_backend("varlen", "document", "fa4")).cuda().to(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True)
    rope = rope_cache(config.head_dim, SEQ, config.rope_theta, device="cuda")
    starts = packed_starts(SEQ)[:BATCH]
    other = starts.clone()  # max_seqlen 2027 -> 1147, 8 -> 11 documents
    other[0, [301, 901]] = True
    other[1, 1001] = True
    for batch_starts in (starts, other):
        meta = eager.attention.backend.attention_meta(batch_starts, torch.device("cuda"))
        x = torch.randn(BATCH, SEQ, config.dim, device="cuda").to(torch.bfloat16)
        results = []
        for block in (eager, compiled):
            block.zero_grad()
            x_leaf = x.clone().requires_grad_()
            loss = block(x_leaf, rope, meta).float().square().mean()
            loss.backward()
            results.append([loss, x_leaf.grad] + [p.grad for p in block.parameters()])
        (eager_loss, *eager_grads), (compiled_loss, *compiled_grads) = results
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=0)
        for got, want in zip(compiled_grads, eager_grads):
            assert _relative_error(got, want) < 1e-2
