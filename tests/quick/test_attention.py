"""Each attention backend (its CPU path) against a naive float64 reference: outputs and gradients of q, k, v."""

from __future__ import annotations

import functools
import inspect
import logging

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention.varlen import varlen_attn

from recipes.qwen3 import attention, fa4
from recipes.qwen3.attention import BACKENDS, MASKS, VarlenBackend, build_backend

SEQ = 45  # not a multiple of any kernel block size


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backend_matches_float64_reference(
    backend_name, mask, q_heads, kv_heads, head_dim, packed_starts, backend_and_reference
):
    starts = packed_starts(SEQ)
    generator = torch.Generator().manual_seed(head_dim + q_heads + kv_heads)
    batch = starts.shape[0]
    q, k, v = (
        torch.randn(batch, SEQ, heads, head_dim, generator=generator).requires_grad_()
        for heads in (q_heads, kv_heads, kv_heads)
    )
    grad_out = torch.randn(batch, SEQ, q_heads, head_dim, generator=generator)
    scale = head_dim**-0.5

    out, expected, grads = backend_and_reference(backend_name, mask, starts, q, k, v, grad_out, scale)

    assert out.shape == (batch, SEQ, q_heads, head_dim)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for name, got, want in grads:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_varlen_document_metadata_matches_hand_computed_boundaries():
    starts = torch.tensor(
        [
            [1, 0, 0, 1, 0, 0, 0, 1],  # documents of 3, 4 and (cut) 1 tokens
            [0, 1, 0, 0, 0, 0, 0, 0],  # a cut document of 1 token, then 7
            [0, 0, 0, 0, 0, 0, 0, 0],  # no start: one (cut) document, the whole row
        ],
        dtype=torch.bool,
    )
    meta = build_backend("varlen", "document").attention_meta(starts)
    assert meta.cu_seqlens.dtype == torch.int32
    assert meta.cu_seqlens.tolist() == [0, 3, 7, 8, 9, 16, 24]
    assert meta.max_seqlen == 8


def test_varlen_causal_metadata_is_one_sequence_per_row():
    starts = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    meta = build_backend("varlen", "causal").attention_meta(starts)
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


@pytest.mark.parametrize("kernel", ["torch", "fa4"])
@pytest.mark.parametrize("backend_name", ["sdpa", "flex"])
def test_only_varlen_takes_a_kernel(backend_name, kernel):
    with pytest.raises(ValueError, match="model.kernel"):
        build_backend(backend_name, "causal", kernel)


def test_varlen_kernel_fa4_on_cpu_still_runs_the_reference(packed_starts, reference_attention):
    """CPU runs the reference whatever the kernel: asking for fa4 is not an error there, and the output is the
    document-masked attention of the float64 reference written in conftest."""
    starts = packed_starts(SEQ)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, SEQ, heads, 64, generator=generator) for heads in (4, 2, 2))
    reference = reference_attention("document")
    expected = reference(q, k, v, reference.attention_meta(starts), 0.125)
    for kernel in ("torch", "fa4"):
        backend = build_backend("varlen", "document", kernel)
        out = backend(q, k, v, backend.attention_meta(starts), 0.125)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=kernel)
    assert fa4.unavailable_reason(torch.device("cpu"))


