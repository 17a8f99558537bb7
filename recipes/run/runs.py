"""Reading finished (or interrupted) runs back: metrics.jsonl, an offline W&B run, or a run on a W&B server.

Every reader returns the same shape: one dict per logged step, sorted by step, with the int key "step" and the
metric keys train.py logs (loss, lr, grad_norm, ...). W&B's own bookkeeping keys (_runtime, _step, ...) are dropped.
Problems a user can fix raise UserError with one line naming the run and the fix (exit code 2 in the scripts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from recipes import checkpoint
from recipes.config import Config, load_config, tomllib
from recipes.errors import UserError, first_line
from recipes.run.outputs import SAVED_CONFIG

WANDB_API_PREFIX = "wandb:"


@dataclass
class Run:
    label: str  # what plots and tables call the run: its attention backend where known
    source: str  # the argument it was read from
    rows: list[dict]
    config: dict = field(default_factory=dict)  # {section: {key: value}} as the run recorded it; {} if it did not


def open_run(run_dir: Path, step: int | None) -> tuple[Config, Path]:
    """A train.py run's resolved config and its checkpoint folder (the newest, or `step`'s), checked readable; a
    UserError naming the fix where either is missing (scripts/eval_matrix.py, scripts/export_hf.py)."""
    if not (run_dir / SAVED_CONFIG).is_file():
        raise UserError(f"{run_dir}: no {SAVED_CONFIG} there; pass the job.output_dir of a train.py run")
    folder = checkpoint.find(run_dir / "checkpoints", step)
    checkpoint.check_readable(folder)
    return load_config(str(run_dir / SAVED_CONFIG), source=str(run_dir / SAVED_CONFIG)), folder


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of <run_dir>/metrics.jsonl, sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl there; pass the output_dir of a train.py run")
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = metrics_row(line)
        if isinstance(row, str):
            if number == len(lines) and not line.endswith("\n"):
                continue  # a run killed mid-write leaves an unterminated last line; the lines before it are whole
            raise UserError(f"{path}:{number}: {row}; fix or delete that line")
        rows.append(row)
    return _by_step(rows)


def metrics_row(line: str) -> dict | str:
    """One line of a metrics.jsonl, with its newline, as its row; or, for a torn line, why: cut mid-write (no
    newline), not JSON, or no integer step. read_metrics and the resume's repair (recipes/metrics.py) read it."""
    if not line.endswith("\n"):
        return "cut mid-write (no newline)"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not a JSON line ({error.msg})"
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        return "a metrics line needs an integer 'step'"
    return row


def _by_step(rows: list[dict]) -> list[dict]:
    """Sorted by step; where a step repeats (a resume that re-logged it), the later row wins."""
    return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])


def _wandb_records(path: Path) -> list[dict]:
    """The records of an offline run's .wandb log, through W&B's documented `wandb leet inspect --json`."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise UserError(
            f"{path}: W&B could not read this run ({reason}); pass an offline-run-* folder or its .wandb file"
        )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _metric_value(value):
    # W&B's JSON writes non-finite floats as the strings "NaN", "Infinity" and "-Infinity".
    return float(value) if value in ("NaN", "Infinity", "-Infinity") else value


def _history_rows(records: list[dict]) -> list[dict]:
    rows = []
    for record in records:
        if record.get("type") != "history":
            continue
        item = record["history"]["item"]
        row = {"step": int(record["history"].get("step", {}).get("num", item.get("_step", 0)))}
        row.update({key: _metric_value(value) for key, value in item.items() if not key.startswith("_")})
        rows.append(row)
    return _by_step(rows)


def read_wandb_summary(path: str | Path) -> tuple[dict, list[str]]:
    """The summary (W&B's own "_" keys dropped) and tags of an offline W&B run, given its offline-run-* folder or
    its run-*.wandb file: the last value written for each key, the last tags set."""
    summary, tags = {}, []
    for record in _wandb_records(_wandb_log_file(Path(path))):
        if record.get("type") == "summary":
            summary.update(
                {key: value for key, value in record["summary"].get("update", {}).items() if not key.startswith("_")}
            )
        elif record.get("type") == "run" and record["run"].get("tags") is not None:
            tags = record["run"]["tags"]
    return summary, tags


def _wandb_log_file(path: Path) -> Path:
    if path.is_file() and path.suffix == ".wandb":
        return path
    logs = sorted(path.glob("run-*.wandb")) if path.is_dir() else []
    if len(logs) != 1:
        raise UserError(
            f"{path}: expected one run-*.wandb file there, found {len(logs)}; "
            "pass one wandb/offline-run-* folder or its .wandb file"
        )
    return logs[0]


def _wandb_config(records: list[dict]) -> dict:
    """The run's config: the init-time config merged with later config updates, in log order."""
    config = {}
    for record in records:
        if record.get("type") == "run":
            config.update(record["run"].get("config", {}).get("update", {}))
        elif record.get("type") == "config":
            config.update(record["config"].get("update", {}))
    return config


def _fetch_wandb_api(run_path: str) -> tuple[object, list[dict]]:
    """The public-API run object and its history rows."""
    import wandb

    if run_path.count("/") != 2 or not all(run_path.split("/")):
        raise UserError(f"{WANDB_API_PREFIX}{run_path}: a W&B run is named wandb:ENTITY/PROJECT/RUN_ID")
    try:
        api_run = wandb.Api(timeout=30).run(run_path)
        rows = []
        for item in api_run.scan_history():
            row = {"step": int(item["_step"])}
            row.update({key: value for key, value in item.items() if not key.startswith("_") and value is not None})
            rows.append(row)
    except (wandb.errors.Error, ValueError, OSError) as error:
        raise UserError(
            f"{WANDB_API_PREFIX}{run_path}: W&B API unreachable or run not found ({first_line(error)}); "
            "set WANDB_API_KEY and network access, or pass the run's offline-run-* folder"
        ) from None
    return api_run, _by_step(rows)


def _attention(config: dict) -> str | None:
    attention = config.get("model", {}).get("attention")
    return attention if isinstance(attention, str) and attention else None


def _config_toml(run_dir: Path) -> dict:
    path = run_dir / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML ({error}); fix it or remove it") from None


def load_run(source: str) -> Run:
    """A run from a train.py output dir (metrics.jsonl), an offline W&B run (folder or .wandb file) or
    "wandb:ENTITY/PROJECT/RUN_ID", labelled by its [model] attention where the run records it."""
    if source.startswith(WANDB_API_PREFIX):
        api_run, rows = _fetch_wandb_api(source[len(WANDB_API_PREFIX) :])
        config = dict(api_run.config)
        return Run(_attention(config) or api_run.name, source, rows, config)
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"{source}: no such file or directory; pass a run dir, a W&B offline run or wandb:ENTITY/PROJECT/RUN_ID"
        )
    if path.is_dir() and (path / "metrics.jsonl").is_file():
        config = _config_toml(path)
        return Run(_attention(config) or path.resolve().name, source, read_metrics(path), config)
    if path.suffix == ".wandb" or (path.is_dir() and any(path.glob("run-*.wandb"))):
        records = _wandb_records(_wandb_log_file(path))
        run_record = next((record["run"] for record in records if record.get("type") == "run"), {})
        config = _wandb_config(records)
        label = _attention(config) or run_record.get("display_name") or path.resolve().name
        return Run(label, source, _history_rows(records), config)
    raise UserError(
        f"{source}: neither metrics.jsonl nor a run-*.wandb file there; "
        "pass a train.py output dir, a wandb/offline-run-* folder or wandb:ENTITY/PROJECT/RUN_ID"
    )
