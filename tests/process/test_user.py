"""What a user meets around a run, on real train.py processes (2 gloo processes under torchrun): the progress
lines, the timed phases and the corpus line, library warnings said once, the resolved config, the end summary,
TensorBoard events read back through tensorboard's own reader, the HF export at the end and scripts/generate.py
against transformers, a finished run's rerun, [checkpoint] load_step, and --dry-run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from train_process import REPO, debug_run, finish, launch

from recipes.errors import USER_ERROR_EXIT_CODE
from recipes.run.runs import read_metrics

STEPS = 6
# Warmup longer than the run: torchtitan warns "Warmup steps exceed total steps" on every rank.
RUN = debug_run(
    *["--eval.interval", "3", "--eval.batches", "1", "--metrics.tensorboard", "true", "--checkpoint.export_hf", "true"],
    *["--eval.sample_every", "3", "--eval.sample_prompt", "def main("],
    steps=STEPS,
    seq_len=32,
    warmup_steps=10,
    log_every=2,
    wandb=True,
    checkpoint_interval=2,
    checkpoint_keep=5,
)
TOKENS_PER_STEP = 2 * 2 * 32  # processes x local batch x seq_len


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time: equal snapshots mean nothing was written."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def run_train(env, log: Path, args: list[str], nproc: int = 2, code: int = 0) -> str:
    return finish(launch(env, log, [*RUN, *args], nproc=nproc), log, code)


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    """A finished run of STEPS steps, its console, and its folder."""
    root = tmp_path_factory.mktemp("user")
    console = run_train(env, root / "run.log", ["--job.output_dir", str(root / "run"), "--job.print_config", "true"])
    return root / "run", console


def test_progress_lines_say_where_the_run_is_and_how_long_it_has_left(run):
    out, console = run
    rows = {row["step"]: row for row in read_metrics(out)}
    lines = re.findall(r"\[rank0\] (step +\d+/\d+ .*)", console)
    assert [int(re.match(r"step +(\d+)/6 \((\d+)%\)", line)[1]) for line in lines] == [2, 3, 4, 6]
    for line in lines:
        step = int(re.match(r"step +(\d+)/", line)[1])
        assert f"({round(100 * step / STEPS)}%)" in line
        assert rows[step]["tokens"] == step * TOKENS_PER_STEP
        assert re.search(r"\| [\d,]+ tok/s/process \| tokens [\d.]+K? \| rss [\d.]+ GiB", line), line
        assert ("| eta " in line) == (step < STEPS), line
    for phase in ("tokenizer: loading", "data: loading", "model: building", "first step"):
        assert re.search(rf"\[rank0\] {phase}.*: done in [\d.]+ s", console), phase
    assert re.search(
        r"\[rank0\] data: [\d,]+ training documents, [\d.]+M tokens; 6 steps read 792 tokens = "
        r"[\d.e-]+ epochs",
        console,
    ), console[:3000]
    assert console.count("Warmup steps (10) exceed total steps (6)") == 1, "a library warning once, on rank 0"
    assert "[rank1]" not in console


def test_the_resolved_config_is_printed_at_the_start(run):
    out, console = run
    printed = console.split("resolved config (as saved to config.toml):\n", 1)[1]
    assert printed.startswith((out / "config.toml").read_text())


def test_the_summary_gives_the_totals_the_final_losses_the_checkpoint_and_the_next_commands(run):
    out, console = run
    last = read_metrics(out)[-1]
    summary = console[console.index("] done: ") :]
    assert re.match(
        rf"\] done: 6 steps \(0 -> 6\) in \d+s, [\d.]+ s/step; {6 * TOKENS_PER_STEP} tokens seen\n", summary
    ), summary
    assert f"final loss {last['loss']:.4f}, val_loss {last['val_loss']:.4f}\n" in summary
    assert f"newest checkpoint: {out}/checkpoints/step-00000006\n" in summary
    assert f"next: python scripts/generate.py {out} --prompt" in summary
    assert f"python scripts/export_hf.py {out} hf/run" in summary


def test_tensorboard_holds_the_rows_of_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = read_metrics(out)
    keys = {
        key
        for row in rows
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and value is not None
    }
    assert set(events.Tags()["scalars"]) == keys
    assert events.Tags()["tensors"] == ["sample/text_summary"]  # add_text's tag
    texts = [(event.step, event.tensor_proto.string_val[0].decode()) for event in events.Tensors("sample/text_summary")]
    assert texts == [(row["step"], row["sample"]) for row in rows if "sample" in row]
    for key in keys:
        expected = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        got = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in got] == [step for step, _ in expected], key
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6), key


def test_samples_during_training_are_generate_py_on_the_same_weights(run, env):
    """[eval] sample_every: the greedy text of the 2-process sharded model at step 6 is what generate.py writes
    from the step-6 checkpoint in one process."""
    out, console = run
    rows = {row["step"]: row for row in read_metrics(out)}
    assert [step for step, row in rows.items() if "sample" in row] == [3, 6]
    assert f"sample at step 6: {rows[6]['sample']!r}" in console
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), str(out), "--prompt", "def main(", "--tokens", "32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"\ndef main({rows[6]['sample']}\n")


def test_export_at_the_end_loads_in_transformers_and_generate_agrees_with_it(run, env):
    out, console = run
    hf = out / "hf"
    assert {path.name: path.stat().st_mode & 0o777 for path in hf.iterdir()} == {
        name: 0o644 for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    }
    model = transformers.Qwen3ForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    prompt = "def main("
    ids = torch.tensor([tokenizer.encode(prompt)])
    expected = model.generate(
        ids,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    expected_text = prompt + tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    for attention in ("sdpa", "varlen"):
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "generate.py"),
                str(out),
                "--prompt",
                prompt,
                "--tokens",
                "12",
                "--attention",
                attention,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split(f"--- {prompt!r}\n", 1)[1] == expected_text + "\n", attention


def test_rerunning_a_finished_run_says_so_and_touches_nothing(run, env, tmp_path):
    out, _ = run
    before = files(out)
    console = run_train(env, tmp_path / "again.log", ["--job.output_dir", str(out)], nproc=1)
    assert f"finished: {out} already trained to training.steps (step-00000006); nothing to do" in console
    assert "] step " not in console and "wandb" not in console
    assert files(out) == before  # no config.toml rewrite, no new W&B run, no TensorBoard events


def test_load_step_goes_back_and_a_rerun_continues_the_new_branch(run, env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run[0], out, symlinks=True)
    original = read_metrics(out)
    console = run_train(env, tmp_path / "back.log", ["--job.output_dir", str(out), "--checkpoint.load_step", "2"])
    assert f"resumed from {out}/checkpoints/step-00000002 (step 2)" in console
    (superseded,) = (out / "superseded").iterdir()
    assert sorted(path.name for path in superseded.iterdir()) == ["metrics.jsonl", "step-00000004", "step-00000006"]
    assert read_metrics(superseded) == original
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [row["step"] for row in original]
    # Steps 3-6 trained again from step 2's state: the same losses (the same world size and data)
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in original], rel=1e-6)
    (history,) = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert history["step"] == 2 and history["changed"]["checkpoint.load_step"] == {"from": 0, "to": 2}

    before = files(out)  # the same command again (a requeue): load_step was applied, the run is finished
    console = run_train(env, tmp_path / "again.log", ["--job.output_dir", str(out), "--checkpoint.load_step", "2"])
    assert "finished:" in console and files(out) == before


def test_load_step_without_its_checkpoint_is_one_line_and_exit_2(run, env, tmp_path):
    out, _ = run
    before = files(out)
    console = run_train(
        env,
        tmp_path / "missing.log",
        ["--job.output_dir", str(out), "--checkpoint.load_step", "3"],
        nproc=1,
        code=USER_ERROR_EXIT_CODE,
    )
    assert console.strip().splitlines()[-1] == (
        f"error: checkpoint.load_step: {out}/checkpoints has no complete "
        "checkpoint of step 3 (steps there: 2, 4, 6); pick one of them, or 0 "
        "for the newest"
    )
    assert files(out) == before


def test_dry_run_checks_everything_and_writes_nothing(run, env, tmp_path):
    out, _ = run
    new = tmp_path / "new"
    console = run_train(env, tmp_path / "dry.log", ["--job.output_dir", str(new), "--dry-run"], nproc=1)
    assert "dry run: every check passed" in console and f"would do: a new run into {new}" in console
    assert "resolved config:\n[model]" in console and not new.exists()

    before = files(out)
    console = run_train(
        env,
        tmp_path / "dry2.log",
        ["--job.output_dir", str(out), "--dry-run", "--training.steps", "9", "--optimizer.lr", "1e-3"],
        nproc=1,
    )
    assert "would do: resume from step-00000006 and train steps 7-9" in console
    assert "would change optimizer.lr: 0.002 -> 0.001" in console
    assert files(out) == before

    # The model shape is checked against the data: a row longer than the flavor's positions is refused.
    console = run_train(
        env,
        tmp_path / "dry3.log",
        ["--job.output_dir", str(new), "--dry-run", "--training.seq_len", "4096"],
        nproc=1,
        code=USER_ERROR_EXIT_CODE,
    )
    assert console.strip().splitlines()[-1].startswith("error: training.seq_len: 4096 exceeds the model's max_seq_len")
    assert not new.exists()
