"""train.py's step never makes the host wait for the GPU: from the batch's copy to the optimizer's step, so the host
launches the next step's work while the GPU still runs this one's (docs/results.md section 5: the GPU idled while
the host launched the optimizer and the next forward). The debug model, FSDP2 over one process, each backend.

Run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from recipes import build, optim, parallel
from recipes.config import load_config
from recipes.data import Batch
from recipes.qwen3.loss import counted_labels
from recipes.qwen3.model import flavor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "qwen3_debug.toml"
ROWS, SEQ = 4, 256


@pytest.mark.parametrize("attention, kernel", [("sdpa", "auto"), ("flex", "auto"), ("varlen", "torch")])
def test_a_training_step_never_waits_for_the_gpu(attention, kernel):
    config = load_config(
        CONFIG,
        ["--training.dtype", "bfloat16", "--training.local_batch_size", str(ROWS), "--optimizer.warmup_steps", "1"],
    )
    dist_ = parallel.init_distributed()
    shape = flavor_config("debug", attention=attention, mask="document", kernel=kernel, eos_id=0)
    model = build.build_model(shape, config.training, "", dist_.device)
    optimizer, scheduler = optim.build_optimizer(model, config.optimizer, 10, dist_.device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (ROWS, SEQ + 1), generator=generator)
    starts = torch.rand(ROWS, SEQ, generator=generator) < 0.02
    batch = Batch(tokens[:, :-1], tokens[:, 1:], starts, counted_labels(tokens[:, 1:].numpy()))
    preemption = train.PreemptionFlag()
    step = lambda number: train.train_step(  # noqa: E731
        model, batch, optimizer, scheduler, number, config.training, dist_.device, preemption, False
    )
    losses = [step(1)[0]]  # the first step allocates and warms up: syncs allowed there
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any stream or device synchronisation, or blocking copy, raises
    try:
        losses += [step(number)[0] for number in (2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[0], losses  # the steps were applied
