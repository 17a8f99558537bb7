"""metrics.jsonl, Weights & Biases and the console line, fed from one place.

Every number that goes to W&B also goes to metrics.jsonl: `MetricsLogger.log` writes both from the same dict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import torch

from recipes.config import to_dict
from recipes.errors import first_line, write_failed
from recipes.files import write_atomic
from recipes.run.runs import metrics_row

log = logging.getLogger(__name__)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory reserved by the caching allocator (what torchtitan reports), or on CPU the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


# A server that has not answered in this long is treated as down: a live one answers in well under a second, and
# every second here is one more before training starts.
WANDB_PROBE_TIMEOUT_S = 3.0
# How long wandb.init may take once the server answered (its own default is longer and retries through it).
WANDB_INIT_TIMEOUT_S = 30


def _wandb_server_problem(timeout: float = WANDB_PROBE_TIMEOUT_S) -> str | None:
    """What keeps the W&B server from taking a run, or None if it answers. Asked here because wandb.init retries
    a server that does not answer, or answers 5xx, for its whole init_timeout before giving up."""
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    request = urllib.request.Request(
        f"{base_url}/graphql", data=b'{"query": "{ viewer { id } }"}', headers={"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as error:  # 401 without credentials in the request is an answer too
        return f"W&B server error: HTTP {error.code} from {base_url}" if error.code >= 500 else None
    except OSError as error:  # URLError (refused, no DNS), timeouts
        return f"W&B server unreachable: {getattr(error, 'reason', error)} at {base_url}"
    return None


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    return netrc.is_file() and host in netrc.read_text(errors="ignore")


def start_wandb(config, output_dir: Path):
    """A W&B run, offline unless credentials and network are both there; None if W&B cannot start at all.

    Settings from the config win over WANDB_* variables only where the config sets them.
    """
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        reason = (
            "no credentials (WANDB_API_KEY or ~/.netrc)" if not _wandb_has_credentials() else _wandb_server_problem()
        )
        if reason:
            # Must be set in the environment: passing mode only to init still makes a network call at exit.
            os.environ["WANDB_MODE"] = "offline"
            log.info("wandb: offline (%s); sync later with `wandb sync %s/wandb/offline-run-*`", reason, output_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        m = config.metrics
        # One W&B run per training run: a resumed run continues the id the folder recorded.
        id_path = output_dir / "wandb_run_id"
        run_id = id_path.read_text().strip() if id_path.is_file() else uuid.uuid4().hex[:8]
        id_path.write_text(run_id)
        return wandb.init(
            id=run_id,
            resume="allow",
            project=os.environ.get("WANDB_PROJECT") or m.wandb_project,
            entity=m.wandb_entity or os.environ.get("WANDB_ENTITY") or None,
            group=m.wandb_group or os.environ.get("WANDB_RUN_GROUP") or None,
            name=os.environ.get("WANDB_NAME") or config.run_name,
            tags=m.wandb_tags or None,
            config=to_dict(config),
            dir=str(output_dir),
            settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, x_disable_stats=True),
        )
    except Exception as error:  # W&B must never stop training: metrics.jsonl stays the record
        log.warning("wandb: disabled for this run (%s: %s)", type(error).__name__, first_line(error)[:200])
        return None


class MetricsLogger:
    """Rank 0 appends one JSON line per log step to metrics.jsonl, logs the same dict to W&B, prints a line."""

    def __init__(
        self,
        output_dir: Path,
        config,
        enabled: bool,
        resume_step: int = 0,
        changed: dict | None = None,
        on_cpu: bool = False,
    ):
        self.enabled, self.on_cpu = enabled, on_cpu
        self.path = output_dir / "metrics.jsonl"
        self.total_steps = config.training.steps
        self.local_tokens_per_step = config.training.local_batch_size * config.training.seq_len
        self.last_row, self.last_val_loss = None, None
        self.wandb_run = self.tensorboard = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if config.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run's events replace what an earlier attempt logged after its checkpoint
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)
        if config.metrics.wandb:
            self.wandb_run = start_wandb(config, output_dir)
        if self.wandb_run is not None and changed:  # a resume that changed settings (recipes/run/outputs.py)
            self.wandb_run.config.update(to_dict(config), allow_val_change=True)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so each step is in the file exactly once. Torn
        lines (a crash mid-write, a disk that filled up) are dropped wherever they are, keeping the file as it
        was in a backup beside it, with one warning."""
        if not self.path.exists():
            return
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            row = metrics_row(line)
            if isinstance(row, str):  # torn: why
                torn += bool(line.strip())
            elif row["step"] <= step:
                kept.append(line)
        if torn:
            backup = self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.copyfile(self.path, backup)
            log.warning("metrics: %d torn line(s) in %s dropped; the file as it was is in %s", torn, self.path, backup)
        try:
            write_atomic(self.path, lambda handle: handle.write("".join(kept).encode()))
        except OSError as error:
            raise write_failed(self.path, error) from None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as error:
            raise write_failed(self.path, error) from None
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
            except Exception as error:
                log.warning("wandb: logging failed (%s); metrics.jsonl continues", error)
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, str):
                    self.tensorboard.add_text(key, value, row["step"])
                elif key != "step" and value is not None:
                    self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()
        self.last_row = row
        if row.get("val_loss") is not None:
            self.last_val_loss = row["val_loss"]
        rate = row["tokens_per_sec_per_gpu"]
        seconds_per_step = self.local_tokens_per_step / rate if rate > 0 else None
        log.info(console_line(row, self.total_steps, seconds_per_step, self.on_cpu))
        if row.get("sample") is not None:
            log.info("sample at step %d: %r", row["step"], row["sample"])

    def summary(self, first_step: int, last_step: int, seconds: float, newest: Path | None, output_dir: Path) -> str:
        """The end of a run in a few lines: what was trained, how fast, where it ended, what to run next."""
        if not self.enabled or self.last_row is None:
            return f"done: {last_step - first_step} steps"
        steps, row = last_step - first_step, self.last_row
        val = f", val_loss {self.last_val_loss:.4f}" if self.last_val_loss is not None else ""
        return "\n".join(
            [
                f"done: {steps} steps ({first_step} -> {last_step}) in {human_duration(seconds)}, "
                f"{seconds / max(steps, 1):.2f} s/step; {human_count(row['tokens'])} tokens seen",
                f"  final loss {row['loss']:.4f}{val}",
                f"  newest checkpoint: {newest or 'none (checkpoint.enable = false)'}",
                next_commands(output_dir),
            ]
        )

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as error:
                log.warning("wandb: finish failed (%s)", error)
            self.wandb_run = None


