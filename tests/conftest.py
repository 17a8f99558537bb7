"""Fixtures shared by the test suite: packed document starts, a float64 attention reference written from scratch,
and a way to make RMSNorm weights informative; and the tiers: tests/quick (seconds each), tests/process (real
train.py, torchrun and SLURM processes, marked `process`), tests/gpu (`-m gpu`)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from recipes.qwen3.attention import build_backend


def _allowed(document_starts: torch.Tensor, mask: str) -> torch.Tensor:
    """(batch, seq, seq) bool, True where query i may attend key j; the document rule spelled out as a loop."""
    batch, seq = document_starts.shape
    allowed = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for row in range(batch):
        start = 0
        for i, begins in enumerate(document_starts[row].tolist()):
            if begins:
                start = i  # a document begins here: nothing before it is visible
            allowed[row, i, (start if mask == "document" else 0) : i + 1] = True
    return allowed


class ReferenceAttention:
    """Naive float64 attention behind the same contract as recipes.qwen3.attention's backends."""

    def __init__(self, mask: str):
        self.mask = mask

    def attention_meta(self, document_starts: torch.Tensor, device=None) -> torch.Tensor:
        return _allowed(document_starts.cpu(), self.mask).to(device or document_starts.device)

    def __call__(self, q, k, v, allowed, scale):
        """q (batch, seq, q_heads, head_dim), k/v (batch, seq, kv_heads, head_dim) -> like q, in float64."""
        q, k, v = (t.double() for t in (q, k, v))
        group = q.shape[2] // k.shape[2]  # query head h reads kv head h // group
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.fixture
def reference_attention():
    """ReferenceAttention(mask): attention_meta(document_starts, device) -> dense mask;
    __call__(q, k, v, meta, scale)."""
    return ReferenceAttention


@pytest.fixture
def backend_and_reference():
    """run(backend_name, mask, document_starts, q, k, v, grad_out, scale, kernel="auto") -> (out, expected, grads):
    the backend's output and the float64 reference's for the same inputs, both after backward(grad_out); grads
    lists (name, backend grad, reference grad) for q, k and v."""

    def run(backend_name, mask, document_starts, q, k, v, grad_out, scale, kernel="auto"):
        backend = build_backend(backend_name, mask, kernel)
        out = backend(q, k, v, backend.attention_meta(document_starts, q.device), scale)
        out.backward(grad_out)
        reference = ReferenceAttention(mask)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = reference(q64, k64, v64, reference.attention_meta(document_starts, q.device), scale)
        expected.backward(grad_out.double())
        return (
            out,
            expected,
            [(name, got.grad, want.grad) for name, got, want in (("q", q, q64), ("k", k, k64), ("v", v, v64))],
        )

    return run


@pytest.fixture
def packed_starts():
    """make(seq) -> (3, seq) bool document starts: row 0 holds documents of odd lengths (one of length 1) after a
    document cut at the row's start, row 1 begins with a document of one token, row 2 is one cut document."""

    def make(seq: int) -> torch.Tensor:
        assert seq >= 32
        starts = torch.zeros(3, seq, dtype=torch.bool)
        starts[0, [5, 12, 13, 28]] = True
        starts[1, [0, 1, 21]] = True
        return starts

    return make


@pytest.fixture(scope="session")
def randomize_norms():
    """randomize_norms(model): RMSNorm weights start at one, where a norm applied in the wrong place goes unseen."""

    @torch.no_grad()
    def randomize(model: torch.nn.Module, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))

    return randomize


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """The environment for train.py processes, with the default tokenizer and tokenized corpus built once per
    test session (tests/process/train_process.py says what else it sets)."""
    from train_process import train_env as make_env

    base = tmp_path_factory.mktemp("train-env")
    return make_env(base / "recipes-cache", base / "wandb-home")


TESTS = Path(__file__).resolve().parent
SLURM_HINT = "slurm-wlm is not installed: `bash .ci/slurm-setup.sh` installs it (scripts/install.sh --test does too)"


def pytest_collection_modifyitems(config, items):
    """Marks the process tier by folder. SLURM tests need slurm-wlm: where it is missing they are deselected,
    with a note, unless the run asked for them (-m slurm, or their folder), in which case they fail saying so."""
    for item in items:
        if TESTS / "process" in Path(item.fspath).parents:
            item.add_marker(pytest.mark.process)
    if shutil.which("slurmctld") is not None:
        return
    asked = "slurm" in (config.option.markexpr or "").replace("not slurm", "") or any(
        "slurm" in Path(arg).parts for arg in config.args
    )
    slurm = [item for item in items if item.get_closest_marker("slurm")]
    if slurm and not asked:
        config.hook.pytest_deselected(items=slurm)
        items[:] = [item for item in items if not item.get_closest_marker("slurm")]
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{len(slurm)} SLURM tests deselected: {SLURM_HINT}")


_tier_seconds: Counter = Counter()


def pytest_runtest_logreport(report):
    """Adds each test's setup, call and teardown time to its tier (the folder under tests/)."""
    parts = report.nodeid.split("/")
    _tier_seconds[parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"] += report.duration


def pytest_terminal_summary(terminalreporter):
    if _tier_seconds:
        terminalreporter.write_line(
            "time per tier: " + ", ".join(f"{tier} {seconds:.0f} s" for tier, seconds in sorted(_tier_seconds.items()))
        )
