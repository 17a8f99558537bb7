"""A deliberate bug, to prove that the backend-agreement checks would catch torchtitan 0.2.1's varlen mistake.

Diagnostic only: used by tests and scripts/eval_matrix.py, never reachable from a training config.
"""

from __future__ import annotations

import torch

from recipes.qwen3.model import Qwen3Model


class _VarlenLayoutMistake:
    """Wraps a varlen backend: its packed (tokens, heads, head_dim) output is read as (tokens, head_dim, heads).

    That is what torchtitan 0.2.1 did by applying sdpa's transpose(1, 2) to varlen's packed output; the later
    .view() to (batch, seq, heads * head_dim) hid the swap, so each token's vector came out head_dim-major.
    """

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, q, k, v, meta, scale) -> torch.Tensor:
        out = self.backend(q, k, v, meta, scale)
        batch, seq, heads, head_dim = out.shape
        packed = out.reshape(batch * seq, heads, head_dim)
        return packed.transpose(1, 2).reshape(batch, seq, heads, head_dim)


def inject_varlen_layout_mistake(model: Qwen3Model) -> Qwen3Model:
    """Make every layer's varlen attention permute its output as torchtitan 0.2.1 did; returns the model."""
    if model.config.attention != "varlen":
        raise ValueError(f"the layout mistake was varlen's; this model uses {model.config.attention!r}")
    for layer in model.layers.values():
        layer.attention.backend = _VarlenLayoutMistake(layer.attention.backend)
    return model
