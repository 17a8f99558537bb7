"""Qwen3 dense decoder, written to be read beside the Qwen3 report and HF's modeling_qwen3.

Parameter names follow torchtitan's Qwen3 (tok_embeddings, layers.N.attention.wq, ...), so a torchtitan state
dict loads into this model and back; recipes.qwen3.hf maps them to Hugging Face names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from recipes.qwen3.attention import build_backend
from recipes.qwen3.loss import linear_cross_entropy


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 151936
    dim: int = 1024
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 3072
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 40960  # Qwen3's max_position_embeddings
    tie_embeddings: bool = True
    attention: str = "sdpa"  # sdpa | flex | varlen
    mask: str = "document"  # causal | document; the recipe's default too (config.ModelConfig.mask)
    kernel: str = "auto"  # varlen's kernel: auto | torch | fa4
    eos_id: int = 151643  # <|endoftext|>; written to an HF export only (the loader says where documents begin)


# The published Qwen3 dense shapes (Qwen3 technical report, Table 1; HF config.json of each model).
FLAVORS: dict[str, Qwen3Config] = {
    "debug": Qwen3Config(
        vocab_size=2048, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384, max_seq_len=2048
    ),
    # Not a published shape: ~30M parameters, for comparing backends on a few GPUs in minutes.
    "small": Qwen3Config(
        vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, hidden_dim=1536, max_seq_len=8192
    ),
    "0.6B": Qwen3Config(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072),
    "1.7B": Qwen3Config(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=6144),
    "4B": Qwen3Config(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=9728),
    "8B": Qwen3Config(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=12288, tie_embeddings=False),
    "14B": Qwen3Config(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, hidden_dim=17408, tie_embeddings=False),
    "32B": Qwen3Config(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, hidden_dim=25600, tie_embeddings=False),
}


def flavor_config(flavor: str, **overrides) -> Qwen3Config:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    return replace(FLAVORS[flavor], **overrides)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """The tensor this process holds of `param` and which rows of the whole it is (FSDP2 shards dim 0)."""
    if not isinstance(param, DTensor):
        return param, slice(None)
    local = param.to_local()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return local, slice(offset[0], offset[0] + local.shape[0])


def _normal_(param: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """normal(0, std) with the same numbers whether `param` is whole or an FSDP shard (a DTensor, whose local rows
    are cut from the whole draw), so initialisation does not depend on the world size."""
    if not isinstance(param, DTensor):
        nn.init.normal_(param, std=std, generator=generator)
        return
    local, rows = local_rows(param)
    whole = torch.empty(param.shape, dtype=local.dtype, device=local.device).normal_(0, std, generator=generator)
    local.copy_(whole[rows])


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """(max_seq_len, 2, head_dim) cos and sin in float32, in the rotate-half layout of Qwen3/HF."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); rotates each half-pair by its position's angle."""
    cos, sin = (cache[: x.shape[1], i, None, :].to(x.dtype) for i in (0, 1))
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, backend):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        self.backend = backend
        self.scale = config.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope: torch.Tensor, meta) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_norm(self.wq(x).view(batch, seq, self.n_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        out = self.backend(apply_rope(q, rope), apply_rope(k, rope), v, meta, self.scale)
        return self.wo(out.reshape(batch, seq, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); HF calls w1 gate_proj, w3 up_proj, w2 down_proj."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: Qwen3Config, backend):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config, backend)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, meta) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, meta)
        return x + self.feed_forward(self.ffn_norm(x))


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.backend = build_backend(config.attention, config.mask, config.kernel)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config, self.backend) for i in range(config.n_layers)})
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer(
            "rope", rope_cache(config.head_dim, config.max_seq_len, config.rope_theta), persistent=False
        )
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter and buffer in place (also after building on the meta device).

        Scheme: normal(0.02) for inputs, depth-scaled std 0.02/sqrt(2*(layer+1)) for residual outputs,
        1/sqrt(dim) for an untied output head, ones for norms.
        """
        generator = None if seed is None else torch.Generator(self.rope.device).manual_seed(seed)
        self.rope.copy_(
            rope_cache(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta, device=self.rope.device)
        )
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.reset_parameters()
        _normal_(self.tok_embeddings.weight, 0.02, generator)
        if not self.config.tie_embeddings:
            _normal_(self.output.weight, self.config.dim**-0.5, generator)
        for index, layer in enumerate(self.layers.values()):
            residual_std = 0.02 / math.sqrt(2 * (index + 1))
            for linear in (
                layer.attention.wq,
                layer.attention.wk,
                layer.attention.wv,
                layer.feed_forward.w1,
                layer.feed_forward.w3,
            ):
                _normal_(linear.weight, 0.02, generator)
            for linear in (layer.attention.wo, layer.feed_forward.w2):
                _normal_(linear.weight, residual_std, generator)

    def attention_meta(self, document_starts: torch.Tensor, device: torch.device | None = None):
        """The attention backend's metadata for a batch, shared by every layer: `document_starts` (batch, seq) bool
        marks the tokens that begin a document (from the loader, which packed them). Built on `device` (default
        the starts'); pass the loader's host copy with the training device: varlen then needs no device sync."""
        return self.backend.attention_meta(document_starts, device)

    def forward(self, tokens: torch.Tensor, meta=None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); with labels (batch, seq), the summed cross-entropy
        over the labels that are not IGNORE_INDEX instead, without ever holding the whole logits. The loss is
        taken here, where FSDP has gathered the output weight. Without `meta`, each row is one document."""
        if meta is None:
            meta = self.attention_meta(torch.zeros_like(tokens, dtype=torch.bool))
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.rope, meta)
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        return linear_cross_entropy(h.flatten(0, 1), self.output.weight, labels.flatten())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_embeddings.weight.numel() if exclude_embeddings else total
