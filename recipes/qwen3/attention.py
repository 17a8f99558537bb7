"""Attention backends behind one layout contract.

    backend(q, k, v, meta, scale) -> out
    q:   (batch, seq, q_heads, head_dim)
    k,v: (batch, seq, kv_heads, head_dim)
    out: (batch, seq, q_heads, head_dim)

Every backend converts to its kernel's layout inside itself and back before it returns, so the model
reshapes the output the same way for every backend and never branches on which one ran. torchtitan 0.2.1
broke exactly this: varlen's packed (tokens, heads, head_dim) result went through the transpose meant for
sdpa's (batch, heads, seq, head_dim), and a later .view() hid the swap.

`meta` is built once per batch by `backend.build_meta(tokens, eos_id, device)` and passed to every layer; each
backend decides where to compute it (varlen on the host copy of the tokens, so its lengths need no device sync).
Document boundaries follow one rule for all backends (`document_ids`): a document ends with its EOS token
and the next token starts a new one.

On CPU, varlen has no kernel and flex no backward: those backends then run a reference with identical
semantics (math attention under the dense form of the very same mask), announced once in the log.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10 has no varlen attention; the backend then refuses to build
    varlen_attn = None

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flex", "varlen")
MASKS = ("causal", "document")


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, seq) index of the document each token belongs to; the token after an EOS starts a new one."""
    is_eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=1) - is_eos


@functools.cache
def _announce_cpu_reference(backend: str, why: str) -> None:
    log.info("attention: %s runs its CPU reference (%s); CUDA runs the real kernel", backend, why)


def _reference_attention(q, k, v, allowed, scale):
    """Math attention on (batch, heads, seq, head_dim) under a boolean mask `allowed` (True = attend)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


class SDPABackend:
    """F.scaled_dot_product_attention; the document mask is an explicit boolean mask (slower than causal)."""

    name = "sdpa"

    def __init__(self, mask: str):
        self.mask = mask

    def build_meta(self, tokens: torch.Tensor, eos_id: int, device=None) -> torch.Tensor | None:
        if self.mask == "causal":
            return None
        tokens = tokens.to(device or tokens.device)
        doc = document_ids(tokens, eos_id)
        seq = tokens.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
        return (doc[:, :, None] == doc[:, None, :]) & causal  # (batch, seq, seq)

    def __call__(self, q, k, v, meta, scale):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        if meta is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta[:, None], scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend:
    """flex_attention with a BlockMask; compiled on CUDA."""

    name = "flex"

    def __init__(self, mask: str):
        self.mask = mask

    def build_meta(self, tokens: torch.Tensor, eos_id: int, device=None) -> BlockMask:
        tokens = tokens.to(device or tokens.device)
        batch, seq = tokens.shape

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        if self.mask == "causal":
            return create_block_mask(causal, None, None, seq, seq, device=tokens.device)
        doc = document_ids(tokens, eos_id)

        def document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

        return create_block_mask(document, batch, None, seq, seq, device=tokens.device)

    def __call__(self, q, k, v, meta: BlockMask, scale):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        if q.device.type == "cpu":
            _announce_cpu_reference("flex", "flex_attention has no CPU backward")
            batch = q.shape[0] if meta.shape[0] > 1 else None
            allowed = create_mask(meta.mask_mod, batch, None, q.shape[2], k.shape[2], device=q.device)
            out = _reference_attention(q, k, v, allowed, scale)
        else:
            out = _compiled_flex_attention()(q, k, v, block_mask=meta, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)


@dataclass
class VarlenMeta:
    """Packed-sequence metadata: boundaries of each sequence in the flattened (batch*seq) token axis."""

    cu_seqlens: torch.Tensor  # int32, (num_sequences + 1,)
    max_seqlen: int


@functools.cache
def _varlen_keywords() -> frozenset[str]:
    # torch 2.11 takes window_size=(-1, 0) for causal and no enable_gqa; 2.13+ adds enable_gqa and needs it for GQA.
    return frozenset(inspect.signature(varlen_attn).parameters)


class VarlenBackend:
    """varlen_attn on packed tokens: (batch, seq, heads, head_dim) is viewed as (batch*seq, heads, head_dim)."""

    name = "varlen"

    def __init__(self, mask: str):
        if varlen_attn is None:
            raise RuntimeError(f"attention 'varlen' needs torch >= 2.10 (found {torch.__version__})")
        self.mask = mask

    def build_meta(self, tokens: torch.Tensor, eos_id: int, device=None) -> VarlenMeta:
        """Computed where `tokens` live: given the loader's host copy, max_seqlen needs no device-to-host sync."""
        batch, seq = tokens.shape
        device = device or tokens.device
        if self.mask == "causal":
            cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
            return VarlenMeta(cu, seq)
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = tokens[:, :-1] == eos_id
        begin = starts.flatten().nonzero().flatten()
        end = torch.tensor([batch * seq], dtype=begin.dtype, device=tokens.device)
        cu = torch.cat([begin, end]).to(torch.int32)
        max_seqlen = int((cu[1:] - cu[:-1]).max())  # a host sync only when tokens are on the device
        return VarlenMeta(cu.to(device, non_blocking=True), max_seqlen)

    def __call__(self, q, k, v, meta: VarlenMeta, scale):
        batch, seq, q_heads, head_dim = q.shape
        packed = [t.reshape(batch * seq, t.shape[2], head_dim) for t in (q, k, v)]
        if q.device.type == "cpu":
            _announce_cpu_reference("varlen", "varlen_attn has no CPU kernel")
            out = self._reference(*packed, meta, scale)
        else:
            out = varlen_attn(
                *packed, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                scale=scale, **self._causal_gqa_keywords(q_heads != k.shape[2]),
            )
        return out.view(batch, seq, q_heads, head_dim)

    @staticmethod
    def _causal_gqa_keywords(gqa: bool) -> dict:
        keywords = _varlen_keywords()
        extra = {"window_size": (-1, 0)} if "window_size" in keywords else {"is_causal": True}
        if gqa and "enable_gqa" in keywords:
            extra["enable_gqa"] = True
        return extra

    @staticmethod
    def _reference(q, k, v, meta: VarlenMeta, scale):
        """Causal attention within each [cu_seqlens[i], cu_seqlens[i+1]) span of the packed token axis."""
        tokens = q.shape[0]
        position = torch.arange(tokens, device=q.device)
        sequence = torch.searchsorted(meta.cu_seqlens.to(torch.int64), position, right=True)
        allowed = (sequence[:, None] == sequence[None, :]) & (position[:, None] >= position[None, :])
        out = _reference_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), allowed, scale)
        return out[0].transpose(0, 1)


_BACKEND_CLASSES = {cls.name: cls for cls in (SDPABackend, FlexBackend, VarlenBackend)}


def build_backend(attention: str, mask: str):
    if attention not in _BACKEND_CLASSES:
        raise ValueError(f"unknown attention backend {attention!r}; choose one of {', '.join(BACKENDS)}")
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS)}")
    return _BACKEND_CLASSES[attention](mask)
