"""Attention backends behind one layout contract.

    backend(q, k, v, meta, scale) -> out
    q:   (batch, seq, q_heads, head_dim)
    k,v: (batch, seq, kv_heads, head_dim)
    out: (batch, seq, q_heads, head_dim)

Every backend converts to its kernel's layout inside itself and back before it returns, so the model
reshapes the output the same way for every backend and never branches on which one ran. torchtitan 0.2.1
broke exactly this: varlen's packed (tokens, heads, head_dim) result went through the transpose meant for
sdpa's (batch, heads, seq, head_dim), and a later .view() hid the swap.

`meta` is built once per batch by `backend.attention_meta(document_starts, device)` and passed to every layer.
`document_starts` (batch, seq) bool marks the tokens that begin a document: the loader, which packed the
documents, is its one source (no backend looks for EOS ids). A row's first token always begins a span. Each
backend decides where to compute its metadata (varlen on the host copy, so its lengths need no device sync).

The varlen backend has a choice of kernel (`KERNELS`): "torch" (torch's varlen_attn, FlashAttention-2), "fa4"
(FlashAttention-4, recipes.qwen3.fa4; Hopper and Blackwell) or "auto" (fa4 where it can run, else torch), decided
per device at the first call and logged once. sdpa and flex have one kernel each and accept only "auto".

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

from recipes.qwen3 import fa4

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10 has no varlen attention; the backend then refuses to build
    varlen_attn = None

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flex", "varlen")
MASKS = ("causal", "document")
KERNELS = ("auto", "torch", "fa4")


def to_device(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A host tensor on `device`, from pinned memory without waiting: a copy from pageable memory can make the host
    wait for every kernel queued before it, so the GPU would idle while the host launches the next work."""
    if device is None or device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device or tensor.device)
    return tensor.pin_memory().to(device, non_blocking=True)


def document_ids(document_starts: torch.Tensor) -> torch.Tensor:
    """(batch, seq) index of the document each token belongs to, counted along its row."""
    return torch.cumsum(document_starts.to(torch.int32), dim=1)


def packed_offsets(document_starts: torch.Tensor) -> torch.Tensor:
    """int64 offsets of the spans attention runs over under the document mask, in the flattened (batch*seq)
    token axis, with the total at the end: each row cut where a document begins, and at the row's start."""
    starts = document_starts.clone()
    starts[:, 0] = True
    begin = starts.flatten().nonzero().flatten()
    return torch.cat([begin, torch.tensor([starts.numel()], device=begin.device)])


# The kernel outputs that selective activation checkpointing saves (recipes/build.py): every backend's.
ATTENTION_OPS = frozenset(
    op
    for op in (
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops.aten._scaled_dot_product_attention_math.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,  # the CPU references
        torch._higher_order_ops.flex_attention,
        getattr(getattr(torch.ops.torch_attn, "_varlen_attn", None), "default", None),  # varlen_attn (torch >= 2.10)
        torch.ops.qwen3_fa4.forward.default,
    )
    if op is not None
)


@functools.cache
def _announce_cpu_reference(backend: str, why: str) -> None:
    log.info("attention: %s runs its CPU reference (%s); CUDA runs the real kernel", backend, why)


