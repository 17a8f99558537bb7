"""Cross-entropy of `hidden @ weight.T` that never holds the whole (tokens, vocab) logits.

The forward walks the tokens in chunks; for each chunk it takes the logits (one matmul), the float32
log-sum-exp and loss, and at once the gradient of the loss w.r.t. those logits (softmax - one-hot), which it
turns into this chunk's rows of grad_hidden and a float32 running sum of grad_weight (two more matmuls). Backward
only scales those two by grad_output. That is the three matmuls of a plain forward+backward, no recompute, and
memory O(tokens*dim + vocab*dim + chunk*vocab) instead of the O(tokens*vocab) logits saved for backward.

Our own code rather than a library: on an H200 at 24,576 tokens it took 41.4 ms against cut-cross-entropy
25.1.1's 45.6 (which also filters small gradients by default: 2.0e-2 / 8.3e-3 relative difference of the hidden /
weight gradients against float32, ours 1.7e-3) and liger-kernel 0.8.5's 77.3; Liger's SM90 CuTe kernel refuses
Qwen3's vocabulary, and quack-kernels 0.6.5 does not import beside nvidia-cutlass-dsl 4.8.1 (docs/results.md
section 5).

The one rule for averaging it lives here too (`counted_labels`, `mean_loss`): training and evaluation both take
the sum over the counted labels and divide by their number over all ranks and micro-batches.

This module imports only torch: the model package stays self-contained, and the model's forward calls it (under
FSDP2 the output weight is gathered only inside the root module's forward).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Tokens per chunk. A chunk's bfloat16 logits and their gradient exist together: 2 * 4096 * 151,936 * 2 bytes
# = 2.5 GB at Qwen3's vocab (float32 logits are never stored). Measured on an H200 (hidden 1024, fwd+bwd, 65,536
# tokens; benchmarks/loss.py --chunks): 2048 -> 118.8 ms / 2.6 GiB, 4096 -> 113.4 ms / 4.3 GiB, 8192 -> 113.2 ms /
# 7.8 GiB, against 115.6 ms / 37.1 GiB for the whole logits: smaller chunks are slower (thinner matmuls, and each
# chunk re-adds the float32 grad_weight), larger ones cost memory and buy no speed.
CHUNK_TOKENS = 4096
IGNORE_INDEX = -100  # a label the loss skips (F.cross_entropy's default)


def counted_labels(labels) -> int:
    """How many labels the loss counts: those that are not IGNORE_INDEX (a tensor or a numpy array)."""
    return int((labels != IGNORE_INDEX).sum())


def mean_loss(loss_sum: Tensor, counted: int) -> Tensor:
    """The loss is the mean over the counted labels: `loss_sum` (a part of the summed loss: one micro-batch on one
    rank, or a whole evaluation) divided by `counted`, the labels counted in the whole step or evaluation, over
    every rank (the loader counts them; every rank reads the whole global batch). The parts then add up to the
    mean, so gradients are summed over ranks, not averaged (FSDP's divide factor 1: recipes/build.py), and no world
    size enters. Multiplied by the reciprocal: the bits training has always had."""
    return loss_sum * (1.0 / counted)


def _chunk_loss_and_grad(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Summed float32 cross-entropy of `logits` (chunk, vocab) against `labels`, and its gradient w.r.t. the
    logits, softmax - one-hot (zero rows where the label is ignored), in the logits' dtype. Compiled, this is one
    kernel (log-sum-exp and gradient row by row); writing the gradient over `logits` in place measured slower on an
    H200 (two kernels, 31 instead of 24 ms a step at 65,536 tokens), so the chunk's logits and gradient coexist."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    valid = (labels != ignore_index)[:, None]
    target = torch.where(valid, labels[:, None], 0)
    loss = torch.where(valid, lse - x.gather(1, target), 0.0).sum()
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == target
    grad = torch.where(valid, torch.exp(x - lse) - one_hot.float(), 0.0)
    return loss, grad.to(logits.dtype)


def _chunk_loss(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The loss alone (evaluation): summed float32 cross-entropy of `logits` against `labels`."""
    x = logits.float()
    valid = (labels != ignore_index)[:, None]
    target = torch.where(valid, labels[:, None], 0)
    return torch.where(valid, torch.logsumexp(x, dim=-1, keepdim=True) - x.gather(1, target), 0.0).sum()


def _scale_to(grad: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (grad * scale).to(dtype)


_compiled: dict = {}


def _kernel(fn):
    """`fn` compiled with torch.compile on CUDA (one fused pass over the chunk instead of a dozen eager ones);
    eager elsewhere, where compiling would cost more than it saves (CPU tests stay seconds long)."""

    def call(*args):
        if args[0].device.type != "cuda":
            return fn(*args)
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn)
        return _compiled[fn](*args)

    return call


chunk_loss_and_grad = _kernel(_chunk_loss_and_grad)
chunk_loss = _kernel(_chunk_loss)
scale_to = _kernel(_scale_to)


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out (float32) = a @ b, or += a @ b with `accumulate`. On CUDA the product goes into out straight from
    cuBLAS's float32 accumulators (out_dtype); on CPU a low-precision product is rounded to a's dtype first."""
    beta = 1 if accumulate else 0  # beta=0: out's old contents (torch.empty's) are ignored, NaN included
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, out=out)
    elif out.is_cuda:
        torch.addmm(out, a, b, out_dtype=out.dtype, beta=beta, out=out)
    elif accumulate:
        out += a @ b
    else:
        out.copy_(a @ b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, n, chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = h @ weight.t()  # (chunk, vocab) in the inputs' dtype
            part, grad = chunk_loss_and_grad(logits, y, ignore_index)  # grad: d loss / d logits
            loss += part
            if need_hidden:
                _mm_into(grad_hidden[start : start + chunk], grad, weight, accumulate=False)
            if need_weight:
                _mm_into(grad_weight, grad.t(), h, accumulate=True)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = scale_to(grad_hidden, grad_output, ctx.dtypes[0])
        if grad_weight is not None:
            grad_weight = scale_to(grad_weight, grad_output, ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None
) -> Tensor:
    """SUM over the labels != ignore_index of the cross-entropy of `hidden @ weight.T`, as a float32 scalar:
    F.cross_entropy(logits.float(), labels, reduction="sum") without the logits; `mean_loss` averages it.

    hidden (N, dim) and weight (vocab, dim) in one dtype, the matmuls' (bfloat16 in training); labels (N,)
    int64. Softmax and log-sum-exp in float32; gradients accumulate in float32 and come back in the inputs'
    dtypes. `chunk_tokens` (default CHUNK_TOKENS) sets how many rows of logits exist at a time.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
            f"labels {tuple(labels.shape)} must be (N, dim), (vocab, dim) and (N,)"
        )
    chunk = chunk_tokens or CHUNK_TOKENS
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)  # evaluation: no gradient work
    for start in range(0, hidden.shape[0], chunk):
        loss += chunk_loss(hidden[start : start + chunk] @ weight.t(), labels[start : start + chunk], ignore_index)
    return loss
