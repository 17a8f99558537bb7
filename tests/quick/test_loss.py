"""recipes.qwen3.loss.linear_cross_entropy against F.cross_entropy on the whole logits (CPU, small chunks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recipes.qwen3.loss as loss_module
from recipes.qwen3.loss import linear_cross_entropy

CHUNK = 16  # small, so that every test walks several chunks


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _inputs(n: int, dim: int, vocab: int, dtype=torch.float32, ignore_every: int = 0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=generator)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels, scale: float = 1.0):
    """Loss, grad_hidden and grad_weight of the plain path, in float32 on the whole logits."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("n", [37, 64])  # 37: the last chunk is partial
def test_matches_cross_entropy_with_ignored_labels(n):
    hidden, weight, labels = _inputs(n, dim=24, vocab=300, ignore_every=3)
    labels[:CHUNK] = -100  # a whole chunk with nothing to learn from
    scale = 0.37  # what the caller multiplies by (1 / global label count); backward must apply it
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=CHUNK)
    (loss * scale).backward()
    want_loss, want_hidden, want_weight = _reference(hidden, weight, labels, scale)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    assert _relative_error(hidden.grad, want_hidden) <= 1e-5
    assert _relative_error(weight.grad, want_weight) <= 1e-5
    assert torch.all(hidden.grad[labels == -100] == 0)  # ignored rows send no gradient back
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def test_sum_not_mean_and_all_ignored_is_zero():
    hidden, weight, labels = _inputs(40, dim=8, vocab=50)
    per_token = F.cross_entropy(hidden.detach() @ weight.detach().t(), labels, reduction="none")
    assert linear_cross_entropy(hidden, weight, labels, chunk_tokens=CHUNK).item() == pytest.approx(
        per_token.sum().item(), rel=1e-5
    )
    ignored = torch.full_like(labels, -100)
    loss = linear_cross_entropy(hidden, weight, ignored, chunk_tokens=CHUNK)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_default_chunk_is_a_module_constant_and_logits_stay_chunked(monkeypatch):
    """Each call of the per-chunk kernel sees at most CHUNK_TOKENS rows, and together they cover every token once."""
    rows = []
    kernel = loss_module.chunk_loss_and_grad

    def recording(logits, labels, ignore_index):
        rows.append(logits.shape[0])
        return kernel(logits, labels, ignore_index)

    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 10)
    monkeypatch.setattr(loss_module, "chunk_loss_and_grad", recording)
    hidden, weight, labels = _inputs(45, dim=8, vocab=70)
    linear_cross_entropy(hidden, weight, labels).backward()
    assert rows == [10, 10, 10, 10, 5]
    assert _relative_error(weight.grad, _reference(hidden, weight, labels)[2]) <= 1e-5


def test_tied_embedding_gets_both_gradients():
    """One nn.Embedding table for the lookup and as the output weight: its gradient is the sum of both uses."""
    vocab, dim, n = 90, 16, 50
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    proj = torch.randn(dim, dim, generator=generator) * 0.5

    def grad_of_table(loss_fn):
        torch.manual_seed(0)
        embedding = nn.Embedding(vocab, dim)
        hidden = torch.tanh(embedding(tokens) @ proj)
        loss_fn(hidden, embedding.weight).backward()
        return embedding.weight.grad

    ours = grad_of_table(lambda h, w: linear_cross_entropy(h, w, labels, chunk_tokens=CHUNK))
    plain = grad_of_table(lambda h, w: F.cross_entropy(h @ w.t(), labels, reduction="sum"))
    output_only = grad_of_table(lambda h, w: F.cross_entropy(h.detach() @ w.t(), labels, reduction="sum"))
    assert _relative_error(ours, plain) <= 1e-5
    assert _relative_error(output_only, plain) > 0.05  # the lookup's share is large enough to be missed


def test_evaluation_does_no_gradient_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("gradient work during evaluation")

    monkeypatch.setattr(loss_module, "chunk_loss_and_grad", refuse)
    monkeypatch.setattr(loss_module, "_mm_into", refuse)
    hidden, weight, labels = _inputs(37, dim=12, vocab=100, ignore_every=4)
    want = _reference(hidden, weight, labels)[0]
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=CHUNK)
    frozen = linear_cross_entropy(hidden.detach(), weight.detach(), labels, chunk_tokens=CHUNK)  # grad mode on
    for got in (loss, frozen):
        assert not got.requires_grad and got.dtype == torch.float32
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_frozen_hidden_trains_weight_only():
    hidden, weight, labels = _inputs(37, dim=12, vocab=100)
    linear_cross_entropy(hidden.detach(), weight, labels, chunk_tokens=CHUNK).backward()
    assert hidden.grad is None
    assert _relative_error(weight.grad, _reference(hidden, weight, labels)[2]) <= 1e-5


def test_bfloat16_inputs_give_a_float32_loss_close_to_float32():
    hidden, weight, labels = _inputs(53, dim=32, vocab=257, dtype=torch.bfloat16, ignore_every=5)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=CHUNK)
    loss.backward()
    want_loss, want_hidden, want_weight = _reference(hidden, weight, labels)  # same bf16 values, in float32

    assert loss.dtype == torch.float32
    assert abs(loss.item() - want_loss.item()) <= 2e-3 * abs(want_loss.item())
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert _relative_error(hidden.grad, want_hidden) <= 1e-2
    assert _relative_error(weight.grad, want_weight) <= 1e-2


def test_rejects_mismatched_shapes():
    hidden, weight, labels = _inputs(8, dim=4, vocab=10)
    with pytest.raises(ValueError, match="must be"):
        linear_cross_entropy(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="must be"):
        linear_cross_entropy(hidden, weight, labels[:5])
