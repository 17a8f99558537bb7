"""Train a Qwen3 model with FSDP2 on the attention backend the config names.

    torchrun --nproc_per_node 8 train.py --config configs/qwen3_varlen.toml [--section.key value ...]
    python train.py --config configs/qwen3_debug.toml          # one process, CPU or one GPU

The recipe, top to bottom: config -> process group -> output folder (held) -> tokenizer and data -> model (built
sharded, random or from an HF checkpoint) -> optimizer and LR schedule -> resume -> the loop (forward and loss,
backward, clip, step, log, eval, checkpoint). The parts live in recipes/; docs/architecture.md is their map.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from recipes import build, checkpoint, optim, parallel, startup
from recipes.config import config_help, expand_path, load_config, to_toml
from recipes.errors import PREEMPTED_EXIT_CODE, NonFiniteError, RecipeError
from recipes.evaluation import validation_loss
from recipes.flops import ThroughputWindow, peak_flops
from recipes.metrics import MetricsLogger, build_profiler, finished_line, peak_memory_gib, timed
from recipes.qwen3.loss import mean_loss
from recipes.run import outputs
from recipes.run.hold import RunHold
from recipes.trained import export, generate

log = logging.getLogger("train")
SAMPLE_TOKENS = 32  # the length of an [eval] sample_every continuation

OVERRIDES_HELP = """\
Any key below can be set on the command line, after the file, as --section.key VALUE or --section.key=VALUE
(the last one wins). VALUE is read as the key's type: STR as is, INT/FLOAT/BOOL as TOML (3e-4, 1_000, true),
LIST[STR] comma-separated. Example:
  python train.py --config configs/qwen3_debug.toml --training.steps 50 --optimizer.lr 1e-3 --job.output_dir outputs/try
Every key is explained in docs/config.md.

"""


# torchrun SIGKILLs its workers 30 s after passing them a SIGTERM (a fixed timeout in torch 2.11's
# torch.distributed.elastic), as SLURM does after its KillWait (30 s by default). A step longer than that never
# reaches its end in time, so once steps take over a third of it the ranks also agree between micro-batches whether
# one was signalled, and abandon the step: the checkpoint is then the previous step's.
KILL_GRACE_S = 30.0


class StepTimes:
    """How long this run's steps take, the same on every rank: once over a third of KILL_GRACE_S, the ranks agree
    between micro-batches whether one was signalled. A step's time is its wall time up to its statistics being read
    back: on a GPU the host launches ahead of the work, so the time it spends launching says little. That time enters
    the next step's all-reduce (one step late), beside the host's own time of the step in progress."""

    def __init__(self):
        self.last_wall = 0.0  # this rank's previous step
        self.agreed = 0.0  # averaged over ranks, from the last all-reduce

    @property
    def long(self) -> bool:
        return self.agreed > KILL_GRACE_S / 3


class StepAbandoned(Exception):
    """All ranks stopped a step between micro-batches, on a signal: nothing of it was applied."""


class PreemptionFlag:
    """SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, scancel) and Ctrl-C (SIGINT) ask for
    a checkpoint at the next step boundary; a second Ctrl-C stops at once, without saving."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            print("stopped at once (second Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr)
            os._exit(130)  # no unwinding: a traceback from deep inside a step helps nobody here
        if signum == signal.SIGINT:
            print("Ctrl-C: checkpointing at the end of this step (Ctrl-C again to stop at once)", file=sys.stderr)
        self.signal_name = signal.Signals(signum).name


