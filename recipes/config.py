"""TOML config -> typed dataclasses, with `--section.key value` overrides and validation.

Every mistake a user can fix raises UserError with one line naming the field and the fix; train.py prints
it and exits with code 2. docs/config.md documents every key. Configuration only: the model's shape and whether it
fits the data are decided in recipes/build.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from recipes.errors import UserError
from recipes.qwen3.model import Qwen3Config


def key(default, help: str):
    """A config key: its default and the one line `train.py --help` shows beside it (docs/config.md says more)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    flavor: str = key("debug", "model shape: debug, small, 0.6B, 1.7B, 4B, 8B, 14B, 32B (ignored with init_from)")
    attention: str = key("sdpa", "attention backend: sdpa | flex | varlen")
    mask: str = key(Qwen3Config.mask, "document: causal within each packed document; causal: across the whole row")
    init_from: str = key("", 'HF Qwen3 checkpoint folder to start from (sets the shape); "" = random init')
    kernel: str = key("auto", "varlen's kernel: auto | torch (FlashAttention-2 in torch) | fa4 (FlashAttention-4)")


@dataclass
class TrainingConfig:
    steps: int = key(100, "optimizer steps in the run (the LR schedule is a function of it)")
    seq_len: int = key(256, "tokens per row, at most the model's max_seq_len")
    local_batch_size: int = key(4, "rows per process per step (global batch = this x world size)")
    grad_accum_steps: int = key(1, "micro-batches per step; must divide local_batch_size")
    max_grad_norm: float = key(1.0, "clip gradients to this global L2 norm (inf: report only)")
    seed: int = key(0, "model initialisation and data order")
    dtype: str = key("bfloat16", "bfloat16 | float32: parameter gather and compute dtype (gradients reduce in float32)")
    compile: bool = key(False, "torch.compile each transformer block")
    float8: bool = key(False, "the blocks' matmuls in float8 (torchao, tensorwise); pays from 1.7B up on H100/H200")
    activation_checkpoint: str = key("none", "none | full | selective")
    deterministic: bool = key(False, "torch.use_deterministic_algorithms: bitwise reruns on GPU, slower")
    skip_nonfinite: bool = key(False, "skip a step whose loss or grad norm is not finite instead of exiting with 3")


@dataclass
class ParallelConfig:
    replicate: int = key(
        1,
        "HSDP replicas (FSDP shards within each, gradients all-reduced across them); 1 = plain "
        "FSDP; 0 = one replica per node",
    )


