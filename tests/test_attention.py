"""Each attention backend (its CPU path) against a naive float64 reference: outputs and gradients of q, k, v."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.nn.attention.varlen import varlen_attn

from recipes.qwen3.attention import BACKENDS, MASKS, VarlenBackend, build_backend

EOS = 3
SEQ = 45  # not a multiple of any kernel block size


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backend_matches_float64_reference(backend_name, mask, q_heads, kv_heads, head_dim,
                                           packed_tokens, backend_and_reference):
    tokens = packed_tokens(SEQ, vocab=50, eos_id=EOS)
    generator = torch.Generator().manual_seed(head_dim + q_heads + kv_heads)
    batch = tokens.shape[0]
    q, k, v = (torch.randn(batch, SEQ, heads, head_dim, generator=generator).requires_grad_()
               for heads in (q_heads, kv_heads, kv_heads))
    grad_out = torch.randn(batch, SEQ, q_heads, head_dim, generator=generator)
    scale = head_dim**-0.5

    out, expected, grads = backend_and_reference(backend_name, mask, tokens, EOS, q, k, v, grad_out, scale)

    assert out.shape == (batch, SEQ, q_heads, head_dim)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for name, got, want in grads:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_varlen_document_metadata_matches_hand_computed_boundaries():
    tokens = torch.tensor([
        [5, 6, EOS, 7, 8, 9, EOS, 4],  # documents of 3, 4 and (cut) 1 tokens
        [EOS, 6, 7, 8, 9, 4, 5, EOS],  # EOS first and last: 1 and 7 tokens
        [4, 5, 6, 7, 8, 9, 4, 5],  # no EOS: one document, the whole row
    ])
    meta = build_backend("varlen", "document").build_meta(tokens, EOS)
    assert meta.cu_seqlens.dtype == torch.int32
    assert meta.cu_seqlens.tolist() == [0, 3, 7, 8, 9, 16, 24]
    assert meta.max_seqlen == 8


def test_varlen_causal_metadata_is_one_sequence_per_row():
    tokens = torch.tensor([[5, EOS, 7], [EOS, 6, 7]])
    meta = build_backend("varlen", "causal").build_meta(tokens, EOS)
    assert meta.cu_seqlens.tolist() == [0, 3, 6]
    assert meta.max_seqlen == 3


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_varlen_keywords_fit_installed_signature(gqa):
    """The keywords picked for causal (and GQA) must bind to this torch's varlen_attn and say what we mean."""
    keywords = VarlenBackend._causal_gqa_keywords(gqa)
    parameters = inspect.signature(varlen_attn).parameters
    q = torch.empty(8, 4, 64)
    cu_seqlens = torch.tensor([0, 8], dtype=torch.int32)
    inspect.signature(varlen_attn).bind(q, q, q, cu_seqlens, cu_seqlens, 8, 8, scale=0.125, **keywords)
    if "window_size" in parameters:
        assert keywords["window_size"] == (-1, 0)  # unbounded left, nothing to the right: causal
    else:
        assert keywords["is_causal"] is True
    assert keywords.get("enable_gqa", False) is (gqa and "enable_gqa" in parameters)
