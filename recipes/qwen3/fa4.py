"""FlashAttention-4 (PyPI flash-attn-4, CuTe DSL; SM90 and SM100) as varlen attention on packed tokens.

    varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale) -> out
    q: (tokens, q_heads, head_dim); k, v: (tokens, kv_heads, head_dim); out like q

Causal within each [cu_seqlens[i], cu_seqlens[i+1]) span, GQA native (no repeated K/V). flash-attn-4 registers
nothing with torch.library, so its forward and backward are wrapped here as custom ops with fake (shape-only)
implementations: compiled blocks (fullgraph=True) trace through them. flash_attn is imported only when a kernel
runs, so this module imports, and its ops trace, where flash-attn-4 is not installed.

torch 2.11's own hook, torch.nn.attention.activate_flash_attention_impl("FA4"), cannot stand in for this module:
its backward rejects the window arguments varlen_attn passes ("windowed attention not supported").
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _import_error() -> str | None:
    try:
        import flash_attn.cute.interface  # noqa: F401  (imports cutlass: seconds, so once per process)
    except ImportError as error:
        return f"flash-attn-4 is not installed (import flash_attn.cute: {error})"
    except Exception as error:  # a broken install (say, CuTe DSL libraries that do not load) is a reason too
        return f"flash_attn.cute does not import ({type(error).__name__}: {error})"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """None when FA4 can run on `device`, else a short reason why not."""
    if device.type != "cuda":
        return f"not a CUDA device ({device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"compute capability {major}.{minor} (FA4 needs 9.x or 10.x)"
    return _import_error()


@torch.library.custom_op("qwen3_fa4::forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    # Returns (out, lse, p, row_max, o_lo); the last three are MLA-only (None here). Varlen lse: (heads, tokens).
    out, lse, *_ = _flash_attn_fwd(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        softmax_scale=scale,
        causal=True,
        return_lse=True,
    )
    return out, lse


@_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    tokens, heads, _ = q.shape
    return q.new_empty(tokens, heads, v.shape[-1]), q.new_empty(heads, tokens, dtype=torch.float32)


@torch.library.custom_op("qwen3_fa4::backward", mutates_args=())
def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    # dq/dk/dv come out as empty_like(q/k/v): contiguous inputs make them contiguous, as the fake says.
    # cu_seqlens_k is needed too (without it k is read as (batch, seq, ...)); GQA's dk/dv keep kv_heads.
    q, k, v = (t.contiguous() for t in (q, k, v))
    dq, dk, dv = _flash_attn_bwd(
        q,
        k,
        v,
        out,
        dout,
        lse,
        scale,
        True,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
    )
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _autograd_backward(ctx, dout, _dlse):
    # lse never leaves varlen_attention, so its gradient is zero and not passed on.
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _backward(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Causal attention within each sequence of the packed token axis; cu_seqlens int32 on q's device."""
    return _forward(q, k, v, cu_seqlens, max_seqlen, scale)[0]
