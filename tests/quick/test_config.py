"""recipes.config: TOML files, --section.key overrides, types, validation, the saved config.toml; configs/*.toml."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from recipes.config import Config, keys_help, load_config, parse_overrides, to_toml, tomllib
from recipes.errors import UserError
from recipes.run.outputs import DEFINES_RUN, MAY_CHANGE, config_keys

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
BACKEND_CONFIGS = {backend: CONFIGS / f"qwen3_{backend}.toml" for backend in ("sdpa", "flex", "varlen")}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------- files


def test_file_values_land_in_their_fields_and_the_rest_keep_defaults(tmp_path):
    config = load_config(write(tmp_path, '[model]\nattention = "flex"\n[training]\nsteps = 7\n[optimizer]\nlr = 1\n'))
    assert config.model.attention == "flex" and config.training.steps == 7
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)  # an int where a float goes
    assert config.model.mask == "document" and config.training.seq_len == 256  # untouched defaults
    assert config.run_name == "debug-flex-document"


def test_no_file_gives_the_defaults():
    assert load_config(None) == Config()


def test_debug_config_loads_as_written():
    config = load_config(str(CONFIGS / "qwen3_debug.toml"))
    raw = tomllib.loads((CONFIGS / "qwen3_debug.toml").read_text())
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    assert (config.model.flavor, config.training.dtype, config.data.dataset) == ("debug", "float32", "stdlib")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[trainin]\nsteps = 3\n", "unknown section [trainin]; did you mean 'training'?"),
        ("[training]\nstesp = 3\n", "unknown key training.stesp; did you mean 'steps'?"),
        ('[training]\nsteps = "20"\n', "training.steps: expected int, got str '20'"),
        ("[training]\nsteps = 2.5\n", "training.steps: expected int, got float 2.5"),
        ("[training]\nsteps = true\n", "training.steps: expected int, got bool True"),
        ("[training]\ncompile = 1\n", "training.compile: expected bool, got int 1"),
        ("[metrics]\nwandb_tags = [1, 2]\n", "metrics.wandb_tags: expected a list of strings, got [1, 2]"),
        ('[metrics]\nwandb_tags = "a"\n', "metrics.wandb_tags: expected a list of strings, got 'a'"),
        ("steps = 3\n", "top-level key 'steps' must be a [section]"),
        ("[training\nsteps = 3\n", "is not valid TOML"),
    ],
)
def test_file_mistakes_name_the_field_and_the_fix(tmp_path, text, message):
    with pytest.raises(UserError) as error:
        load_config(write(tmp_path, text))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file .*nope.toml not found; pass an existing TOML file"):
        load_config(str(tmp_path / "nope.toml"))


# ----------------------------------------------------------------------------------------------- overrides


def test_both_override_spellings_parse_the_same():
    assert parse_overrides(["--training.steps", "5", "--job.output_dir=a=b", "--job.name="]) == [
        ("training", "steps", "5"),
        ("job", "output_dir", "a=b"),
        ("job", "name", ""),
    ]


def test_overrides_are_read_as_the_field_type_and_win_over_the_file():
    config = load_config(
        str(CONFIGS / "qwen3_debug.toml"),
        [
            "--training.steps",
            "5",
            "--training.compile=true",
            "--training.deterministic",
            "false",
            "--optimizer.lr",
            "1e-3",
            "--optimizer.min_lr_ratio=0",
            "--optimizer.beta2",
            "9.5e-1",
            "--metrics.wandb_tags",
            "a,b c",
            "--job.name",
            "123",
            "--data.eos_token",
            "</s>",
        ],
    )
    assert config.training.steps == 5 and config.training.compile is True and config.training.deterministic is False
    assert config.optimizer.lr == 1e-3 and config.optimizer.min_lr_ratio == 0.0
    assert isinstance(config.optimizer.min_lr_ratio, float) and config.optimizer.beta2 == 0.95
    assert config.metrics.wandb_tags == ["a", "b c"]
    assert config.job.name == "123" and config.data.eos_token == "</s>"  # strings are taken as written
    assert load_config(None, ["--metrics.wandb_tags", ""]).metrics.wandb_tags == []
    assert load_config(None, ["--training.steps", "1", "--training.steps", "2"]).training.steps == 2  # last wins


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.steps", "five"], "training.steps: cannot read 'five' as int"),
        (["--training.steps", "2.5"], "training.steps: expected int, got float 2.5"),
        (["--training.compile", "yes"], "training.compile: cannot read 'yes' as bool"),
        (["--optimizer.lr", "true"], "optimizer.lr: expected float, got bool True"),
        (["--trainnig.steps", "3"], "unknown section [trainnig]; did you mean 'training'?"),
        (["--training.seqlen", "3"], "unknown key training.seqlen; did you mean 'seq_len'?"),
        (["--training.zzz", "3"], "unknown key training.zzz; valid: steps, seq_len"),
        (["--training.steps"], "--training.steps: missing value; write --training.steps VALUE"),
        (["steps=3"], "unexpected argument 'steps=3'; overrides look like --section.key value"),
        (["--steps", "3"], "unexpected argument '--steps'"),
    ],
)
def test_override_mistakes_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.attention", "flash"], "model.attention: 'flash' is not one of sdpa, flex, varlen"),
        (
            ["--model.attention", "vralen"],
            "model.attention: 'vralen' is not one of sdpa, flex, varlen; did you mean 'varlen'?",
        ),
        (["--model.mask", "sliding"], "model.mask: 'sliding' is not one of causal, document"),
        (["--model.flavor", "0.6b"], "model.flavor: '0.6b' is not one of debug, small, 0.6B"),
        (["--training.dtype", "float16"], "training.dtype: 'float16' is not one of bfloat16, float32"),
        (["--optimizer.decay", "step"], "optimizer.decay: 'step' is not one of cosine, linear, sqrt"),
        (["--training.steps", "0"], "training.steps: must be > 0, got 0"),
        (["--training.seq_len", "-1"], "training.seq_len: must be > 0"),
        (["--training.local_batch_size", "0"], "training.local_batch_size: must be > 0"),
        (["--training.grad_accum_steps", "0"], "training.grad_accum_steps: must be > 0"),
        (["--metrics.log_every", "0"], "metrics.log_every: must be > 0"),
        (["--checkpoint.keep", "0"], "checkpoint.keep: must be > 0"),
        (["--data.vocab_size", "0"], "data.vocab_size: must be > 0"),
        (
            ["--training.local_batch_size", "6", "--training.grad_accum_steps", "4"],
            "training.local_batch_size: 6 is not divisible by training.grad_accum_steps=4",
        ),
        (["--optimizer.lr", "0"], "optimizer.lr: must be > 0, got 0.0"),
        (["--optimizer.warmup_steps", "-1"], "optimizer.warmup_steps: must be >= 0"),
        (["--optimizer.min_lr_ratio", "1.5"], "optimizer.min_lr_ratio: must be in [0, 1], got 1.5"),
        (["--optimizer.beta1", "1"], "optimizer.beta1: must be in [0, 1), got 1.0"),
        (["--optimizer.beta2", "-0.1"], "optimizer.beta2: must be in [0, 1), got -0.1"),
        (["--optimizer.eps", "-1e-8"], "optimizer.eps: must be >= 0"),
        (["--optimizer.weight_decay", "-0.1"], "optimizer.weight_decay: must be >= 0"),
        (["--training.max_grad_norm", "0"], "training.max_grad_norm: must be > 0"),
        (["--checkpoint.interval", "-5"], "checkpoint.interval: must be >= 0"),
        (["--job.output_dir", ""], "job.output_dir: must not be empty"),
    ],
)
def test_validation_refuses_out_of_range_values(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(str(CONFIGS / "qwen3_debug.toml"), overrides)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text
    if " is not one of " in message:  # the choices are listed once: no "; valid: ..." repeats them
        choices = message.split(" is not one of ")[1].split(";")[0]
        assert text.count(choices) == 1 and "valid:" not in text, text


def test_validation_accepts_the_edges():
    config = load_config(
        None,
        [
            "--training.seq_len",
            "2048",
            "--optimizer.warmup_steps",
            "0",
            "--optimizer.min_lr_ratio",
            "1",
            "--checkpoint.interval",
            "0",
            "--training.local_batch_size",
            "6",
            "--training.grad_accum_steps",
            "3",
            "--training.max_grad_norm",
            "inf",
        ],
    )
    assert config.training.seq_len == 2048 and math.isinf(config.training.max_grad_norm)


# ----------------------------------------------------------------------------------------------- config.toml


def test_saved_config_reads_back_to_the_same_config(tmp_path):
    """What train.py saves as config.toml must reload unchanged, or a resume would see a different run."""
    config = load_config(
        str(CONFIGS / "qwen3_flex.toml"),
        [
            "--job.name",
            'run "quoted" \\ back\tslash 🚀 naïve \x7f',
            "--metrics.wandb_tags",
            "backends,ünï,🚀",
            "--training.max_grad_norm",
            "inf",
            "--optimizer.eps",
            "1e-12",
            "--optimizer.lr",
            "3e-4",
            "--data.dataset",
            "/data/my corpus/*.jsonl",
            "--metrics.wandb_entity",
            "",
        ],
    )
    text = to_toml(config)
    assert load_config(write(tmp_path, text)) == config
    assert set(tomllib.loads(text)) == {f.name for f in dataclasses.fields(Config)}
    # Every field is written, so the file does not depend on this version's defaults.
    assert sum(len(dataclasses.fields(getattr(config, f.name))) for f in dataclasses.fields(Config)) == sum(
        len(section) for section in tomllib.loads(text).values()
    )


def test_default_config_round_trips(tmp_path):
    assert load_config(write(tmp_path, to_toml(Config()))) == Config()


# ----------------------------------------------------------------------------------------------- configs/


def test_backend_configs_differ_only_in_attention_and_output_dir():
    """The backend comparison is only fair if the three runs share every setting but the backend (and each
    writes its own folder, which must differ: a folder holding another backend's run is refused)."""
    raw = {backend: tomllib.loads(path.read_text()) for backend, path in BACKEND_CONFIGS.items()}
    for backend, values in raw.items():
        assert values["model"].pop("attention") == backend
        assert values["job"].pop("output_dir") == f"outputs/qwen3_{backend}"
    assert raw["sdpa"] == raw["flex"] == raw["varlen"]


@pytest.mark.parametrize("name", ["qwen3_debug", "qwen3_sdpa", "qwen3_flex", "qwen3_varlen"])
def test_shipped_configs_load_and_validate(name):
    config = load_config(str(CONFIGS / f"{name}.toml"))
    assert config.job.output_dir == f"outputs/{name}"
    assert config.model.mask == "document"


# ----------------------------------------------------------------------------------------------- one home per rule


def test_every_config_key_is_classified_for_resume_exactly_once():
    """A new key must be put in DEFINES_RUN (must match to resume) or MAY_CHANGE (recorded when it changes)."""
    keys = set(config_keys(Config()))
    assert not DEFINES_RUN & MAY_CHANGE, DEFINES_RUN & MAY_CHANGE
    assert keys - (DEFINES_RUN | MAY_CHANGE) == set(), "classify these in recipes/run/outputs.py"
    assert (DEFINES_RUN | MAY_CHANGE) - keys == set(), "these are no config keys any more"


def _documented_keys() -> dict[str, tuple[str, str]]:
    """{"section.key": (type, default)} from the tables of docs/config.md, each under its section's heading."""
    text = (REPO / "docs" / "config.md").read_text()
    rows = {}
    for part in text.split("\n## [")[1:]:
        section, _, body = part.partition("]")
        for line in body.split("\n## ")[0].splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) >= 4 and cells[0].startswith("`") and cells[0] != "`key`":
                rows[f"{section}.{cells[0].strip('`')}"] = (cells[1], cells[2].strip("`"))
    return rows


