"""AdamW and the learning-rate schedule (torchtitan's warmup then decay)."""

from __future__ import annotations

import torch

from recipes.config import OptimizerConfig


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, steps: int):
    """AdamW over the (sharded) parameters and its LambdaLR: linear warmup, then cosine, linear or sqrt decay to
    lr * min_lr_ratio at the last step."""
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.config.job_config import LRScheduler

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=True,  # its kernel also skips a non-finite step on the device: step_unless_nonfinite
    )
    schedule = LRScheduler(warmup_steps=config.warmup_steps, decay_type=config.decay, min_lr_factor=config.min_lr_ratio)
    return optimizer, build_lr_schedulers([optimizer], schedule, steps).schedulers[0]


def apply_settings(optimizer: torch.optim.Optimizer, scheduler, config: OptimizerConfig) -> None:
    """After a resume, the config's hyperparameters replace the ones the checkpoint restored (they may change on
    resume: outputs.MAY_CHANGE), and the learning rate follows the config's schedule from the resumed step."""
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(
            initial_lr=config.lr,
            lr=config.lr * lr_lambda(scheduler.last_epoch),
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, values: torch.Tensor) -> None:
    """optimizer.step(), skipped by fused AdamW's own kernel where any of `values` is not finite: decided on the
    device, so the host need not wait for the backward to end before launching the step. The flag is handed over
    as torch.amp.GradScaler hands it (the optimizer's `found_inf`, read by its step)."""
    optimizer.found_inf = (~torch.isfinite(values)).any().float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
