"""Bad input ends one way: exit code 2, one line `error: <field>: <what is wrong>; <the fix>` on stderr, no Python
traceback, and nothing written: an output folder that did not exist is not created, one that did is left byte for
byte with its mtimes. Each case is one real `python train.py` (torchrun for the world-size case); the cases run a
few at a time, each then checked by its own test.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import tokenizers
from train_process import REPO, debug_run, train_command

from recipes.config import Config, load_config, to_toml
from recipes.errors import USER_ERROR_EXIT_CODE
from recipes.qwen3.hf import save_hf_checkpoint
from recipes.qwen3.model import Qwen3Model, flavor_config

# Two steps of the debug config, a checkpoint after each.
RUN = debug_run(steps=2, warmup_steps=1, checkpoint_interval=1)
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d \[rank\d+\] ")


# ----------------------------------------------------------------------------------------------- the cases
# A case prepares its folder (given a finished run to copy) and returns train.py's extra arguments; the run writes
# to <case folder>/run, which a case creates only when it is about a folder that already exists. `expected` is the
# error line, less its "error: ", as a regex.


@dataclass
class Case:
    prepare: Callable[[Path, Path], list[str]]
    expected: str


def arguments(*values: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, base: list(values)


def file_at(name: str, text: str, *option: str) -> Callable[[Path, Path], list[str]]:
    """Writes <case folder>/<name>; passes its path to `option` if one is given."""

    def prepare(tmp: Path, base: Path) -> list[str]:
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_text(text)
        return [*option, str(tmp / name)] if option else []

    return prepare


def config_file(text: str) -> Callable[[Path, Path], list[str]]:
    return file_at("config.toml", text, "--config")


def corpus(*lines: str) -> Callable[[Path, Path], list[str]]:
    return file_at("corpus.jsonl", "".join(line + "\n" for line in lines), "--data.dataset")


def copy_of_the_run(*values: str, change: Callable[[Path], None] = lambda run: None):
    """The finished run copied to <case folder>/run (mtimes kept), then `change`d; train.py gets `values`."""

    def prepare(tmp: Path, base: Path) -> list[str]:
        shutil.copytree(base, tmp / "run")
        change(tmp / "run")
        return list(values)

    return prepare


def latin1_corpus(tmp: Path, base: Path) -> list[str]:
    (tmp / "corpus.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xe9"}\n')  # \xe9: é in Latin-1, not UTF-8
    return ["--data.dataset", str(tmp / "corpus.jsonl")]


def tokenizer_folder_with_a_broken_config(tmp: Path, base: Path) -> list[str]:
    """A real tokenizer.json beside a tokenizer_config.json cut off mid-file."""
    (tmp / "tok").mkdir()
    vocab = {"a": 0, "<|endoftext|>": 1, "[UNK]": 2}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.save(str(tmp / "tok" / "tokenizer.json"))
    (tmp / "tok" / "tokenizer_config.json").write_text('{"eos_token": ')
    return ["--data.tokenizer", str(tmp / "tok")]


def tokenizer_larger_than_the_model(tmp: Path, base: Path) -> list[str]:
    """A word-level tokenizer of 3,002 tokens (the debug model has 2,048) and a small corpus in its words."""
    vocab = {f"w{i}": i for i in range(3000)} | {"<|endoftext|>": 3000, "[UNK]": 3001}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp / "tokenizer.json"))
    documents = [json.dumps({"text": " ".join(f"w{i}" for i in range(j, j + 300))}) for j in range(0, 3000, 300)]
    return ["--data.tokenizer", str(tmp / "tokenizer.json"), *corpus(*documents)(tmp, base)]


def another_flavor_in_the_folder_config(run: Path) -> None:
    """The folder's config.toml rewritten for flavor "small", so the folder check passes and the debug-model
    checkpoint meets a model it does not fit."""
    (run / "config.toml").write_text(to_toml(load_config(str(run / "config.toml"), ["--model.flavor", "small"])))


def step_2(change: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda run: change(run / "checkpoints" / "step-00000002")


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(1000)


DATASET_FIX = 'give "stdlib", a .jsonl/.json/.parquet/.txt file or folder, or "hf:NAME" for a hub dataset'
# A damaged file is caught by the checkpoint's manifest before DCP reads it (recipes/checkpoint.py, verify).
CHECKSUM = (
    r"checkpoint: \S+/run/checkpoints/step-00000002/{} {} \(manifest\.json\): step 2 is damaged; move "
    r"\S+/run/checkpoints/step-00000002 out of \S+/run/checkpoints \(the next resume then loads the one "
    r"before\); the previous complete checkpoint is \S+/run/checkpoints/step-00000001"
)
CHECKPOINT = (
    r"checkpoint\.resume: \S+/run/checkpoints/step-00000002 cannot be loaded \({}\); if it is damaged, "
    r"move it out of \S+/run/checkpoints to resume from the one before; if it is another run's, resume "
    r"with the config that wrote it, or set checkpoint\.resume=false and a new job\.output_dir"
)

CASES = {
    # the config file and the command line
    "toml_malformed": Case(
        config_file("[training\nsteps = 3\n"), r"--config: \S+ is not valid TOML \(.*\); fix the line it names"
    ),
    "unknown_section": Case(
        config_file("[trainig]\nsteps = 3\n"), r"unknown section \[trainig\]; did you mean 'training'\?"
    ),
    "unknown_key_in_file": Case(
        config_file('[model]\natention = "flex"\n'), r"unknown key model\.atention; did you mean 'attention'\?"
    ),
    "unknown_key_on_command_line": Case(
        arguments("--checkpoint.intervall", "5"), r"unknown key checkpoint\.intervall; did you mean 'interval'\?"
    ),
    "key_outside_a_section": Case(
        config_file("steps = 3\n"), r"\S+: top-level key 'steps' must be a \[section\]; valid: model, training, .*"
    ),
    "config_file_missing": Case(
        lambda tmp, base: ["--config", str(tmp / "nope.toml")],
        r"--config: file \S+/nope\.toml not found; pass an existing TOML file, e\.g\. "
        r"configs/qwen3_debug\.toml",
    ),
    "string_for_int_in_file": Case(
        config_file('[training]\nseq_len = "64"\n'), r"training\.seq_len: expected int, got str '64'"
    ),
    "word_for_int_on_command_line": Case(
        arguments("--training.steps", "ten"), r"training\.steps: cannot read 'ten' as int"
    ),
    "word_for_bool": Case(arguments("--training.compile", "yes"), r"training\.compile: cannot read 'yes' as bool"),
    "numbers_for_tag_list": Case(
        config_file("[metrics]\nwandb_tags = [1, 2]\n"),
        r"metrics\.wandb_tags: expected a list of strings, got \[1, 2\]; write e\.g\. "
        r"\[\"a\", \"b\"\]",
    ),
    "python_code_as_a_value": Case(  # values are TOML data, never evaluated: the payload would touch <tmp>/pwned
        lambda tmp, base: ["--training.steps", f"__import__('os').system('touch {tmp}/pwned')"],
        r"training\.steps: cannot read .* as int",
    ),
    "zero_steps": Case(arguments("--training.steps", "0"), r"training\.steps: must be > 0, got 0"),
    "negative_steps": Case(arguments("--training.steps", "-3"), r"training\.steps: must be > 0, got -3"),
    "seq_len_beyond_the_flavor": Case(
        arguments("--training.seq_len", "4096"),
        r"training\.seq_len: 4096 exceeds the model's max_seq_len 2048; lower it",
    ),
    "seed_below_zero": Case(arguments("--training.seed", "-1"), r"training\.seed: must be >= 0, got -1"),
    "seed_beyond_int64": Case(
        arguments("--training.seed", str(2**64)),
        r"training\.seed: must be at most 9223372036854775807, got 18446744073709551616",
    ),
    "steps_beyond_int32": Case(
        arguments("--training.steps", str(2**40)), r"training\.steps: must be at most 2147483647, got 1099511627776"
    ),
    "rows_beyond_int32_tokens": Case(
        arguments("--training.seq_len", "65536", "--training.local_batch_size", "40000"),
        r"training\.local_batch_size: 40000 rows of 65537 tokens exceed 2147483647 tokens "
        r"per step; lower it or training\.seq_len",
    ),
    "lr_nan": Case(arguments("--optimizer.lr", "nan"), r"optimizer\.lr: must be a finite number, got nan"),
    "eps_inf": Case(arguments("--optimizer.eps", "inf"), r"optimizer\.eps: must be a finite number, got inf"),
    "grad_norm_nan": Case(
        arguments("--training.max_grad_norm", "nan"),
        r"training\.max_grad_norm: must be a number \(inf disables clipping\), got nan",
    ),
    "kernel_for_sdpa": Case(
        arguments("--model.kernel", "fa4"),
        r"model\.kernel: 'fa4' chooses among varlen's kernels; use \"auto\" with attention 'sdpa'",
    ),
    "config_is_a_folder": Case(
        lambda tmp, base: ["--config", str(tmp)],
        r"--config: \S+ is not a regular file; pass an existing TOML file, e\.g\. "
        r"configs/qwen3_debug\.toml",
    ),
    "batch_not_divisible_into_micro_batches": Case(
        arguments("--training.local_batch_size", "3", "--training.grad_accum_steps", "2"),
        r"training\.local_batch_size: 3 is not divisible by training\.grad_accum_steps=2; make it a multiple",
    ),
    "unknown_flavor": Case(
        arguments("--model.flavor", "debugg"),
        r"model\.flavor: 'debugg' is not one of debug, small, .*; did you mean 'debug'\?",
    ),
    "unknown_backend": Case(
        arguments("--model.attention", "flash"), r"model\.attention: 'flash' is not one of sdpa, flex, varlen"
    ),
    "unknown_mask": Case(
        arguments("--model.mask", "sliding"), r"model\.mask: 'sliding' is not one of causal, document"
    ),
    "unknown_dtype": Case(
        arguments("--training.dtype", "fp16"),
        r"training\.dtype: 'fp16' is not one of bfloat16, float32; did you mean 'bfloat16'\?",
    ),
    # data, tokenizer, weights
    "dataset_missing": Case(
        lambda tmp, base: ["--data.dataset", str(tmp / "corpus.jsonl")],
        rf"data\.dataset: '\S+/corpus\.jsonl' does not exist; {re.escape(DATASET_FIX)}",
    ),
    "dataset_folder_without_files": Case(
        lambda tmp, base: ["--data.dataset", str(tmp)],
        r"data\.dataset: folder \S+ holds no \.jsonl/\.json/\.parquet/\.txt files; "
        r"point it at a folder that does",
    ),
    "dataset_not_json_lines": Case(
        corpus('{"text": "a document"}', "not json"),
        r"data\.dataset: \S+/corpus\.jsonl:2: not a JSON line \(.*\); fix or remove that "
        r"record, or point data\.dataset elsewhere",
    ),
    "dataset_record_not_a_string": Case(
        corpus('{"text": "a document"}', '{"text": ["a", "list"]}'),
        r"data\.dataset: \S+/corpus\.jsonl:2: 'text' must be a string, got list; .*",
    ),
    "dataset_line_not_an_object": Case(
        corpus('{"text": "a document"}', "", '"just a string"'),
        r"data\.dataset: \S+/corpus\.jsonl:3: a record must be a JSON object, got str; "
        r".*",
    ),
    "dataset_not_utf8": Case(latin1_corpus, r"data\.dataset: \S+/corpus\.jsonl:2: not UTF-8 \(byte 25\); .*"),
    "tokenizer_config_not_json": Case(
        tokenizer_folder_with_a_broken_config,
        r"data\.tokenizer: \S+/tok/tokenizer_config\.json is not JSON \(.*\); fix it, or set data\.eos_token",
    ),
    "dataset_without_the_text_field": Case(
        corpus('{"body": "a document"}'),
        r"data\.text_field: 'text' is not a field of the records in \S+ \(fields: "
        r"body\); set data\.text_field to the one holding the text",
    ),
    "tokenizer_missing": Case(
        lambda tmp, base: ["--data.tokenizer", str(tmp / "tokenizer.json")],
        r"data\.tokenizer: '\S+/tokenizer\.json' does not exist; give a tokenizer\.json, a "
        r"folder, a hub id or \"default\"",
    ),
    "tokenizer_not_a_tokenizer": Case(
        file_at("tokenizer.json", '{"model": "none"}', "--data.tokenizer"),
        r"data\.tokenizer: \S+ is not a tokenizers JSON file \(.*\); point it at a HF tokenizer\.json",
    ),
    "tokenizer_larger_than_the_model": Case(
        tokenizer_larger_than_the_model,
        r"data\.tokenizer: vocabulary 3002 exceeds model vocab 2048 \(\S+\); "
        r"pick a flavor with a larger vocabulary or a smaller tokenizer "
        r"\(data\.vocab_size for the default one\)",
    ),
    "eos_token_not_in_the_vocabulary": Case(
        arguments("--data.eos_token", "<|nope|>"),
        r"data\.eos_token: '<\|nope\|>' is not a token of .*; set "
        r"data\.eos_token to a token in its vocabulary",
    ),
    "init_from_missing": Case(
        lambda tmp, base: ["--model.init_from", str(tmp / "hf")],
        r"\S+/hf: no config\.json; point model\.init_from at an HF Qwen3 checkpoint folder",
    ),
    # the output folder
    "folder_holds_another_run": Case(
        copy_of_the_run("--training.seed", "1"),
        r"job\.output_dir: \S+/run holds a different run \(training\.seed: 0 "
        r"there, 1 now\); choose a new job\.output_dir",
    ),
    "steps_below_the_checkpoint": Case(
        copy_of_the_run("--training.steps", "1"),
        r"training\.steps: 1 is below step 2 of the checkpoint \S+/step-00000002; "
        r"set it to at least 2 to continue this run \(nothing was changed\)",
    ),
    "folder_holds_this_run_but_resume_is_off": Case(
        copy_of_the_run("--checkpoint.resume", "false"),
        r"job\.output_dir: \S+/run already holds this run; set "
        r"--checkpoint\.resume true to continue it, or choose a new "
        r"job\.output_dir",
    ),
    "folder_holds_something_else": Case(
        file_at("run/notes.txt", "mine"),
        r"job\.output_dir: \S+/run is not empty and holds no run of this recipe; choose a new or empty folder",
    ),
    "folder_is_a_file": Case(
        file_at("run", "a file"), r"job\.output_dir: \S+/run is a file, not a folder; choose another job\.output_dir"
    ),
    # the checkpoint
    "checkpoint_state_not_json": Case(
        copy_of_the_run(change=step_2(lambda folder: (folder / "train_state.json").write_bytes(b"\0\xff"))),
        CHECKPOINT.format(r"train_state\.json: UnicodeDecodeError: .*"),
    ),
    "checkpoint_shard_truncated": Case(
        copy_of_the_run(change=step_2(lambda folder: truncate(folder / "__0_0.distcp"))),
        CHECKSUM.format("__0_0.distcp", "does not match its checksum"),
    ),
    "checkpoint_metadata_missing": Case(
        copy_of_the_run(change=step_2(lambda folder: (folder / ".metadata").unlink())),
        CHECKSUM.format(r"\.metadata", "is missing"),
    ),
    "checkpoint_of_another_model": Case(
        copy_of_the_run("--model.flavor", "small", "--training.steps", "3", change=another_flavor_in_the_folder_config),
        CHECKPOINT.format(
            r"ValueError: Size mismatch between saved torch\.Size\(\[2048, 128\]\) and current: "
            r"torch\.Size\(\[8192, 512\]\) for model\.tok_embeddings\.weight"
        ),
    ),
}


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict
    after: dict
    payload_ran: bool


def snapshot(path: Path) -> dict:
    """{relative path: (mtime_ns, sha256 or None for a folder)} of path and everything under it; {} if absent."""
    if not path.exists():
        return {}
    entries = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    return {
        str(entry.relative_to(path.parent)): (
            entry.stat().st_mtime_ns,
            hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else None,
        )
        for entry in entries
    }


def run_case(env: dict, base: Path, tmp: Path, case: Case, nproc: int = 1) -> Outcome:
    tmp.mkdir()
    args = case.prepare(tmp, base)
    out = tmp / "run"
    before = snapshot(out)
    result = subprocess.run(
        train_command([*RUN, "--job.output_dir", str(out), *args], nproc),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Outcome(result.returncode, result.stdout, result.stderr, before, snapshot(out), (tmp / "pwned").exists())


@pytest.fixture(scope="module")
def base_run(env, tmp_path_factory) -> Path:
    """A finished run, one process: config.toml, metrics.jsonl and checkpoints of steps 1 and 2."""
    out = tmp_path_factory.mktemp("base") / "run"
    subprocess.run(
        [sys.executable, "train.py", *RUN, "--job.output_dir", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


@pytest.fixture(scope="module")
def outcomes(env, base_run, tmp_path_factory) -> dict[str, Outcome]:
    """Every case, three processes at a time (each mostly imports torch and stops at its check)."""
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=3) as pool:
        started = {name: pool.submit(run_case, env, base_run, root / name, case) for name, case in CASES.items()}
        return {name: future.result() for name, future in started.items()}


def assert_one_error_line(output: str, expected: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    assert re.fullmatch(expected, errors[0].removeprefix("error: ")), f"{errors[0]}\n  does not match\n{expected}"


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(outcomes, name):
    outcome = outcomes[name]
    assert outcome.returncode == USER_ERROR_EXIT_CODE, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert outcome.stdout == ""
    assert_one_error_line(outcome.stderr, CASES[name].expected)
    *before_error, _ = outcome.stderr.splitlines()  # the error is the last line; the ones before, the log's
    assert all(LOG_LINE.match(line) for line in before_error), outcome.stderr[-3000:]
    assert outcome.after == outcome.before  # not created if it did not exist; else not a byte or mtime changed
    assert not outcome.payload_ran


def test_resuming_on_another_world_size_is_refused(env, base_run, tmp_path):
    """The token stream does not depend on the world size, but the global batch does: a checkpoint written with
    1 rank x 2 rows, resumed by 2 ranks x 2 rows, would continue a different run. Every rank refuses; rank 0 prints
    the line, and torchrun (exit 1) adds its own summary, with no traceback from the recipe. One step more than the
    finished run, so that the checkpoint is loaded (a finished run's rerun loads nothing)."""
    case = Case(
        copy_of_the_run("--training.steps", "3"),
        r"world size x training\.local_batch_size: the checkpoint's data stream was made with 2, this run "
        r"has 4; resume with the same setting, or use a new job\.output_dir",
    )
    outcome = run_case(env, base_run, tmp_path / "case", case, nproc=2)
    assert outcome.returncode == 1
    assert re.search(r"exitcode\s*: 2", outcome.stderr)
    assert_one_error_line(outcome.stderr, case.expected)
    assert not re.search(rf'File "{re.escape(str(REPO))}/(train\.py|recipes/)', outcome.stderr)  # torchrun's only
    assert outcome.after == outcome.before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repeat", "sdpx"], "--repeat must name a backend (sdpa, flex or varlen), got 'sdpx'"),
        (["--nproc", "two"], "--nproc must be a positive integer, got 'two'"),
        (["--nproc", "0"], "--nproc must be a positive integer, got '0'"),
        (["--nproc"], "--nproc needs a value"),
    ],
)
def test_train_backends_checks_every_argument_before_it_trains(tmp_path, args, message):
    out = tmp_path / "comparison"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "train_backends.sh"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE and result.stdout == ""
    assert result.stderr == f"train_backends.sh: {message}\n"
    assert not out.exists()


