"""The output folder's hold (recipes/run/hold.py), with real processes and real files: holders are `python -c`
processes that take the hold and wait (killed with SIGKILL to leave a dead one behind), a holder on another host
is a hold file written by hand with an old mtime set by os.utime, a reused pid is a live unrelated process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from recipes.errors import UserError
from recipes.run.hold import HOLD_FILE, STALE_AFTER_S, RunHold

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# Takes the hold on argv[1] once the file argv[2] exists (if given), says "held <pid>" or "refused <message>", and
# holds until its stdin closes.
TAKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from recipes.errors import UserError
    from recipes.run.hold import RunHold
    go = sys.argv[2]
    print("ready", flush=True)
    while go and not os.path.exists(go):
        time.sleep(0.0005)
    try:
        hold = RunHold.take(Path(sys.argv[1]), heartbeat_s=float(sys.argv[3]))
    except UserError as error:
        print("refused", error, flush=True)
        sys.exit(2)
    print("held", os.getpid(), flush=True)
    sys.stdin.read()
    hold.release()
""")


def start_taker(folder: Path, go: Path | None = None, heartbeat_s: float = 30.0) -> subprocess.Popen:
    taker = subprocess.Popen(
        [sys.executable, "-c", TAKER, str(folder), str(go or ""), str(heartbeat_s)],
        cwd=REPO,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert taker.stdout.readline() == "ready\n", taker.communicate()
    return taker


def outcome(taker: subprocess.Popen) -> str:
    line = taker.stdout.readline()
    assert line, taker.communicate()
    return line.rstrip("\n")


def start_holder(folder: Path, heartbeat_s: float = 30.0) -> subprocess.Popen:
    holder = start_taker(folder, heartbeat_s=heartbeat_s)
    assert outcome(holder) == f"held {holder.pid}"
    return holder


def stop(process: subprocess.Popen) -> None:
    process.stdin.close()
    process.wait(timeout=30)


def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def hold_record(folder: Path) -> dict:
    return json.loads((folder / HOLD_FILE).read_text())


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "recipes.run.hold" and r.levelno >= logging.WARNING]


def other_host_hold(folder: Path, age_s: float) -> dict:
    """A hold by a run on another host whose last heartbeat was age_s ago."""
    record = {
        "host": "node-elsewhere-17",
        "pid": 4242,
        "started": "2025-01-02T03:04:05+00:00",
        "token": uuid.uuid4().hex,
        "slurm_job": "9911",
    }
    path = folder / HOLD_FILE
    path.write_text(json.dumps(record))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return record


def mtimes(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in [folder, *sorted(folder.rglob("*"))]}


def test_a_second_run_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
    holder = start_holder(tmp_path)
    try:
        before = mtimes(tmp_path), (tmp_path / HOLD_FILE).read_bytes()
        with pytest.raises(UserError) as refused:
            RunHold.take(tmp_path)
        message = str(refused.value)
        assert "\n" not in message
        assert f"host {socket.gethostname()}, pid {holder.pid}, since 20" in message
        assert "wait for it to end, stop it, or choose another job.output_dir" in message
        assert (mtimes(tmp_path), (tmp_path / HOLD_FILE).read_bytes()) == before  # nothing left, nothing touched
        assert outcome(start_taker(tmp_path)).startswith(f"refused job.output_dir: {tmp_path} is held by a live run")
    finally:
        stop(holder)
    assert not (tmp_path / HOLD_FILE).exists()  # the holder released it


def test_the_hold_of_a_killed_run_is_taken_over_with_one_warning(tmp_path, caplog):
    holder = start_holder(tmp_path)
    kill_9(holder)
    assert hold_record(tmp_path)["pid"] == holder.pid  # left behind
    with RunHold.take(tmp_path) as hold:
        assert hold_record(tmp_path)["pid"] == os.getpid()
        assert hold_record(tmp_path)["token"] == hold.token
    (warning,) = warnings_of(caplog)
    assert f"host {socket.gethostname()}, pid {holder.pid}" in warning
    assert f"pid {holder.pid} is no longer running" in warning


@pytest.mark.parametrize("stale", ["killed here", "lost on another host"])
def test_of_newcomers_racing_for_one_stale_hold_exactly_one_wins(tmp_path, stale):
    for round_ in range(4):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        if stale == "killed here":
            kill_9(start_holder(folder))
        else:
            other_host_hold(folder, age_s=STALE_AFTER_S + 60)
        go = tmp_path / f"go{round_}"
        takers = [start_taker(folder, go) for _ in range(4)]
        go.touch()
        results = [outcome(taker) for taker in takers]
        winners = [taker for taker, result in zip(takers, results) if result.startswith("held")]
        assert len(winners) == 1, results
        (winner,) = winners
        assert hold_record(folder)["pid"] == winner.pid
        for taker, result in zip(takers, results):
            if taker is not winner:
                assert result.startswith("refused") and f"pid {winner.pid}" in result, results
        for taker in takers:
            stop(taker)
        assert list(folder.iterdir()) == []  # no claim or set-aside file left behind


