"""Fixtures shared by the test suite: packed token batches, a float64 attention reference written from scratch,
and a way to make RMSNorm weights informative."""

from __future__ import annotations

import pytest
import torch

from recipes.qwen3.attention import build_backend


def _allowed(tokens: torch.Tensor, eos_id: int, mask: str) -> torch.Tensor:
    """(batch, seq, seq) bool, True where query i may attend key j; the document rule spelled out as a loop."""
    batch, seq = tokens.shape
    allowed = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for row in range(batch):
        start = 0
        for i, token in enumerate(tokens[row].tolist()):
            allowed[row, i, (start if mask == "document" else 0) : i + 1] = True
            if token == eos_id:
                start = i + 1  # the token after an EOS starts the next document
    return allowed


class ReferenceAttention:
    """Naive float64 attention behind the same contract as recipes.qwen3.attention's backends."""

    def __init__(self, mask: str):
        self.mask = mask

    def build_meta(self, tokens: torch.Tensor, eos_id: int, device=None) -> torch.Tensor:
        return _allowed(tokens.cpu(), eos_id, self.mask).to(device or tokens.device)

    def __call__(self, q, k, v, allowed, scale):
        """q (batch, seq, q_heads, head_dim), k/v (batch, seq, kv_heads, head_dim) -> like q, in float64."""
        q, k, v = (t.double() for t in (q, k, v))
        group = q.shape[2] // k.shape[2]  # query head h reads kv head h // group
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.fixture
def reference_attention():
    """ReferenceAttention(mask): build_meta(tokens, eos_id, device) -> dense mask; __call__(q, k, v, meta, scale)."""
    return ReferenceAttention


@pytest.fixture
def backend_and_reference():
    """run(backend_name, mask, tokens, eos_id, q, k, v, grad_out, scale) -> (out, expected, grads): the backend's
    output and the float64 reference's for the same inputs, both after backward(grad_out); grads lists
    (name, backend grad, reference grad) for q, k and v."""

    def run(backend_name, mask, tokens, eos_id, q, k, v, grad_out, scale):
        backend = build_backend(backend_name, mask)
        out = backend(q, k, v, backend.build_meta(tokens, eos_id), scale)
        out.backward(grad_out)
        reference = ReferenceAttention(mask)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = reference(q64, k64, v64, reference.build_meta(tokens, eos_id), scale)
        expected.backward(grad_out.double())
        return out, expected, [(name, got.grad, want.grad) for name, got, want in (("q", q, q64), ("k", k, k64),
                                                                                   ("v", v, v64))]

    return run


@pytest.fixture
def packed_tokens():
    """make(seq, vocab, eos_id, seed=0) -> (3, seq) int64 token ids: row 0 holds documents of odd lengths
    (one of length 1), row 1 starts and ends with an EOS, row 2 has no EOS at all."""

    def make(seq: int, vocab: int, eos_id: int, seed: int = 0) -> torch.Tensor:
        assert seq >= 32
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (3, seq), generator=generator)
        tokens[tokens == eos_id] = (eos_id + 1) % vocab
        tokens[0, [4, 11, 12, 27]] = eos_id
        tokens[1, [0, 20, seq - 1]] = eos_id
        return tokens

    return make


@pytest.fixture(scope="session")
def randomize_norms():
    """randomize_norms(model): RMSNorm weights start at one, where a norm applied in the wrong place goes unseen."""

    @torch.no_grad()
    def randomize(model: torch.nn.Module, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))

    return randomize


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """The environment for train.py processes, with the default tokenizer and tokenized corpus built once per
    test session (tests/train_process.py says what else it sets)."""
    from train_process import train_env as make_env

    base = tmp_path_factory.mktemp("train-env")
    return make_env(base / "recipes-cache", base / "wandb-home")
