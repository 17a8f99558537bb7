"""Deliberate bugs, to prove that the backend-agreement checks catch the mistakes an attention backend can make.

Diagnostic only: used by tests, scripts/eval_matrix.py and the GPU proof, never reachable from a training config.
Each mutation rewires a built model in place and leaves its weights alone:
- "layout": torchtitan 0.2.1's varlen output layout (varlen only);
- "leak": a document mask that leaks across documents (the backend runs plain causal when asked for "document");
- "scale": the softmax scale applied twice (q is scaled before a kernel that scales again).
"""

from __future__ import annotations

import torch

from recipes.qwen3.attention import build_backend
from recipes.qwen3.model import Qwen3Model


class _VarlenLayoutMistake:
    """Wraps a varlen backend: its packed (tokens, heads, head_dim) output is read as (tokens, head_dim, heads).

    That is what torchtitan 0.2.1 did by applying sdpa's transpose(1, 2) to varlen's packed output; the later
    .view() to (batch, seq, heads * head_dim) hid the swap, so each token's vector came out head_dim-major.
    """

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, q, k, v, meta, scale) -> torch.Tensor:
        out_BLNH = self.backend(q, k, v, meta, scale)
        batch, seq, heads, head_dim = out_BLNH.shape
        packed = out_BLNH.reshape(batch * seq, heads, head_dim)
        return packed.transpose(1, 2).reshape(batch, seq, heads, head_dim)


class _ScaleAppliedTwice:
    """Wraps a backend: q arrives already multiplied by the softmax scale, and the kernel scales the scores again."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, q, k, v, meta, scale) -> torch.Tensor:
        return self.backend(q * scale, k, v, meta, scale)


def inject_varlen_layout_mistake(model: Qwen3Model) -> Qwen3Model:
    """Make every layer's varlen attention permute its output as torchtitan 0.2.1 did; returns the model."""
    if model.config.attention != "varlen":
        raise ValueError(f"the layout mistake was varlen's; this model uses {model.config.attention!r}")
    for layer in model.layers.values():
        layer.attention.backend = _VarlenLayoutMistake(layer.attention.backend)
    return model


def inject_document_mask_leak(model: Qwen3Model) -> Qwen3Model:
    """Make the model's backend build plain causal metadata (and so attend across documents) under the document
    mask; returns the model."""
    if model.config.mask != "document":
        raise ValueError(f"a document mask can only leak under mask 'document'; this model uses {model.config.mask!r}")
    causal = build_backend(model.config.attention, "causal", model.config.kernel)
    model.backend = causal
    for layer in model.layers.values():
        layer.attention.backend = causal
    return model


def inject_scale_applied_twice(model: Qwen3Model) -> Qwen3Model:
    """Make every layer's attention scale its scores twice; returns the model."""
    for layer in model.layers.values():
        layer.attention.backend = _ScaleAppliedTwice(layer.attention.backend)
    return model


MUTATIONS = {
    "layout": inject_varlen_layout_mistake,
    "leak": inject_document_mask_leak,
    "scale": inject_scale_applied_twice,
}