def setup_logging(dist_: parallel.Distributed) -> None:
    # Libraries (torchtitan logs to the root logger, torch warns through `warnings`) say the same on every rank:
    # rank 0 says it once; the other ranks keep only the recipe's own warnings.
    logging.basicConfig(
        level=logging.INFO if dist_.is_main else logging.ERROR,
        format=f"%(asctime)s [rank{dist_.rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if not dist_.is_main:
        logging.captureWarnings(True)
        for name in ("train", "recipes"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if (
        dist_.is_main
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    ):
        # torchrun then keeps one store across restarts, and what a killed attempt left there can send the
        # restarted ranks to dead peers' ports (pytorch/pytorch#135712).
        log.warning(
            "torchrun --max-restarts: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, or a "
            "restart may fail to connect its ranks"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=OVERRIDES_HELP + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --config FILE [--dry-run] [--section.key VALUE ...]",
    )
    parser.add_argument("--config", required=True, help="TOML file, e.g. configs/qwen3_debug.toml")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, data, tokenizer, model shape and output folder, print what the run "
        "would do, and write nothing into the output folder",
    )
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    dist_ = parallel.init_distributed()
    try:
        setup_logging(dist_)
        preemption = PreemptionFlag()
        output_dir = expand_path(config.job.output_dir)
        if args.dry_run:
            return startup.dry_run(config, dist_, output_dir)
        with RunHold.for_run(output_dir, dist_.is_main) as hold:  # one live run per folder; refuses another's
            saved = outputs.check_output_dir(output_dir, config, ignore=hold.files)  # refuses a different run's
            resume = startup.resume_point(output_dir, config, saved)  # a load_step without its checkpoint: refused
            folder, step, superseded = resume
            if step == config.training.steps and not superseded:  # nothing to train: no config.toml, no W&B run
                checkpoint.check_readable(folder)  # but a damaged last checkpoint is said, not "finished"
                log.info(finished_line(output_dir, folder))
                return 0
            return train(config, dist_, output_dir, saved, resume, preemption)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(config, dist_: parallel.Distributed, output_dir: Path, saved, resume, preemption: PreemptionFlag) -> int:
    t, device = config.training, dist_.device
    if config.job.print_config:
        log.info("resolved config (as saved to config.toml):\n%s", to_toml(config))
    torch.manual_seed(t.seed)
    parallel.set_deterministic(t.deterministic)

    tokenizer, loader, heldout, shape = startup.inputs(config, dist_)
    mesh = parallel.device_mesh(config.parallel.replicate, device)
    with timed("model: building"):
        model = build.build_model(shape, t, config.model.init_from, device, mesh)
    log.info(startup.model_line(config, model, shape, tokenizer, dist_))
    optimizer, scheduler = optim.build_optimizer(model, config.optimizer, t.steps)
    folder, _, superseded = resume
    start_step = checkpoint.load(folder, model, optimizer, scheduler, loader, t.steps) if folder else 0
    if start_step:
        optim.apply_settings(optimizer, scheduler, config.optimizer)
    # Every input, the checkpoint included, is checked: from here on the run writes, config.toml first.
    changed = outputs.record_config(output_dir, config, saved, start_step, dist_.is_main, superseded)
    on_cpu = device.type == "cpu"
    metrics = MetricsLogger(output_dir, config, dist_.is_main, resume_step=start_step, changed=changed, on_cpu=on_cpu)
    peak = peak_flops(device)
    throughput = ThroughputWindow(shape, model.num_params(exclude_embeddings=True), t.seq_len)
    profiler = build_profiler(output_dir, config.metrics.profile and dist_.is_main)

    def save(step: int) -> None:
        checkpoint.save(output_dir / "checkpoints", step, model, optimizer, scheduler, loader, config.checkpoint.keep)

    def stop_preempted(last_step: int, abandoned: int | None = None) -> int:
        if config.checkpoint.enable:
            save(last_step)
        why = (
            f" (step {abandoned} abandoned: steps take longer than a third of the {KILL_GRACE_S:.0f} s before SIGKILL)"
        )
        saved_or_not = (
            "checkpoint saved; run again to continue"
            if config.checkpoint.enable
            else "checkpoint.enable=false, so nothing was saved"
        )
        who = preemption.signal_name or "signal on another rank"
        log.warning("preempted (%s) at step %d%s: %s", who, last_step, why if abandoned else "", saved_or_not)
        return PREEMPTED_EXIT_CODE

    log.info(
        "training steps %d to %d; the first step compiles and warms up, so it takes longer", start_step + 1, t.steps
    )
    train_start = time.perf_counter()
    step, times = start_step, StepTimes()
    try:
        for step in range(start_step + 1, t.steps + 1):
            position = loader.state_dict()  # where this step's batch begins, should the step be abandoned
            batch = next(loader)
            throughput.add(batch)
            try:
                loss, grad_norm, preempted = train_step(
                    model, batch, optimizer, scheduler, step, t, device, preemption, times
                )
            except StepAbandoned:
                loader.load_state_dict(position)  # the resumed run starts with this step's batch
                return stop_preempted(step - 1, abandoned=step)
            if step == start_step + 1:
                log.info("first step: done in %.1f s", time.perf_counter() - train_start)
            if profiler is not None:
                profiler.step()

            last = step == t.steps
            evaluate = config.eval.interval and (step % config.eval.interval == 0 or last)
            sample = config.eval.sample_every and step % config.eval.sample_every == 0
            if step % config.metrics.log_every == 0 or last or preempted or evaluate or sample:
                row = {
                    "step": step,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    **throughput.rates(peak),
                    "peak_memory_gib": peak_memory_gib(device),
                    "tokens": step * t.local_batch_size * dist_.world_size * t.seq_len,
                    "elapsed_s": time.perf_counter() - train_start,
                }
                if evaluate:
                    row["val_loss"] = validation_loss(model, heldout, device, t.local_batch_size // t.grad_accum_steps)
                    throughput.reset()  # the evaluation's time belongs to no training step
                if sample:  # every rank runs the sharded model on the same tokens: the same greedy text
                    row["sample"] = generate(model, tokenizer, config.eval.sample_prompt, SAMPLE_TOKENS)
                    throughput.reset()
                metrics.log(row)

            if preempted:
                return stop_preempted(step)
            interval = config.checkpoint.interval
            if config.checkpoint.enable and ((interval and step % interval == 0) or last):
                save(step)
        newest = checkpoint.complete_checkpoints(output_dir / "checkpoints")
        if config.checkpoint.export_hf:
            torch.distributed.destroy_process_group()  # the export reads the whole checkpoint in rank 0 alone
            if dist_.is_main:
                with timed(f"export_hf: {newest[-1].name} for transformers to {output_dir / 'hf'}"):
                    export(output_dir, step, output_dir / "hf", torch.float32, replace=True)
        seconds = time.perf_counter() - train_start
        log.info(metrics.summary(start_step, step, seconds, newest[-1] if newest else None, output_dir))
        return 0
    finally:
        if profiler is not None:
            profiler.stop()
        metrics.close()


def train_step(
    model, batch, optimizer, scheduler, step: int, t, device: torch.device, preemption: PreemptionFlag, times: StepTimes
) -> tuple[float, float, bool]:
    """One optimizer step on this rank's rows of a global batch: forward and backward micro-batch by micro-batch
    (gradients reduced once, after the last), clip, then the optimizer's step unless the loss or grad norm is not
    finite (decided on the device). Returns the step's loss (the mean over every counted label of the global batch),
    the grad norm and whether any rank was asked to stop, the same on every rank. The host waits once, for these
    numbers, after launching the optimizer's step, so the next step's work queues behind it. Once `times` says steps
    are long, the ranks also agree before each further micro-batch whether one was signalled, and if so raise
    StepAbandoned."""
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    micro_batches = batch.split(t.local_batch_size // t.grad_accum_steps)
    for micro, mb in enumerate(micro_batches):
        if micro and times.long and parallel.any_rank(preemption.signal_name is not None, device):
            optimizer.zero_grad(set_to_none=True)
            raise StepAbandoned
        model.set_requires_gradient_sync(micro == len(micro_batches) - 1)  # reduce once per step
        meta = model.attention_meta(mb.document_starts, device)  # from the host copy: no device sync
        mb = mb.to(device)
        loss = mean_loss(model(mb.inputs, meta, mb.labels), mb.global_labels)
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = parallel.clip_grad_norm(model, t.max_grad_norm)
    seconds = max(time.perf_counter() - start, times.last_wall)
    stats = parallel.StepStats(loss_sum, grad_norm, preemption.signal_name is not None, seconds)
    optim.step_unless_nonfinite(optimizer, stats.values[:2])
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    loss_value, grad_norm_value, preempted, times.agreed = stats.read()  # while the GPU runs the optimizer's step
    times.last_wall = time.perf_counter() - start
    if not math.isfinite(loss_value) or not math.isfinite(grad_norm_value):
        message = f"step {step}: non-finite loss {loss_value} or grad norm {grad_norm_value}"
        if not t.skip_nonfinite:
            raise NonFiniteError(
                message + "; the last good checkpoint is kept. Lower optimizer.lr, or set "
                "training.skip_nonfinite=true to skip such steps"
            )
        log.warning("%s: step skipped (training.skip_nonfinite)", message)
    return loss_value, grad_norm_value, preempted


def run(argv: list[str]) -> None:
    """main() as a process: its exit code, a RecipeError's one line and exit code, and a clean exit.

    The process groups outlive destroy_process_group (DTensor's caches keep their device meshes), so gloo's run-loop
    threads and NCCL's would still run while the interpreter finalizes and tears them down in no set order, which
    can abort a finished run (SIGABRT, "terminate called without an active exception") and fail it under torchrun.
    By then every output is written and closed, so the process leaves without finalizing."""
    try:
        code = main(argv)
    except RecipeError as error:  # each carries its exit code
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr)
        code = error.exit_code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run(sys.argv[1:])
