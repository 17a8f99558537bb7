"""TOML config -> typed dataclasses, with `--section.key value` overrides and validation.

Every mistake a user can fix raises ConfigError with one line naming the field and the fix; train.py prints
it and exits with code 2. docs/config.md documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class ConfigError(ValueError):
    """A user-fixable problem with the configuration or the run's inputs (exit code 2)."""


@dataclass
class ModelConfig:
    flavor: str = "debug"
    attention: str = "sdpa"  # sdpa | flex | varlen
    mask: str = "document"  # causal | document
    init_from: str = ""  # HF Qwen3 checkpoint folder to fine-tune from; "" = random init


@dataclass
class TrainingConfig:
    steps: int = 100
    seq_len: int = 256
    local_batch_size: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"  # bfloat16 | float32: parameter/compute dtype; gradients reduce in float32
    compile: bool = False
    activation_checkpoint: bool = False
    deterministic: bool = False
    skip_nonfinite: bool = False  # skip a step whose loss or grad norm is not finite instead of stopping


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    decay: str = "cosine"  # cosine | linear | sqrt, from the end of warmup to the last step
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio


@dataclass
class DataConfig:
    dataset: str = "stdlib"  # "stdlib" (offline default), a local .jsonl/.parquet/.txt file or folder, or "hf:NAME"
    dataset_config: str = ""  # HF hub dataset configuration name
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "default"  # "default" (BPE trained on the default corpus), a tokenizer.json, folder or hub id
    vocab_size: int = 2048  # size of the default BPE tokenizer
    eos_token: str = ""  # "" = the tokenizer's own end-of-text token


@dataclass
class CheckpointConfig:
    enable: bool = True  # false: never save (benchmarks); resume still loads what the folder holds
    interval: int = 0  # steps between checkpoints; 0 = only at the end and on preemption
    resume: bool = True  # continue from the newest complete checkpoint in <output_dir>/checkpoints
    keep: int = 2


@dataclass
class JobConfig:
    output_dir: str = "outputs/run"
    name: str = ""  # run name; "" = "<flavor>-<attention>-<mask>"


@dataclass
class MetricsConfig:
    log_every: int = 10
    wandb: bool = False
    wandb_project: str = "qwen3-fsdp-recipes"
    wandb_entity: str = ""
    wandb_group: str = ""
    wandb_tags: list[str] = field(default_factory=list)
    profile: bool = False  # torch.profiler over steps 7-9; rank 0 writes <output_dir>/profile/


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    job: JobConfig = field(default_factory=JobConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def run_name(self) -> str:
        return self.job.name or f"{self.model.flavor}-{self.model.attention}-{self.model.mask}"


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _suggestion(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _closest(name: str, choices) -> str:
    return _suggestion(name, choices) or f"; valid: {', '.join(choices)}"


def _section_types(section: str) -> dict[str, type]:
    return typing.get_type_hints(globals()[_SECTIONS[section]])


def _check_type(where: str, value, expected):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(expected) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}; write e.g. [\"a\", \"b\"]")
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")


def _parse_override(where: str, text: str, expected):
    """Command-line values are strings; read them as the field's type."""
    if expected is str:
        return text
    if typing.get_origin(expected) is list:
        return [item for item in text.split(",") if item]
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{where}: cannot read {text!r} as {expected.__name__}") from None
    return _check_type(where, value, expected)


def _apply(config: Config, section: str, key: str, value, from_cli: bool) -> None:
    if section not in _SECTIONS:
        raise ConfigError(f"unknown section [{section}]{_closest(section, _SECTIONS)}")
    types = _section_types(section)
    where = f"{section}.{key}"
    if key not in types:
        raise ConfigError(f"unknown key {where}{_closest(key, types)}")
    value = _parse_override(where, value, types[key]) if from_cli else _check_type(where, value, types[key])
    setattr(getattr(config, section), key, value)


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """['--training.steps', '5', '--job.output_dir=x'] -> [('training', 'steps', '5'), ('job', 'output_dir', 'x')]"""
    overrides, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name}: missing value; write --{name} VALUE")
            value, i = argv[i + 1], i + 1
        section, _, key = name.partition(".")
        overrides.append((section, key, value))
        i += 1
    return overrides


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    config = Config()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config: file {path} not found; pass an existing TOML file, e.g. configs/qwen3_debug.toml") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--config: {path} is not valid TOML ({error}); fix the line it names") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]{_closest(section, _SECTIONS)}")
            for key, value in values.items():
                _apply(config, section, key, value, from_cli=False)
    for section, key, value in parse_overrides(list(overrides)):
        _apply(config, section, key, value, from_cli=True)
    validate(config)
    return config


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(where: str, value: str, choices) -> None:
    _require(value in choices, f"{where}: {value!r} is not one of {', '.join(choices)}{_suggestion(value, choices)}")