@dataclass
class OptimizerConfig:
    lr: float = key(3e-4, "peak learning rate of AdamW")
    weight_decay: float = key(0.1, "AdamW's decoupled weight decay")
    beta1: float = key(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = key(0.95, "AdamW beta2, in [0, 1)")
    eps: float = key(1e-8, "AdamW epsilon")
    warmup_steps: int = key(10, "linear warmup length in steps (0: none)")
    decay: str = key("cosine", "cosine | linear | sqrt, from the end of warmup to the last step")
    min_lr_ratio: float = key(0.1, "the decay ends at lr x min_lr_ratio")


@dataclass
class DataConfig:
    dataset: str = key("stdlib", "stdlib (offline default), a local .jsonl/.json/.parquet/.txt file or folder, hf:NAME")
    dataset_config: str = key("", "the hub dataset's configuration name (hf: only)")
    split: str = key("train", "the hub dataset's split (hf: only)")
    text_field: str = key("text", "the record field holding the text")
    tokenizer: str = key("default", "default (BPE trained on stdlib, cached), a tokenizer.json, a folder or a hub id")
    vocab_size: int = key(2048, "size of the default BPE tokenizer")
    eos_token: str = key("", 'token that ends each document; "" = the tokenizer\'s own end-of-text token')
    mask_boundary_loss: bool = key(False, "ignore the label that predicts the next document's first token")


@dataclass
class EvalConfig:
    interval: int = key(0, "steps between validation losses on the held-out documents (and the last step); 0 = never")
    batches: int = key(4, "global batches of held-out rows per validation (the same rows every time)")
    sample_every: int = key(0, "steps between greedy samples of sample_prompt (log, metrics.jsonl, W&B); 0 = never")
    sample_prompt: str = key("def ", "the prompt the samples continue")


@dataclass
class CheckpointConfig:
    enable: bool = key(True, "false: never save (benchmarks); resume still loads what the folder holds")
    interval: int = key(0, "steps between checkpoints; 0 = only at the end and on preemption")
    resume: bool = key(True, "continue from the newest complete checkpoint when output_dir holds this run")
    keep: int = key(2, "keep the newest this many checkpoints")
    load_step: int = key(0, "resume from the checkpoint of this step (later ones are moved aside); 0 = the newest")
    export_hf: bool = key(False, "at the end, also export the last checkpoint for transformers to output_dir/hf")


@dataclass
class JobConfig:
    output_dir: str = key("outputs/run", "the run's folder (config.toml, metrics.jsonl, checkpoints/, ...)")
    name: str = key("", 'run name in logs and W&B; "" = <flavor>-<attention>-<mask>')
    print_config: bool = key(False, "print the resolved config (every key) at the start")


@dataclass
class MetricsConfig:
    log_every: int = key(10, "log every this many steps (the last and a preempted step always)")
    wandb: bool = key(False, "also log to W&B: online with credentials and network, else offline in output_dir/wandb")
    wandb_project: str = key("qwen3-fsdp-recipes", "W&B project (WANDB_PROJECT wins)")
    wandb_entity: str = key("", 'W&B user or team; "" = WANDB_ENTITY, else your default')
    wandb_group: str = key("", 'W&B run group; "" = WANDB_RUN_GROUP, else none')
    wandb_tags: list[str] = key([], "W&B tags")
    profile: bool = key(False, "torch.profiler over steps 7-9; rank 0 writes output_dir/profile/")
    tensorboard: bool = key(False, "also write the metrics.jsonl rows as TensorBoard scalars to output_dir/tensorboard")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    job: JobConfig = field(default_factory=JobConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def run_name(self) -> str:
        return self.job.name or f"{self.model.flavor}-{self.model.attention}-{self.model.mask}"


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
AC_MODES = ("none", "full", "selective")


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
        raise UserError(f'{where}: expected a list of strings, got {value!r}; write e.g. ["a", "b"]')
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise UserError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")


def _parse_override(where: str, text: str, expected):
    """Command-line values are strings; read them as the field's type."""
    if expected is str:
        return text
    if typing.get_origin(expected) is list:
        return [item for item in text.split(",") if item]
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise UserError(f"{where}: cannot read {text!r} as {expected.__name__}") from None
    return _check_type(where, value, expected)


def _apply(config: Config, section: str, key: str, value, from_cli: bool) -> None:
    if section not in _SECTIONS:
        raise UserError(f"unknown section [{section}]{_closest(section, _SECTIONS)}")
    types = _section_types(section)
    where = f"{section}.{key}"
    if key not in types:
        raise UserError(f"unknown key {where}{_closest(key, types)}")
    value = _parse_override(where, value, types[key]) if from_cli else _check_type(where, value, types[key])
    setattr(getattr(config, section), key, value)


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """['--training.steps', '5', '--job.output_dir=x'] -> [('training', 'steps', '5'), ('job', 'output_dir', 'x')]"""
    overrides, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"--{name}: missing value; write --{name} VALUE")
            value, i = argv[i + 1], i + 1
        section, _, key = name.partition(".")
        overrides.append((section, key, value))
        i += 1
    return overrides


def load_config(path: str | None, overrides: list[str] = (), source: str = "--config") -> Config:
    """`source` names the file in errors: "--config" for train.py's argument, the path for a run's config.toml."""
    config = Config()
    if path is not None:
        file = expand_path(path, source)
        if not file.is_file():
            what = f"file {path} not found" if not file.exists() else f"{path} is not a regular file"
            raise UserError(f"{source}: {what}; pass an existing TOML file, e.g. configs/qwen3_debug.toml")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8-sig"))  # -sig: a BOM from an editor is no error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{source}: {path} is not valid TOML ({error}); fix the line it names") from None
        except OSError as error:  # unreadable: permissions, I/O
            raise UserError(f"{source}: {path} cannot be read ({error.strerror}); check its permissions") from None
        for section, values in data.items():
            if isinstance(values, list) and values and all(isinstance(v, dict) for v in values):
                raise UserError(f"{path}: [[{section}]] is an array of tables; write [{section}] once")
            if not isinstance(values, dict):
                raise UserError(f"{path}: top-level key {section!r} must be a [section]{_closest(section, _SECTIONS)}")
            for key, value in values.items():
                _apply(config, section, key, value, from_cli=False)
    for section, key, value in parse_overrides(list(overrides)):
        _apply(config, section, key, value, from_cli=True)
    validate(config)
    return config


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(where: str, value: str, choices) -> None:
    _require(value in choices, f"{where}: {value!r} is not one of {', '.join(choices)}{_suggestion(value, choices)}")