def _reference_attention(q, k, v, allowed, scale):
    """Math attention on (batch, heads, seq, head_dim) under a boolean mask `allowed` (True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class SDPABackend:
    """F.scaled_dot_product_attention; the document mask is an explicit boolean mask (slower than causal)."""

    name = "sdpa"

    def __init__(self, mask: str):
        self.mask = mask

    def attention_meta(self, document_starts: torch.Tensor, device=None) -> torch.Tensor | None:
        if self.mask == "causal":
            return None
        doc = document_ids(to_device(document_starts, device))
        seq = doc.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=doc.device).tril()
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

    def attention_meta(self, document_starts: torch.Tensor, device=None) -> BlockMask:
        device = device or document_starts.device
        batch, seq = document_starts.shape

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        if self.mask == "causal":
            return create_block_mask(causal, None, None, seq, seq, device=device)
        doc = document_ids(to_device(document_starts, device))

        def document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

        return create_block_mask(document, batch, None, seq, seq, device=device)

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


# Called inside compiled blocks: dynamo runs it while tracing and keeps the result as a constant, so the import, log
# and error stay out of the graph (tracing them would break fullgraph=True). The cache sits on a second function
# because dynamo traces through functools.cache wrappers instead of calling them.
@torch.compiler.assume_constant_result
def _varlen_uses_fa4(kernel: str, device: torch.device) -> bool:
    return _resolve_varlen_kernel(kernel, device)


@functools.cache
def _resolve_varlen_kernel(kernel: str, device: torch.device) -> bool:
    """Whether varlen runs FA4 on `device`: decided and logged once per (kernel, device)."""
    reason = fa4.unavailable_reason(device)
    if kernel == "fa4" and reason:
        raise RuntimeError(f"model.kernel = 'fa4' cannot run on {device}: {reason}; use 'torch' or 'auto'")
    uses_fa4 = kernel != "torch" and reason is None
    why = f"model.kernel = {kernel!r}" + (f"; FA4 cannot run: {reason}" if kernel == "auto" and reason else "")
    log.info(
        "attention: varlen runs %s on %s (%s)",
        "FlashAttention-4" if uses_fa4 else "torch's varlen_attn (FA2)",
        device,
        why,
    )
    return uses_fa4


@functools.cache
def _varlen_keywords() -> frozenset[str]:
    # torch 2.11 takes window_size=(-1, 0) for causal and no enable_gqa; 2.13+ adds enable_gqa and needs it for GQA.
    return frozenset(inspect.signature(varlen_attn).parameters)


class VarlenBackend:
    """Varlen attention on packed tokens: (batch, seq, heads, head_dim) is viewed as (batch*seq, heads, head_dim).
    `kernel` (KERNELS) picks torch's varlen_attn or FlashAttention-4; the backend is built before the model moves
    to its device, so the choice is made per device at the first call."""

    name = "varlen"

    def __init__(self, mask: str, kernel: str = "auto"):
        if varlen_attn is None:
            raise RuntimeError(f"attention 'varlen' needs torch >= 2.10 (found {torch.__version__})")
        self.mask = mask
        self.kernel = kernel

    def attention_meta(self, document_starts: torch.Tensor, device=None) -> VarlenMeta:
        """Computed where `document_starts` live: given the loader's host copy, max_seqlen needs no device sync."""
        batch, seq = document_starts.shape
        device = device or document_starts.device
        if self.mask == "causal":
            cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
            return VarlenMeta(cu, seq)
        cu = packed_offsets(document_starts).to(torch.int32)
        max_seqlen = int((cu[1:] - cu[:-1]).max())  # a host sync only when the starts are on the device
        return VarlenMeta(to_device(cu, device), max_seqlen)

    def __call__(self, q, k, v, meta: VarlenMeta, scale):
        batch, seq, q_heads, head_dim = q.shape
        packed = [t.reshape(batch * seq, t.shape[2], head_dim) for t in (q, k, v)]
        if q.device.type == "cpu":
            _announce_cpu_reference("varlen", "varlen_attn has no CPU kernel")
            out = self._reference(*packed, meta, scale)
        elif _varlen_uses_fa4(self.kernel, q.device):
            out = fa4.varlen_attention(*packed, meta.cu_seqlens, meta.max_seqlen, scale)
        else:
            out = varlen_attn(
                *packed,
                meta.cu_seqlens,
                meta.cu_seqlens,
                meta.max_seqlen,
                meta.max_seqlen,
                scale=scale,
                **self._causal_gqa_keywords(q_heads != k.shape[2]),
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


def build_backend(attention: str, mask: str, kernel: str = "auto"):
    if attention not in _BACKEND_CLASSES:
        raise ValueError(f"unknown attention backend {attention!r}; choose one of {', '.join(BACKENDS)}")
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown model.kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if attention == "varlen":
        return VarlenBackend(mask, kernel)
    if kernel != "auto":
        raise ValueError(f"model.kernel = {kernel!r} chooses among varlen's kernels; {attention} takes only 'auto'")
    return _BACKEND_CLASSES[attention](mask)