def test_eval_matrix_refuses_a_damaged_checkpoint_with_one_line(env, base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    truncate(run / "checkpoints" / "step-00000002" / "__0_0.distcp")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_matrix.py"), str(run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE and result.stdout == "", result.stderr[-2000:]
    assert re.fullmatch(
        CHECKSUM.format("__0_0.distcp", "does not match its checksum") + r"\n", result.stderr.removeprefix("error: ")
    ), result.stderr


# ----------------------------------------------------------------------------------------------- generated cases
# Every key of the config's dataclasses gets the bad values of its type, so a new key is covered as soon as it
# exists (a new text key must first be sorted into one of the sets below). All cases share one launch of
# tests/process/input_cases.py, which forks a process per case; each is checked by its own test.

ZERO_IS_VALID = {
    "training.seed",
    "optimizer.warmup_steps",
    "checkpoint.interval",
    "eval.interval",
    "optimizer.weight_decay",
    "optimizer.beta1",
    "optimizer.beta2",
    "optimizer.eps",
    "optimizer.min_lr_ratio",
    "parallel.replicate",  # 0: one replica per node
    "eval.sample_every",  # 0: never
    "checkpoint.load_step",  # 0: the newest
}
CHOICES = {
    "model.flavor",
    "model.attention",
    "model.mask",
    "model.kernel",
    "training.dtype",
    "training.activation_checkpoint",
    "optimizer.decay",
}
PATHS = {"job.output_dir", "data.dataset", "data.tokenizer", "model.init_from"}
FREE_TEXT = {
    "data.dataset_config",
    "data.split",
    "data.text_field",
    "data.eos_token",
    "job.name",
    "metrics.wandb_project",
    "metrics.wandb_entity",
    "metrics.wandb_group",
    "eval.sample_prompt",
}  # checked where used, above
VALUES = {
    int: {"empty": "", "word": "ten", "fraction": "1.5", "negative": "-1", "zero": "0"},
    float: {"empty": "", "word": "ten", "negative": "-1", "zero": "0"},
    bool: {"empty": "", "word": "maybe", "number": "2"},
    list[str]: {},
}  # on the command line a list is text (its items, comma-separated); a file's [1, 2] is above


def config_keys() -> dict[str, type]:
    """{"section.key": its type} of every key of the config."""
    return {
        f"{section}.{key}": kind
        for section, section_type in typing.get_type_hints(Config).items()
        for key, kind in typing.get_type_hints(section_type).items()
    }


def input_paths(tmp: Path) -> dict[str, Path]:
    names = {
        "empty": "empty",
        "garbage": "garbage.json",
        "tokenizer": "tokenizer.json",
        "corpus": "corpus.jsonl",
        "parquet": "corpus.parquet",
        "hf_truncated": "hf_truncated",
        "hf_garbage": "hf_garbage",
    }
    return {kind: tmp / name for kind, name in names.items()}


def make_inputs(tmp: Path) -> None:
    """The damaged inputs of input_paths, made once: a file of garbage, a truncated tokenizer.json and corpus, a
    parquet file of zeros, an empty folder, HF folders with a garbage config.json and a truncated model.safetensors."""
    tmp.mkdir()
    (tmp / "empty").mkdir()
    (tmp / "garbage.json").write_bytes(bytes(range(256)) * 4)
    vocab = {"a": 0, "<|endoftext|>": 1, "[UNK]": 2}
    whole = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]")).to_str()
    (tmp / "tokenizer.json").write_text(whole[: len(whole) // 2])
    (tmp / "corpus.jsonl").write_text('{"text": "a whole document"}\n{"text": "cut of')
    (tmp / "corpus.parquet").write_bytes(b"PAR1" + bytes(100))
    save_hf_checkpoint(Qwen3Model(flavor_config("debug")), tmp / "hf_truncated")
    truncate(tmp / "hf_truncated" / "model.safetensors")
    (tmp / "hf_garbage").mkdir()
    (tmp / "hf_garbage" / "config.json").write_bytes(bytes(range(256)))


def path_values(key: str, inputs: dict[str, Path], tmp: Path) -> dict[str, str]:
    values = {
        "empty": "",
        "missing": str(tmp / "missing"),
        "unknown_home": "~no_such_user_here/x",
        "long_name": str(tmp / ("a" * 300)),
    }
    if key == "job.output_dir":
        return {**values, "missing": None, "a_file": str(inputs["garbage"])}  # a missing output folder is made
    if key == "model.init_from":
        return {
            **values,
            "empty": None,
            "folder": str(inputs["empty"]),
            "garbage": str(inputs["hf_garbage"]),
            "truncated": str(inputs["hf_truncated"]),
        }  # "" means random init
    damaged = {
        "data.dataset": {
            "garbage": inputs["garbage"],
            "truncated": inputs["corpus"],
            "damaged_parquet": inputs["parquet"],
        },
        "data.tokenizer": {"garbage": inputs["garbage"], "truncated": inputs["tokenizer"]},
    }[key]
    return {**values, "folder": str(inputs["empty"]), **{name: str(path) for name, path in damaged.items()}}


def generated_cases(tmp: Path) -> dict[str, list[str]]:
    """{case name: train.py's extra arguments} for every key and each bad value of its kind; the damaged inputs
    lie under tmp/inputs (make_inputs)."""
    inputs = input_paths(tmp / "inputs")
    cases = {}
    for key, kind in config_keys().items():
        if key in PATHS:
            values = path_values(key, inputs, tmp)
        elif key in CHOICES:
            values = {"empty": "", "unknown": "nope"}
        else:
            values = dict(VALUES.get(kind, {}))
            if key in ZERO_IS_VALID:
                values.pop("zero")
        cases.update({f"{key}={name}": ["--" + key, value] for name, value in values.items() if value is not None})
    return cases


def test_every_text_key_is_sorted_into_paths_choices_or_free_text():
    """A new text key must be sorted before it counts as covered; every other kind has its bad values."""
    text = {key for key, kind in config_keys().items() if kind is str}
    assert text == PATHS | CHOICES | FREE_TEXT
    assert all(kind in VALUES for key, kind in config_keys().items() if kind is not str)


@pytest.fixture(scope="module")
def generated(env, tmp_path_factory) -> dict[str, tuple[int, str, str, dict, dict]]:
    """{case: (exit code, stdout, stderr, its folder before, after)}; one launch, one forked process per case."""
    root = tmp_path_factory.mktemp("generated")
    make_inputs(root / "inputs")
    cases = generated_cases(root)
    listing, before = [], {}
    for index, (name, args) in enumerate(cases.items()):
        folder = root / f"case{index}"
        folder.mkdir()
        output = ["--job.output_dir", str(folder / "run")]
        listing.append({"name": name, "argv": [*RUN, *output, *args], "folder": str(folder)})
        before[name] = snapshot(folder)
    (root / "cases.json").write_text(json.dumps(listing))
    result = subprocess.run(
        [sys.executable, "tests/process/input_cases.py", str(root / "cases.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout)
    return {
        item["name"]: (
            codes[item["name"]],
            Path(item["folder"] + ".stdout").read_text(),
            Path(item["folder"] + ".stderr").read_text(),
            before[item["name"]],
            snapshot(Path(item["folder"])),
        )
        for item in listing
    }


@pytest.mark.parametrize("name", generated_cases(Path("/nowhere")))
def test_each_key_refuses_its_bad_values_with_exit_2_and_one_line_naming_it(generated, name):
    code, stdout, stderr, before, after = generated[name]
    key = name.split("=")[0]
    assert code == USER_ERROR_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr and stdout == "", stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0], stderr[-3000:]
    assert all(LOG_LINE.match(line) for line in stderr.splitlines()[:-1]), stderr[-3000:]
    assert after == before  # nothing written: no output folder, nothing in the working folder


# ----------------------------------------------------------------------------------------------- script arguments
# Every numeric option of the Python scripts, by the argparse type that checks it (recipes/cli.py), gets the bad values
# of that type; test_every_numeric_script_option_is_in_the_table keeps the table complete.
SCRIPT_OPTIONS = {
    "compare_runs.py": {
        "--early-steps": "positive_int",
        "--window": "positive_int",
        "--margin": "nonnegative_float",
        "--skip-steps": "nonnegative_int",
    },
    "eval_matrix.py": {
        "--step": "positive_int",
        "--batches": "positive_int",
        "--batch-size": "positive_int",
        "--tolerance": "nonnegative_float",
    },
    "export_hf.py": {"--step": "positive_int"},
    "generate.py": {
        "--step": "positive_int",
        "--tokens": "positive_int",
        "--temperature": "nonnegative_float",
        "--top-k": "nonnegative_int",
        "--samples": "positive_int",
        "--seed": "nonnegative_int",
    },
}
BAD_VALUES = {
    "positive_int": ["0", "-1", "two", ""],
    "nonnegative_int": ["-1", "two", ""],
    "nonnegative_float": ["-1", "nan", "two", ""],
}
SCRIPT_CASES = [
    (script, option, value)
    for script, options in SCRIPT_OPTIONS.items()
    for option, kind in options.items()
    for value in BAD_VALUES[kind]
]


def numeric_options(script: Path) -> dict[str, str]:
    """{option: its recipes.cli type} for every add_argument call of `script` with a numeric type (read as Python)."""
    options = {}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            kinds = [kw.value.id for kw in node.keywords if kw.arg == "type" and isinstance(kw.value, ast.Name)]
            if kinds and kinds[0] in BAD_VALUES:
                options[node.args[0].value] = kinds[0]
    return options


def test_every_numeric_script_option_is_in_the_table():
    scripts = {path.name: numeric_options(path) for path in sorted((REPO / "scripts").glob("*.py"))}
    assert {name: options for name, options in scripts.items() if options} == SCRIPT_OPTIONS


@pytest.mark.parametrize("script, option, value", SCRIPT_CASES)
def test_script_refuses_a_bad_number_with_exit_2_and_one_line(env, tmp_path, script, option, value):
    """Refused by argparse before any work: one line naming the option, nothing written where the script ran."""
    runs = [str(tmp_path / "no-run")] + ([str(tmp_path / "no-dest")] if script == "export_hf.py" else [])
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *runs, option, value],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE and result.stdout == "", result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and f"error: argument {option}:" in result.stderr, result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("task_id", ["abc", "-1", "1.5"])
def test_train_sbatch_refuses_an_array_task_id_that_is_not_a_number(tmp_path, task_id):
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "train.sbatch"), "configs/qwen3_debug.toml", "configs/qwen3_debug.toml"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": task_id},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE and result.stdout == ""
    assert result.stderr == f"array task id '{task_id}' is not a number: submit with --array=0-1\n"
    assert not list(tmp_path.iterdir())