# Upper bounds that keep every size far inside what torch indexes and allocates (int32 sequence offsets, int64
# seeds), so an absurd value is refused here instead of failing mid-startup.
_MAX_COUNT = 2**31 - 1
_MAX_SEED = 2**63 - 1


def validate(config: Config) -> None:
    """Checks that need no files or processes; data, tokenizer and world size are checked where they are built,
    and whether the model fits the data by `build.check_fits`."""
    from recipes.qwen3.attention import BACKENDS, KERNELS, MASKS
    from recipes.qwen3.model import FLAVORS

    m, t, o, c, x, e = (config.model, config.training, config.optimizer, config.checkpoint, config.metrics, config.eval)
    _choice("model.flavor", m.flavor, FLAVORS)
    _choice("model.attention", m.attention, BACKENDS)
    _choice("model.mask", m.mask, MASKS)
    _choice("model.kernel", m.kernel, KERNELS)
    _require(
        m.kernel == "auto" or m.attention == "varlen",
        f'model.kernel: {m.kernel!r} chooses among varlen\'s kernels; use "auto" with attention {m.attention!r}',
    )
    _choice("training.dtype", t.dtype, ("bfloat16", "float32"))
    _choice("training.activation_checkpoint", t.activation_checkpoint, AC_MODES)
    _choice("optimizer.decay", o.decay, ("cosine", "linear", "sqrt"))
    for where, value, low in [
        ("training.steps", t.steps, 1),
        ("training.seq_len", t.seq_len, 1),
        ("training.local_batch_size", t.local_batch_size, 1),
        ("training.grad_accum_steps", t.grad_accum_steps, 1),
        ("training.seed", t.seed, 0),
        ("optimizer.warmup_steps", o.warmup_steps, 0),
        ("metrics.log_every", x.log_every, 1),
        ("checkpoint.keep", c.keep, 1),
        ("checkpoint.interval", c.interval, 0),
        ("data.vocab_size", config.data.vocab_size, 1),
        ("eval.interval", e.interval, 0),
        ("eval.batches", e.batches, 1),
        ("checkpoint.load_step", c.load_step, 0),
        ("eval.sample_every", e.sample_every, 0),
        ("parallel.replicate", config.parallel.replicate, 0),
    ]:
        high = _MAX_SEED if where == "training.seed" else _MAX_COUNT
        _require(value >= low, f"{where}: must be {'> 0' if low else '>= 0'}, got {value}")
        _require(value <= high, f"{where}: must be at most {high}, got {value}")
    _require(
        t.local_batch_size * (t.seq_len + 1) <= _MAX_COUNT,
        f"training.local_batch_size: {t.local_batch_size} rows of {t.seq_len + 1} tokens exceed {_MAX_COUNT} "
        "tokens per step; lower it or training.seq_len",
    )
    _require(
        c.enable or not c.export_hf,
        "checkpoint.export_hf: exports the last checkpoint, but checkpoint.enable "
        "is false; enable checkpoints or drop export_hf",
    )
    _require(
        t.local_batch_size % t.grad_accum_steps == 0,
        f"training.local_batch_size: {t.local_batch_size} is not divisible by training.grad_accum_steps="
        f"{t.grad_accum_steps}; make it a multiple",
    )
    for where, value in [
        ("optimizer.lr", o.lr),
        ("optimizer.eps", o.eps),
        ("optimizer.weight_decay", o.weight_decay),
        ("optimizer.beta1", o.beta1),
        ("optimizer.beta2", o.beta2),
        ("optimizer.min_lr_ratio", o.min_lr_ratio),
    ]:
        _require(math.isfinite(value), f"{where}: must be a finite number, got {value}")
    _require(
        not math.isnan(t.max_grad_norm), "training.max_grad_norm: must be a number (inf disables clipping), got nan"
    )
    _require(o.lr > 0, f"optimizer.lr: must be > 0, got {o.lr}")
    _require(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    for where, value in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)]:
        _require(0 <= value < 1, f"{where}: must be in [0, 1), got {value}")  # else AdamW raises mid-startup
    _require(o.eps >= 0, f"optimizer.eps: must be >= 0, got {o.eps}")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    _require(t.max_grad_norm > 0, f"training.max_grad_norm: must be > 0, got {t.max_grad_norm}")
    d = config.data
    for where, value, empty_means in [
        ("job.output_dir", config.job.output_dir, None),
        ("data.dataset", d.dataset, None),
        ("data.tokenizer", d.tokenizer, None),
        ("model.init_from", m.init_from, "random init"),
    ]:
        if not value:
            _require(
                empty_means is not None,
                f"{where}: must not be empty (an empty path would mean the current "
                "folder); name it, e.g. the default in docs/config.md",
            )
            continue
        if where == "data.dataset" and (value == "stdlib" or value.startswith("hf:")):
            _require(value != "hf:", "data.dataset: 'hf:' names no dataset; write hf:NAME")
            continue
        expand_path(value, where)


