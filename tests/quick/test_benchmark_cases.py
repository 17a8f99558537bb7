"""benchmarks/benchmark.py's cases: each option sets what its run gets, an unknown one is refused, and a stopped
benchmark stops its run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import benchmark  # noqa: E402


def test_options_set_the_run():
    spec = benchmark.parse_case("varlen-document-8192-compile-fa4-b3-autotune-cdt", "0.6B")
    assert (spec["kernel"], spec["local_batch_size"], spec["seq_len"]) == ("fa4", 3, 8192)
    assert spec["inductor_env"] == {
        "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM": "1",
        "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1",
    }
    assert benchmark.parse_case("sdpa-causal-8192-compile", "0.6B")["inductor_env"] == {}


def test_an_unknown_option_is_refused_with_the_case_named():
    with pytest.raises(SystemExit, match="unknown option 'turbo' in case 'sdpa-causal-8192-compile-turbo'"):
        benchmark.parse_case("sdpa-causal-8192-compile-turbo", "0.6B")


def test_a_case_runs_with_the_tuning_it_names_and_no_other(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM", "1")  # set in the shell: must not reach a default case
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE", "1")
    default = benchmark.case_env(benchmark.parse_case("sdpa-causal-8192-compile", "0.6B"), PYTHONPATH="/x")
    assert not {"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM", "TORCHINDUCTOR_MAX_AUTOTUNE"} & set(default)
    assert default["PYTHONPATH"] == "/x" and default["PATH"] == os.environ["PATH"]
    tuned = benchmark.case_env(benchmark.parse_case("sdpa-causal-8192-compile-cdt", "0.6B"))
    assert tuned["TORCHINDUCTOR_COORDINATE_DESCENT_TUNING"] == "1" and "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM" not in tuned


def test_sigterm_to_the_benchmark_stops_the_run_it_waits_for(tmp_path):
    """`timeout` stops benchmark.py with SIGTERM; the case's run, in its own process group, must stop with it
    instead of holding the GPU while the next measurement starts."""
    pid_file = tmp_path / "run.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    waiter = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import benchmark; benchmark.stop_runs_on_sigterm(); "
        f"benchmark.run_case([sys.executable, '-c', {sleeper!r}], open({str(tmp_path / 'run.log')!r}, 'w'), 120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", waiter])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the run never started"
        time.sleep(0.05)
    run_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    with pytest.raises(ProcessLookupError):  # reaped by run_case, so not even a zombie is left
        os.kill(run_pid, 0)
