"""[parallel] replicate: HSDP on 4 gloo processes (2 replicas x 2 shards) trains the same losses as plain FSDP over
the 4, and checkpoints load across the two layouts (FSDP -> HSDP and HSDP -> FSDP, through checkpoint.load_step)."""

from __future__ import annotations

import shutil

import pytest
from train_process import debug_run, finish, launch

from recipes.errors import USER_ERROR_EXIT_CODE
from recipes.run.runs import read_metrics

STEPS = 4
RUN = debug_run(steps=STEPS, seq_len=32, local_batch_size=1, warmup_steps=2, checkpoint_interval=2, checkpoint_keep=5)
LAYOUTS = {"fsdp": ["--parallel.replicate", "1"], "hsdp": ["--parallel.replicate", "2"]}


def losses(run) -> list[float]:
    return [row["loss"] for row in read_metrics(run)]


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    started = {
        name: launch(env, root / f"{name}.log", [*RUN, *args, "--job.output_dir", str(root / name)], nproc=4)
        for name, args in LAYOUTS.items()
    }
    consoles = {name: finish(process, root / f"{name}.log") for name, process in started.items()}
    assert "HSDP: 2 replicas x 2 ranks sharding each" in consoles["hsdp"]
    assert "HSDP" not in consoles["fsdp"]
    return {name: root / name for name in LAYOUTS}


def test_hsdp_trains_the_losses_of_plain_fsdp(runs):
    assert len(losses(runs["fsdp"])) == STEPS
    assert losses(runs["hsdp"]) == pytest.approx(losses(runs["fsdp"]), rel=1e-5)


def test_checkpoints_load_across_layouts(runs, env, tmp_path):
    """Each run's step-2 checkpoint continued in the other layout gives the same steps 3-4."""
    started = {}
    for source, target in (("fsdp", "hsdp"), ("hsdp", "fsdp")):
        out = tmp_path / f"{source}-to-{target}"
        shutil.copytree(runs[source], out)
        started[out] = launch(
            env,
            tmp_path / f"{out.name}.log",
            [*RUN, *LAYOUTS[target], "--job.output_dir", str(out), "--checkpoint.load_step", "2"],
            nproc=4,
        )
    for out, process in started.items():
        console = finish(process, tmp_path / f"{out.name}.log")
        assert f"resumed from {out}/checkpoints/step-00000002 (step 2)" in console
        assert losses(out) == pytest.approx(losses(runs["fsdp"]), rel=1e-5)


def test_replicas_that_do_not_divide_the_world_size_are_refused(env, tmp_path):
    out = tmp_path / "run"
    console = finish(
        launch(env, tmp_path / "bad.log", [*RUN, "--parallel.replicate", "2", "--job.output_dir", str(out)]),
        tmp_path / "bad.log",
        USER_ERROR_EXIT_CODE,
    )
    assert console.strip().splitlines()[-1] == (
        "error: parallel.replicate: 2 replicas do not divide world size 1; "
        "choose a divisor of it, or 0 for one replica per node"
    )
    assert not out.exists()