# What POSIX file systems allow in one path component (NAME_MAX), in bytes.
_NAME_MAX = 255


def expand_path(path: str, where: str = "path") -> Path:
    """Every path a user gives (config keys, W&B dirs) is read the same way: `~` expanded. A `~user` that does not
    exist or a component longer than the file system allows is a UserError naming `where`."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory"
        raise UserError(
            f"{where}: {path!r} names a home folder ({path.split('/')[0]}) that does not exist; write the full path"
        ) from None
    long = next((part for part in expanded.parts if len(os.fsencode(part)) > _NAME_MAX), None)
    if long is not None:
        raise UserError(
            f"{where}: the path component {long[:40]!r}... is {len(os.fsencode(long))} bytes, over the "
            f"{_NAME_MAX} a file name may have; shorten it"
        )
    return expanded


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


def type_name(annotation) -> str:
    """How docs/config.md and --help write a key's type: str, int, float, bool, list[str]."""
    return "list[str]" if typing.get_origin(annotation) is list else annotation.__name__


def keys_help() -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default as TOML, one line) for every config key, in the order of the dataclasses."""
    rows = []
    for section in _SECTIONS:
        types = _section_types(section)
        for item in dataclasses.fields(globals()[_SECTIONS[section]]):
            default = item.default_factory() if item.default is dataclasses.MISSING else item.default
            rows.append((section, item.name, type_name(types[item.name]), _toml_value(default), item.metadata["help"]))
    return rows


def config_help() -> str:
    """Every section and key, with type, default and one line: the body of `train.py --help`."""
    lines, current = [], None
    for section, key_name, type_, default, text in keys_help():
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        lines.append(f"  --{section}.{key_name} {type_.upper()} (default {default})")
        lines.append(f"      {text}")
    return "\n".join(lines[1:])
