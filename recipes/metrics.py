"""metrics.jsonl, Weights & Biases and the console line, fed from one place; FLOPs and MFU.

Every number that goes to W&B also goes to metrics.jsonl: `MetricsLogger.log` writes both from the same dict.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import torch

from recipes.config import to_dict
from recipes.qwen3.attention import document_ids
from recipes.qwen3.model import Qwen3Config

log = logging.getLogger(__name__)

# Dense bf16 peak, per GPU, from the vendors' datasheets (without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory reserved by the caching allocator (what torchtitan reports), or on CPU the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def attended_pairs(tokens: torch.Tensor, mask: str, eos_id: int) -> int:
    """(query, key) pairs the mask lets attention compute, summed over the batch rows."""
    batch, seq = tokens.shape
    if mask == "causal":
        return batch * seq * (seq + 1) // 2
    lengths = torch.bincount((document_ids(tokens, eos_id) + torch.arange(batch)[:, None] * seq).flatten())
    lengths = lengths[lengths > 0].to(torch.int64)
    return int((lengths * (lengths + 1) // 2).sum())


def train_flops(config: Qwen3Config, non_embedding_params: int, tokens: int, pairs: int) -> float:
    """Useful training FLOPs (forward + backward = 3x forward): 6 per parameter per token for the matmuls, and
    4·heads·head_dim per attended (query, key) pair and layer for QK^T and PV, times 3."""
    return 6.0 * non_embedding_params * tokens + 12.0 * config.n_layers * config.n_heads * config.head_dim * pairs


def torchtitan_flops(config: Qwen3Config, non_embedding_params: int, tokens: int, seq_len: int) -> float:
    """torchtitan's convention: every token attends to the full seq_len (no causal halving, no documents)."""
    return (6.0 * non_embedding_params + 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len) * tokens


def _wandb_server_problem(timeout: float = 3.0) -> str | None:
    """What keeps the W&B server from taking a run, or None if it answers. Asked here because wandb.init retries
    a server that does not answer, or answers 5xx, for its whole init_timeout (30 s) before giving up."""
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    request = urllib.request.Request(f"{base_url}/graphql", data=b'{"query": "{ viewer { id } }"}',
                                     headers={"Content-Type": "application/json"})
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
        reason = ("no credentials (WANDB_API_KEY or ~/.netrc)" if not _wandb_has_credentials()
                  else _wandb_server_problem())
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
            settings=wandb.Settings(init_timeout=30, x_disable_stats=True),
        )
    except Exception as error:  # W&B must never stop training: metrics.jsonl stays the record
        log.warning("wandb: disabled for this run (%s: %s)", type(error).__name__, str(error).splitlines()[0][:200])
        return None


class MetricsLogger:
    """Rank 0 appends one JSON line per log step to metrics.jsonl, logs the same dict to W&B, prints a line."""

    def __init__(self, output_dir: Path, config, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if config.metrics.wandb:
            self.wandb_run = start_wandb(config, output_dir)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so each step is in the file exactly once."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        complete = text[:text.rfind("\n") + 1]  # a line torn by a crash mid-write has no newline yet
        kept = [line for line in complete.splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
            except Exception as error:
                log.warning("wandb: logging failed (%s); metrics.jsonl continues", error)
        log.info(console_line(row))

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as error:
                log.warning("wandb: finish failed (%s)", error)
            self.wandb_run = None


def console_line(row: dict) -> str:
    parts = [f"step {row['step']:>6}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"gnorm {row['grad_norm']:.3f}", f"{row['tokens_per_sec_per_gpu']:,.0f} tok/s/gpu"]
    if row.get("mfu") is not None:
        parts.append(f"mfu {row['mfu']:.1%} (tt {row['mfu_torchtitan']:.1%})")
    parts.append(f"mem {row['peak_memory_gib']:.2f} GiB")
    return " | ".join(parts)


def build_profiler(output_dir: Path, enabled: bool):
    """torch.profiler over training steps 7-9 (after compilation and warm-up) when [metrics] profile is set: rank 0 writes
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
    profiler = profile(activities=activities, schedule=schedule(wait=5, warmup=1, active=3, repeat=1),
                       on_trace_ready=write)
    profiler.start()
    return profiler
