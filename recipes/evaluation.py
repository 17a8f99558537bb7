"""Validation loss on the held-out documents: during training at [eval] interval, and in scripts/eval_matrix.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from recipes.data import Batch


@torch.no_grad()
def validation_loss(model, batches: list[Batch], device: torch.device) -> float:
    """Mean loss per counted label over `batches` (each this rank's rows of one held-out step), over all ranks."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, label count
    for batch in batches:
        meta = model.attention_meta(batch.document_starts, device)
        totals[0] += model(batch.inputs.to(device), meta, batch.labels.to(device)).double()
        totals[1] += batch.count_labels()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()
