"""Validation loss on the held-out documents: during training at [eval] interval, and in scripts/eval_matrix.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from recipes.data import Batch
from recipes.qwen3.loss import mean_loss


@torch.no_grad()
def validation_loss(model, batches: list[Batch], device: torch.device, micro_rows: int | None = None) -> float:
    """Mean loss per counted label over `batches` (each this rank's rows of one held-out step), over all ranks;
    run `micro_rows` rows at a time (training's micro-batch, so evaluation fits where training does)."""
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        for micro in batch.split(micro_rows or batch.inputs.shape[0]):
            meta = model.attention_meta(micro.document_starts, device)
            micro = micro.to(device)
            loss += model(micro.inputs, meta, micro.labels).double()
    if dist.is_initialized():
        dist.all_reduce(loss)
    return mean_loss(loss, sum(batch.global_labels for batch in batches)).item()