def test_help_and_docs_list_the_same_keys_with_the_same_types_and_defaults():
    """train.py --help is generated from the dataclasses (keys_help); docs/config.md must say the same: every key,
    no key that is gone, and the same type and default (compared as TOML values, so 3e-4 equals 0.0003)."""
    documented = _documented_keys()
    in_help = {f"{section}.{key}": (type_, default) for section, key, type_, default, _ in keys_help()}
    assert set(in_help) - set(documented) == set(), "add a row to docs/config.md for these"
    assert set(documented) - set(in_help) == set(), "docs/config.md documents keys that do not exist"
    for key, (type_, default) in in_help.items():
        doc_type, doc_default = documented[key]
        assert doc_type == type_, f"docs/config.md: {key} is {type_}, not {doc_type}"
        parse = lambda text: tomllib.loads(f"v = {text}")["v"]
        assert parse(doc_default) == parse(default), f"docs/config.md: {key} defaults to {default}, not {doc_default}"


def test_help_lists_every_key_with_its_line_and_the_override_syntax(capsys):
    import train

    with pytest.raises(SystemExit) as stopped:
        train.main(["--help"])
    assert stopped.value.code == 0
    help_text = capsys.readouterr().out
    assert "--section.key VALUE" in help_text and "--training.steps 50" in help_text
    for section, key, type_, default, line in keys_help():
        assert f"--{section}.{key} {type_.upper()} (default {default})\n      {line}\n" in help_text + "\n"


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_activation_checkpoint_modes(tmp_path, mode):
    assert load_config(None, ["--training.activation_checkpoint", mode]).training.activation_checkpoint == mode
    path = write(tmp_path, f'[training]\nactivation_checkpoint = "{mode}"\n')
    assert load_config(path).training.activation_checkpoint == mode


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.seed", "-1"], "training.seed: must be >= 0, got -1"),
        (["--training.seed", str(2**64)], "training.seed: must be at most 9223372036854775807"),
        (["--training.steps", str(2**40)], "training.steps: must be at most 2147483647"),
        (
            ["--training.seq_len", "65536", "--training.local_batch_size", "65536"],
            "training.local_batch_size: 65536 rows of 65537 tokens exceed",
        ),
        (["--optimizer.lr", "nan"], "optimizer.lr: must be a finite number, got nan"),
        (["--optimizer.lr", "inf"], "optimizer.lr: must be a finite number, got inf"),
        (["--optimizer.eps", "inf"], "optimizer.eps: must be a finite number"),
        (["--optimizer.weight_decay", "nan"], "optimizer.weight_decay: must be a finite number"),
        (["--optimizer.beta2", "nan"], "optimizer.beta2: must be a finite number"),
        (["--training.max_grad_norm", "nan"], "training.max_grad_norm: must be a number (inf disables clipping)"),
        (["--model.kernel", "fa4"], "model.kernel: 'fa4' chooses among varlen's kernels"),
        (["--model.kernel", "fa3"], "model.kernel: 'fa3' is not one of auto, torch, fa4"),
        (["--eval.batches", "0"], "eval.batches: must be > 0, got 0"),
        (["--training.activation_checkpoint", "some"], "training.activation_checkpoint: 'some' is not one of none"),
    ],
)
def test_bounds_and_non_finite_values_are_refused(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(None, overrides)
    assert str(error.value).startswith(message), str(error.value)
