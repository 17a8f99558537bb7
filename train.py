"""Train a Qwen3 model with FSDP2 on the attention backend the config names.

    torchrun --nproc_per_node 8 train.py --config configs/qwen3_varlen.toml [--section.key value ...]
    python train.py --config configs/qwen3_debug.toml          # one process, CPU or one GPU

The recipe, top to bottom: config -> process group -> output folder -> tokenizer and data -> model (random or
from an HF checkpoint) -> FSDP2 -> optimizer and LR schedule -> resume -> the loop (forward, loss, backward,
clip, step, metrics, checkpoint). The parts live in recipes/.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from recipes import checkpoint, data, parallel
from recipes.config import ConfigError, load_config
from recipes.metrics import (MetricsLogger, attended_pairs, build_profiler, peak_flops, peak_memory_gib,
                             torchtitan_flops, train_flops)
from recipes.outputs import check_output_dir, record_config
from recipes.qwen3.model import Qwen3Model, flavor_config

log = logging.getLogger("train")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint saved, run again (SLURM requeue) to continue
NONFINITE_EXIT_CODE = 3


class NonFiniteError(RuntimeError):
    pass


class PreemptionFlag:
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, scancel) ask for a checkpoint
    at the next step boundary."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


def build_model(config, tokenizer, device: torch.device) -> Qwen3Model:
    if config.model.init_from:
        from recipes.qwen3.hf import load_hf_checkpoint

        model = load_hf_checkpoint(config.model.init_from, attention=config.model.attention,
                                   mask=config.model.mask, eos_id=tokenizer.eos_id)
        log.info("model: weights from %s (model.flavor ignored: the checkpoint's config.json sets the shape)",
                 config.model.init_from)
        return model.to(device)
    model_config = flavor_config(config.model.flavor, attention=config.model.attention, mask=config.model.mask,
                                 eos_id=tokenizer.eos_id)
    with torch.device(device):
        model = Qwen3Model(model_config)
    model.init_weights(seed=config.training.seed)  # same seed on every rank: identical weights before sharding
    return model


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML file, e.g. configs/qwen3_debug.toml")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    t = config.training

    dist_ = parallel.init_distributed()
    logging.basicConfig(level=logging.INFO if dist_.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank{dist_.rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    if (dist_.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))):
        # torchrun then keeps one store across restarts, and what a killed attempt left there can send the
        # restarted ranks to dead peers' ports (pytorch/pytorch#135712).
        log.warning("torchrun --max-restarts: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, or a "
                    "restart may fail to connect its ranks")
    preemption = PreemptionFlag()
    output_dir = Path(config.job.output_dir)
    resuming = check_output_dir(output_dir, config)  # refuses a folder that holds a different run
    torch.manual_seed(t.seed)
    parallel.set_deterministic(t.deterministic)

    # Tokenizer and data: rank 0 fills the cache first, the others then read it.
    cache_dir = data.default_cache_dir()
    with parallel.main_rank_first():
        tokenizer = data.build_tokenizer(config.data, cache_dir)
        loader = data.build_dataloader(config.data, tokenizer, t.seq_len, t.local_batch_size, dist_.rank,
                                       dist_.world_size, t.seed, cache_dir)

    model = build_model(config, tokenizer, dist_.device)
    data.check_vocab(tokenizer, model.config.vocab_size)
    if t.seq_len > model.config.max_seq_len:
        raise ConfigError(f"training.seq_len: {t.seq_len} exceeds the model's max_seq_len "
                          f"{model.config.max_seq_len}; lower it")
    non_embedding_params = model.num_params(exclude_embeddings=True)
    log.info("model: %s, %.1fM parameters, attention=%s mask=%s; data: %s; tokenizer: %s; world size %d on %s",
             config.run_name, model.num_params() / 1e6, model.config.attention, model.config.mask,
             config.data.dataset, tokenizer.name, dist_.world_size, dist_.device.type)
    if t.activation_checkpoint:
        parallel.apply_activation_checkpointing(model)
    if t.compile:
        parallel.apply_compile(model)
    # Compiled, the loss never materialises the float32 copy of the (tokens, vocab) logits.
    loss_fn = torch.compile(cross_entropy) if t.compile else cross_entropy
    parallel.apply_fsdp(model, getattr(torch, t.dtype), dist_.device)

    o = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=dist_.device.type == "cuda")
    scheduler = parallel.build_lr_schedule(optimizer, o, t.steps)
    checkpoints = output_dir / "checkpoints"
    start_step = checkpoint.load_latest(checkpoints, model, optimizer, scheduler, loader) if resuming else 0
    record_config(output_dir, config, dist_.is_main)  # every input, the checkpoint included, checked: now it writes
    metrics = MetricsLogger(output_dir, config, enabled=dist_.is_main, resume_step=start_step)
    peak = peak_flops(dist_.device)
    profiler = build_profiler(output_dir, config.metrics.profile and dist_.is_main)

    micro_batch = t.local_batch_size // t.grad_accum_steps
    window_tokens, window_flops, window_tt_flops = 0, 0.0, 0.0
    window_start = train_start = time.perf_counter()
    step = start_step
    try:
        for step in range(start_step + 1, t.steps + 1):
            rows = next(loader)
            inputs, labels = rows[:, :-1], rows[:, 1:]
            window_tokens += inputs.numel()
            window_flops += train_flops(model.config, non_embedding_params, inputs.numel(),
                                        attended_pairs(inputs, model.config.mask, model.config.eos_id))
            window_tt_flops += torchtitan_flops(model.config, non_embedding_params, inputs.numel(), t.seq_len)
            loss_sum = torch.zeros((), device=dist_.device)
            for micro, (x, y) in enumerate(zip(inputs.split(micro_batch), labels.split(micro_batch))):
                model.set_requires_gradient_sync(micro == t.grad_accum_steps - 1)  # reduce once per step
                meta = model.build_meta(x, dist_.device)  # from the host copy: no device sync for the metadata
                x, y = x.to(dist_.device, non_blocking=True), y.to(dist_.device, non_blocking=True)
                loss = loss_fn(model(x, meta), y) / t.grad_accum_steps
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = parallel.clip_grad_norm(model, t.max_grad_norm)

            # One host sync per step: mean loss over ranks, grad norm, and whether any rank was signalled.
            loss_value, grad_norm_value, preempted = parallel.step_stats(loss_sum, grad_norm,
                                                                          preemption.signal_name is not None)
            if not (torch.isfinite(torch.tensor([loss_value, grad_norm_value])).all()):
                message = f"step {step}: non-finite loss {loss_value} or grad norm {grad_norm_value}"
                if not t.skip_nonfinite:
                    raise NonFiniteError(message + "; the last good checkpoint is kept. Lower optimizer.lr, or set "
                                                   "training.skip_nonfinite=true to skip such steps")
                log.warning("%s: step skipped (training.skip_nonfinite)", message)
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if profiler is not None:
                profiler.step()

            if step % config.metrics.log_every == 0 or step == t.steps or preempted:
                now = time.perf_counter()
                seconds = now - window_start
                metrics.log({
                    "step": step,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm_value,
                    "tokens_per_sec_per_gpu": window_tokens / seconds,
                    "mfu": window_flops / seconds / peak if peak else None,
                    "mfu_torchtitan": window_tt_flops / seconds / peak if peak else None,
                    "peak_memory_gib": peak_memory_gib(dist_.device),
                    "elapsed_s": now - train_start,
                })
                window_tokens, window_flops, window_tt_flops, window_start = 0, 0.0, 0.0, time.perf_counter()

            interval = config.checkpoint.interval
            if config.checkpoint.enable and ((interval and step % interval == 0) or step == t.steps or preempted):
                checkpoint.save(checkpoints, step, model, optimizer, scheduler, loader, config.checkpoint.keep)
            if preempted:
                log.warning("preempted (%s) at step %d: %s", preemption.signal_name or "signal on another rank", step,
                            "checkpoint saved; run again to continue" if config.checkpoint.enable
                            else "checkpoint.enable=false, so nothing was saved")
                return PREEMPTED_EXIT_CODE
        log.info("done: %d steps in %.1f s; outputs in %s", step - start_step, time.perf_counter() - train_start,
                 output_dir)
        return 0
    finally:
        if profiler is not None:
            profiler.stop()
        metrics.close()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, NonFiniteError) as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else NONFINITE_EXIT_CODE)
