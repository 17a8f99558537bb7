"""train.py's step on CUDA: the host never synchronises with the GPU before the optimizer's step is launched, and
waits once, for the step's numbers, after it (so the next step's work queues behind it); a non-finite step is skipped
on the device by fused AdamW over FSDP2's DTensor parameters. The debug model, FSDP2 over one process.

Run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

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
NOT_SIGNALLED = SimpleNamespace(signal_name=None)  # what train_step reads of train.PreemptionFlag


def setup(attention: str, kernel: str, *overrides: str):
    config = load_config(
        CONFIG,
        ["--training.dtype", "bfloat16", "--training.local_batch_size", str(ROWS), "--optimizer.warmup_steps", "1"]
        + list(overrides),
    )
    dist_ = parallel.init_distributed()
    shape = flavor_config("debug", attention=attention, mask="document", kernel=kernel, eos_id=0)
    model = build.build_model(shape, config.training, "", dist_.device)
    optimizer, scheduler = optim.build_optimizer(model, config.optimizer, 10)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (ROWS, SEQ + 1), generator=generator)
    starts = torch.rand(ROWS, SEQ, generator=generator) < 0.02
    batch = Batch(tokens[:, :-1], tokens[:, 1:], starts, counted_labels(tokens[:, 1:].numpy()))
    times = train.StepTimes()

    def step(number: int):
        return train.train_step(
            model, batch, optimizer, scheduler, number, config.training, dist_.device, NOT_SIGNALLED, times
        )

    return model, optimizer, scheduler, step


@pytest.mark.parametrize("attention, kernel", [("sdpa", "auto"), ("flex", "auto"), ("varlen", "torch")])
def test_the_host_waits_only_after_launching_the_optimizer_step(attention, kernel):
    _, _, _, step = setup(attention, kernel)
    losses = [step(1)[0]]  # the first step allocates and warms up: syncs allowed there
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any stream or device synchronisation, or blocking copy, raises
    try:
        losses.append(step(2)[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        losses.append(step(3)[0])
    events = profiler.events()
    # the host's events (the profiler also shows the optimizer's step as a range on the GPU's timeline)
    optimizer_starts = [
        e.time_range.start for e in events if e.name.startswith("Optimizer.step#") and e.device_type == DeviceType.CPU
    ]
    waits = [e.time_range.start for e in events if e.name in ("cudaEventSynchronize", "cudaStreamSynchronize")]
    assert len(optimizer_starts) == 1 and waits, (optimizer_starts, waits)
    assert min(waits) > optimizer_starts[0]  # the one wait (the step's numbers) comes after the step's launch
    assert all(math.isfinite(loss) for loss in losses) and losses[2] < losses[0], losses  # the steps were applied


def test_a_non_finite_step_is_skipped_on_the_device():
    model, optimizer, scheduler, step = setup("varlen", "torch", "--training.skip_nonfinite", "true")
    step(1)
    with torch.no_grad():
        model.norm.weight.to_local().fill_(float("nan"))  # every gradient non-finite from here

    def snapshot():
        params = {name: p.to_local().clone() for name, p in model.named_parameters()}
        moments = {id(p): state["exp_avg"].to_local().clone() for p, state in optimizer.state.items()}
        steps = [float(state["step"]) for state in optimizer.state.values()]
        return params, moments, steps

    before, epoch = snapshot(), scheduler.last_epoch
    loss, grad_norm, _ = step(2)
    after = snapshot()
    assert not math.isfinite(loss) or not math.isfinite(grad_norm)
    for name in before[0]:
        torch.testing.assert_close(after[0][name], before[0][name], rtol=0, atol=0, equal_nan=True, msg=name)
    for key in before[1]:
        torch.testing.assert_close(after[1][key], before[1][key], rtol=0, atol=0, equal_nan=True)
    assert after[2] == before[2] == [1.0] * len(before[2])  # AdamW's step count did not move
    assert scheduler.last_epoch == epoch + 1  # the schedule goes on, as for every step
