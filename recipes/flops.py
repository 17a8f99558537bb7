"""FLOPs and MFU: useful training FLOPs (the attention the mask lets through, counted from the loader's document
starts) and torchtitan's convention, per throughput window."""

from __future__ import annotations

import time

import torch

from recipes.qwen3.attention import packed_offsets
from recipes.qwen3.model import Qwen3Config

# Dense bf16 peak, per GPU, from the vendors' datasheets (without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def attended_pairs(document_starts: torch.Tensor, mask: str) -> int:
    """(query, key) pairs the mask lets attention compute, summed over the rows."""
    rows, seq = document_starts.shape
    if mask == "causal":
        return rows * seq * (seq + 1) // 2
    lengths = torch.diff(packed_offsets(document_starts))
    return int((lengths * (lengths + 1) // 2).sum())


def train_flops(config: Qwen3Config, non_embedding_params: int, tokens: int, pairs: int) -> float:
    """Useful training FLOPs (forward + backward = 3x forward): 6 per parameter per token for the matmuls, and
    4·heads·head_dim per attended (query, key) pair and layer for QK^T and PV, times 3."""
    return 6.0 * non_embedding_params * tokens + 12.0 * config.n_layers * config.n_heads * config.head_dim * pairs


def torchtitan_flops(config: Qwen3Config, non_embedding_params: int, tokens: int, seq_len: int) -> float:
    """torchtitan's convention: every token attends to the full seq_len (no causal halving, no documents)."""
    return (6.0 * non_embedding_params + 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len) * tokens


class ThroughputWindow:
    """Tokens, useful FLOPs and torchtitan-convention FLOPs since the last log line, and the seconds they took."""

    def __init__(self, config: Qwen3Config, non_embedding_params: int, seq_len: int):
        self.config, self.non_embedding_params, self.seq_len = config, non_embedding_params, seq_len
        self.reset()

    def reset(self) -> None:
        self.tokens, self.flops, self.torchtitan_flops = 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, batch) -> None:
        tokens = batch.inputs.numel()
        pairs = attended_pairs(batch.document_starts, self.config.mask)
        self.tokens += tokens
        self.flops += train_flops(self.config, self.non_embedding_params, tokens, pairs)
        self.torchtitan_flops += torchtitan_flops(self.config, self.non_embedding_params, tokens, self.seq_len)

    def rates(self, peak: float | None) -> dict:
        """tokens/s per GPU and both MFUs (None without a known peak) over the window; then starts a new window."""
        seconds = time.perf_counter() - self.start
        rates = {
            "tokens_per_sec_per_gpu": self.tokens / seconds,
            "mfu": self.flops / seconds / peak if peak else None,
            "mfu_torchtitan": self.torchtitan_flops / seconds / peak if peak else None,
        }
        self.reset()
        return rates