def test_fa4_fake_implementations_give_the_kernels_shapes():
    """What compiled blocks trace instead of the kernels (no flash-attn-4 needed): out like q, lse (heads, tokens)
    in float32, and gradients shaped like q, k and v through the registered backward (GQA: 4 query, 2 kv heads)."""
    with FakeTensorMode():
        q = torch.empty(40, 4, 64, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.empty(40, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        cu_seqlens = torch.tensor([0, 17, 40], dtype=torch.int32)
        out, lse = torch.ops.qwen3_fa4.forward(q, k, v, cu_seqlens, 23, 0.125)
        assert (out.shape, out.dtype, out.is_contiguous()) == (q.shape, torch.bfloat16, True)
        assert (lse.shape, lse.dtype) == ((4, 40), torch.float32)
        fa4.varlen_attention(q, k, v, cu_seqlens, 23, 0.125).sum().backward()
        for tensor in (q, k, v):
            assert (tensor.grad.shape, tensor.grad.dtype) == (tensor.shape, torch.bfloat16)


@pytest.fixture
def fresh_kernel_choice(monkeypatch):
    """The varlen kernel is chosen once per process for each (kernel, device): give this test a choice of its own."""
    monkeypatch.setattr(
        attention, "_resolve_varlen_kernel", functools.cache(attention._resolve_varlen_kernel.__wrapped__)
    )


def test_varlen_kernel_choice_where_fa4_cannot_run(fresh_kernel_choice, caplog):
    """Meta tensors are no CUDA device: "fa4" must raise, not fall back; "auto" falls back and says why."""
    starts = torch.zeros(1, 8, dtype=torch.bool)
    q = torch.empty(1, 8, 2, 64, device="meta", dtype=torch.bfloat16)
    fa4_backend, auto_backend = (build_backend("varlen", "document", kernel) for kernel in ("fa4", "auto"))
    with pytest.raises(RuntimeError, match=r"model.kernel = 'fa4' cannot run on meta: not a CUDA device"):
        fa4_backend(q, q, q, fa4_backend.attention_meta(starts, torch.device("meta")), 0.125)
    with caplog.at_level(logging.INFO, logger="recipes.qwen3.attention"):
        auto_backend(q, q, q, auto_backend.attention_meta(starts, torch.device("meta")), 0.125)
    assert "varlen runs torch's varlen_attn (FA2) on meta (model.kernel = 'auto'; FA4 cannot run" in caplog.text


def test_varlen_fa4_path_traces_with_fullgraph(fresh_kernel_choice, monkeypatch):
    """CI has no GPU, but on meta tensors FA4's ops run their fake implementations: enough to check that the kernel
    choice and both ops trace inside torch.compile(fullgraph=True), also after the document boundaries change."""
    monkeypatch.setattr(fa4, "unavailable_reason", lambda device: None)
    traced_ops = set()

    def record(graph, _):  # AOTAutograd's forward and backward graphs, run as they are
        traced_ops.update(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward)

    backend = build_backend("varlen", "document", "fa4")
    compiled = torch.compile(
        lambda q, k, v, meta: backend(q, k, v, meta, 0.125),
        fullgraph=True,
        backend=aot_autograd(fw_compiler=record, bw_compiler=record),
    )
    for cuts in ([5], [3, 9, 20]):
        starts = torch.zeros(2, 32, dtype=torch.bool)
        starts[:, cuts] = True
        q = torch.empty(2, 32, 4, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.empty(2, 32, 2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out = compiled(q, k, v, backend.attention_meta(starts, torch.device("meta")))
        out.sum().backward()
        assert out.shape == q.shape and [t.grad.shape for t in (q, k, v)] == [q.shape, k.shape, v.shape]
    assert {"qwen3_fa4.forward.default", "qwen3_fa4.backward.default"} <= traced_ops


def test_every_backend_reads_document_starts_not_token_ids(packed_starts, backend_and_reference):
    """The same q, k, v under two different segmentations give different outputs, each equal to the reference's:
    the metadata follows the starts it is given (nothing else, such as token ids, reaches it)."""
    generator = torch.Generator().manual_seed(3)
    one = packed_starts(SEQ)
    other = one.clone()
    other[0, 20] = True  # one more document in row 0
    q, k, v = (torch.randn(3, SEQ, 4, 32, generator=generator) for _ in range(3))
    for backend_name in BACKENDS:
        outs = []
        for starts in (one, other):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, expected, _ = backend_and_reference(
                backend_name, "document", starts, *leaves, torch.ones_like(q), 32**-0.5
            )
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
            outs.append(out.detach())
        assert not torch.allclose(outs[0][0, 20:], outs[1][0, 20:]), backend_name
        torch.testing.assert_close(outs[0][1:], outs[1][1:])  # the other rows did not change