def validate(config: Config) -> None:
    """Checks that need no files or processes; data, tokenizer and world size are checked where they are built."""
    from recipes.qwen3.attention import BACKENDS, MASKS
    from recipes.qwen3.model import FLAVORS

    m, t, o, c, x = config.model, config.training, config.optimizer, config.checkpoint, config.metrics
    _choice("model.flavor", m.flavor, FLAVORS)
    _choice("model.attention", m.attention, BACKENDS)
    _choice("model.mask", m.mask, MASKS)
    _choice("training.dtype", t.dtype, ("bfloat16", "float32"))
    _choice("optimizer.decay", o.decay, ("cosine", "linear", "sqrt"))
    for where, value in [("training.steps", t.steps), ("training.seq_len", t.seq_len),
                         ("training.local_batch_size", t.local_batch_size),
                         ("training.grad_accum_steps", t.grad_accum_steps), ("metrics.log_every", x.log_every),
                         ("checkpoint.keep", c.keep), ("data.vocab_size", config.data.vocab_size)]:
        _require(value > 0, f"{where}: must be > 0, got {value}")
    _require(t.local_batch_size % t.grad_accum_steps == 0,
             f"training.local_batch_size: {t.local_batch_size} is not divisible by training.grad_accum_steps="
             f"{t.grad_accum_steps}; make it a multiple")
    max_seq = FLAVORS[m.flavor].max_seq_len
    # With init_from the checkpoint's config.json sets the shape; train.py checks seq_len against it.
    _require(bool(m.init_from) or t.seq_len <= max_seq,
             f"training.seq_len: {t.seq_len} exceeds flavor {m.flavor!r}'s max_seq_len {max_seq}; lower it")
    _require(o.lr > 0, f"optimizer.lr: must be > 0, got {o.lr}")
    _require(0 <= o.warmup_steps, f"optimizer.warmup_steps: must be >= 0, got {o.warmup_steps}")
    _require(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    for where, value in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)]:
        _require(0 <= value < 1, f"{where}: must be in [0, 1), got {value}")  # else AdamW raises mid-startup
    _require(o.eps >= 0, f"optimizer.eps: must be >= 0, got {o.eps}")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    _require(t.max_grad_norm > 0, f"training.max_grad_norm: must be > 0, got {t.max_grad_norm}")
    _require(c.interval >= 0, f"checkpoint.interval: must be >= 0 (0 = only at the end), got {c.interval}")
    _require(bool(config.job.output_dir), "job.output_dir: must not be empty; name a folder for the run")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):  # JSON's Infinity/NaN are not TOML
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        # JSON escapes are TOML's, except the surrogate pairs ensure_ascii makes of characters beyond U+FFFF;
        # TOML also wants DEL escaped, which JSON leaves raw.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return json.dumps(value)


def to_toml(config: Config) -> str:
    """The resolved config as TOML (what the run saves as <output_dir>/config.toml); load_config reads it back
    to the same Config."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)