def console_line(row: dict, total_steps: int, seconds_per_step: float | None, on_cpu: bool) -> str:
    """One log line: where the run is (step/total, percent, tokens seen), how it trains, and the time left at the
    recent step time. On CPU the rate is per process and the memory is the peak RSS, and the line says so."""
    step = row["step"]
    parts = [
        f"step {step:>{len(str(total_steps))}}/{total_steps} ({step / total_steps:.0%})",
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.2e}",
        f"gnorm {row['grad_norm']:.3f}",
        f"{row['tokens_per_sec_per_gpu']:,.0f} tok/s/{'process' if on_cpu else 'gpu'}",
        f"tokens {human_count(row['tokens'])}",
    ]
    if row.get("mfu") is not None:
        parts.append(f"mfu {row['mfu']:.1%} (tt {row['mfu_torchtitan']:.1%})")
    parts.append(f"{'rss' if on_cpu else 'mem'} {row['peak_memory_gib']:.2f} GiB")
    if row.get("val_loss") is not None:
        parts.append(f"val_loss {row['val_loss']:.4f}")
    if seconds_per_step is not None and step < total_steps:
        parts.append(f"eta {human_duration((total_steps - step) * seconds_per_step)}")
    return " | ".join(parts)


def next_commands(output_dir: Path) -> str:
    return (
        f"  next: python scripts/generate.py {output_dir} --prompt 'def main('   (sample text)\n"
        f"        python scripts/export_hf.py {output_dir} hf/{output_dir.name}   (for transformers)\n"
        f"        python scripts/compare_runs.py {output_dir} OTHER_RUN_DIR   (loss curves side by side)"
    )


def finished_line(output_dir: Path, newest: Path) -> str:
    """What a rerun of a finished run says instead of training (and opening a W&B run) again."""
    return (
        f"finished: {output_dir} already trained to training.steps ({newest.name}); nothing to do. Raise "
        f"--training.steps to train it longer\n  newest checkpoint: {newest}\n{next_commands(output_dir)}"
    )


def human_count(n: float) -> str:
    """81.9K, 1.23M, 4.50B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def human_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@contextlib.contextmanager
def timed(what: str):
    """A phase that can take long (a tokenizer trained, a corpus tokenized, the model built) says when it starts and
    how long it took, so a quiet console is never a mystery."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def corpus_line(loader, steps: int) -> str:
    """What the run reads: the corpus's documents and tokens, and how many epochs `steps` steps cover."""
    per_step = loader.global_batch_size * loader.row_len
    read = f"{steps} steps read {human_count(steps * per_step)} tokens"
    if loader.num_tokens is None:
        return f"data: a streamed dataset (size unknown); {read}"
    return (
        f"data: {loader.num_documents:,} training documents, {human_count(loader.num_tokens)} tokens; {read} = "
        f"{steps * per_step / loader.num_tokens:.3g} epochs"
    )


def build_profiler(output_dir: Path, enabled: bool):
    """torch.profiler over training steps 7-9 (after compilation and warm-up) when [metrics] profile is set: rank 0
    writes
    <output_dir>/profile/top_kernels.txt (device time per kernel) and a Chrome trace. None when disabled."""
    if not enabled:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    folder = output_dir / "profile"

    def write(profiler) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=80)
        (folder / "top_kernels.txt").write_text(table)
        profiler.export_chrome_trace(str(folder / "trace.json"))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(
        activities=activities, schedule=schedule(wait=5, warmup=1, active=3, repeat=1), on_trace_ready=write
    )
    profiler.start()
    return profiler
