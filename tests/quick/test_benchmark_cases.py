"""benchmarks/benchmark.py's case names: each option sets what its run gets, and an unknown one is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
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