def test_a_claim_left_by_a_newcomer_killed_mid_takeover_is_superseded(tmp_path, caplog):
    stale = other_host_hold(tmp_path, age_s=STALE_AFTER_S + 60)
    claim = tmp_path / f"{HOLD_FILE}.takeover-{hashlib.sha256(stale['token'].encode()).hexdigest()[:16]}-1"
    claim.write_text(json.dumps({**stale, "host": "node-claimant", "pid": 777, "token": uuid.uuid4().hex}))
    with pytest.raises(UserError, match="is being taken over by another run \\(host node-claimant, pid 777"):
        RunHold.take(tmp_path)  # a takeover in progress
    assert hold_record(tmp_path) == stale
    os.utime(claim, (time.time() - 120, time.time() - 120))  # its claimant died: older than CLAIM_STALE_S
    with RunHold.take(tmp_path):
        assert hold_record(tmp_path)["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [HOLD_FILE]  # the dead claim is cleared
    (warning,) = warnings_of(caplog)
    assert "node-elsewhere-17" in warning


def test_release_removes_the_hold_also_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with RunHold.take(tmp_path):
            assert (tmp_path / HOLD_FILE).is_file()
            raise RuntimeError("the run failed")
    assert not (tmp_path / HOLD_FILE).exists()
    hold = RunHold.take(tmp_path)
    hold.release()
    assert not (tmp_path / HOLD_FILE).exists()
    hold.release()  # twice is harmless


def test_release_leaves_a_hold_that_is_no_longer_ours(tmp_path, caplog):
    hold = RunHold.take(tmp_path)
    record = other_host_hold(tmp_path, age_s=0)  # someone replaced it (took it over, or by hand)
    hold.release()
    assert hold_record(tmp_path) == record
    assert any("not ours any more" in w for w in warnings_of(caplog))


def test_a_hold_from_another_host_is_refused_while_it_beats_and_taken_over_after(tmp_path, caplog):
    record = other_host_hold(tmp_path, age_s=5)
    with pytest.raises(UserError) as refused:
        RunHold.take(tmp_path)
    assert "host node-elsewhere-17, pid 4242, SLURM job 9911, since 2025-01-02T03:04:05+00:00" in str(refused.value)
    assert f"stale {STALE_AFTER_S:.0f} s after its last heartbeat" in str(refused.value)

    other_host_hold(tmp_path, age_s=STALE_AFTER_S - 60)  # old, but within the limit: still held
    with pytest.raises(UserError):
        RunHold.take(tmp_path)
    assert warnings_of(caplog) == []

    other_host_hold(tmp_path, age_s=STALE_AFTER_S + 60)
    with RunHold.take(tmp_path):
        assert hold_record(tmp_path)["host"] == socket.gethostname()
        assert hold_record(tmp_path)["token"] != record["token"]
    (warning,) = warnings_of(caplog)
    assert "host node-elsewhere-17, pid 4242" in warning and "heartbeat" in warning


def test_a_short_stale_limit_applies_to_other_hosts(tmp_path):
    other_host_hold(tmp_path, age_s=3)
    with pytest.raises(UserError):
        RunHold.take(tmp_path, stale_after_s=10)
    RunHold.take(tmp_path, stale_after_s=1).release()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
    with RunHold.take(tmp_path):
        template = hold_record(tmp_path)  # a genuine record of this machine
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        stat = Path(f"/proc/{unrelated.pid}/stat").read_text()
        started = int(stat[stat.rindex(")") + 2 :].split()[19])  # proc(5) field 22
        (tmp_path / HOLD_FILE).write_text(json.dumps({**template, "pid": unrelated.pid, "proc_start": started}))
        with pytest.raises(UserError) as refused:  # that process, at that start time: it holds
            RunHold.take(tmp_path)
        assert f"pid {unrelated.pid}" in str(refused.value)

        (tmp_path / HOLD_FILE).write_text(json.dumps({**template, "pid": unrelated.pid, "proc_start": started - 1}))
        with RunHold.take(tmp_path):  # the same pid, started at another time: another process
            assert hold_record(tmp_path)["pid"] == os.getpid()
        (warning,) = warnings_of(caplog)
        assert f"pid {unrelated.pid} is now another process" in warning
        assert unrelated.poll() is None  # the unrelated process was left alone
    finally:
        unrelated.kill()
        unrelated.wait()


def test_the_heartbeat_refreshes_the_mtime(tmp_path):
    holder = start_holder(tmp_path, heartbeat_s=0.2)
    try:
        path = tmp_path / HOLD_FILE
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 10
        while time.time() - path.stat().st_mtime > 100 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - path.stat().st_mtime < 100
    finally:
        stop(holder)


def test_a_missing_folder_is_created_and_a_run_that_wrote_nothing_removes_it(tmp_path):
    before = tmp_path.stat().st_mtime_ns
    folder = tmp_path / "a" / "b" / "run"
    with RunHold.take(folder) as hold:
        assert [p.name for p in folder.iterdir()] == [HOLD_FILE]
        assert hold.files == (HOLD_FILE,)
    assert not (tmp_path / "a").exists()
    assert tmp_path.stat().st_mtime_ns == before

    with RunHold.take(folder):
        (folder / "config.toml").write_text("")  # the run wrote
    assert [p.name for p in folder.iterdir()] == ["config.toml"]


def test_an_existing_folder_keeps_its_bytes_and_mtimes_when_the_run_wrote_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    os.utime(tmp_path, ns=(1_000_000_000, 1_000_000_000))
    before = mtimes(tmp_path)
    RunHold.take(tmp_path).release()
    assert mtimes(tmp_path) == before
    with RunHold.take(tmp_path):
        (tmp_path / "metrics.jsonl").write_text("")
    assert tmp_path.stat().st_mtime_ns != 1_000_000_000  # the run's own change is kept
    os.utime(tmp_path, ns=(1_000_000_000, 1_000_000_000))
    with RunHold.take(tmp_path):
        (tmp_path / "notes.new").write_text("rewritten")
        os.replace(tmp_path / "notes.new", tmp_path / "notes.txt")  # rewritten atomically: the same names as before
    assert tmp_path.stat().st_mtime_ns != 1_000_000_000  # kept too


def test_a_path_through_a_file_is_refused_like_check_output_dir(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(UserError, match=r"job\.output_dir: \S+/run is a file, not a folder; choose another"):
        RunHold.take(tmp_path / "run" / "sub")


def test_check_output_dir_accepts_a_folder_a_killed_run_created(tmp_path):
    from recipes.config import load_config
    from recipes.run.outputs import check_output_dir

    config = load_config(str(REPO / "configs" / "qwen3_debug.toml"))
    folder = tmp_path / "new" / "run"
    kill_9(start_holder(folder))  # created the folder, then died holding it
    assert [p.name for p in folder.iterdir()] == [HOLD_FILE]
    with RunHold.take(folder) as hold:  # the same command again
        assert check_output_dir(folder, config, ignore=hold.files) is None
    with pytest.raises(UserError, match="is not empty"):  # without ignoring the hold it would refuse
        with RunHold.take(folder) as hold:
            check_output_dir(folder, config, ignore=())


FOR_RUN = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    import torch.distributed as dist
    from recipes.errors import UserError
    from recipes.run.hold import RunHold
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(f"{sys.argv[1]}.rank{rank}", "w") as report:  # one file per rank: their stdout lines interleave
        for folder in sys.argv[2:]:
            try:
                with RunHold.for_run(Path(folder), rank == 0) as hold:
                    print(f"rank{rank} held={hold.held} files={','.join(hold.files)}", file=report)
                    dist.barrier()
            except UserError as error:
                print(f"rank{rank} refused {error}", file=report)
    dist.destroy_process_group()
    os._exit(0)  # as train.run leaves: gloo's threads may outlive the group and abort the interpreter's finalization
""")


def test_for_run_takes_one_hold_on_rank_0_and_refuses_on_every_rank(tmp_path):
    held, free = tmp_path / "held", tmp_path / "free"
    holder = start_holder(held)
    try:
        script = tmp_path / "for_run.py"
        script.write_text(FOR_RUN)
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("torchrun")),
                "--standalone",
                "--nproc_per_node=2",
                str(script),
                str(tmp_path / "report"),
                str(held),
                str(free),
            ],
            cwd=REPO,
            env={**ENV, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stop(holder)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for rank in (0, 1) for line in (tmp_path / f"report.rank{rank}").read_text().splitlines()]
    refusals = [line.split(" refused ", 1)[1] for line in lines if " refused " in line]
    assert len(refusals) == 2 and refusals[0] == refusals[1] and f"pid {holder.pid}" in refusals[0], lines
    assert f"rank0 held=True files={HOLD_FILE}" in lines and f"rank1 held=False files={HOLD_FILE}" in lines, lines
    assert not free.exists()  # it wrote nothing, so the hold removed the folder it had made
