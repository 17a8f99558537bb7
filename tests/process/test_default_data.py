"""train.py's default data on the whole stdlib corpus (the tokenizer trained on all of it, the corpus tokenized once
and cached), and the hub clients offline; tests/quick/test_data.py covers the same code on small corpora."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from recipes.config import DataConfig
from recipes.data import build_dataloader, build_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_stdlib_default_corpus_packs_and_is_read_from_the_cache(env):
    """`env` built the default tokenizer and corpus into its cache (as every train.py test reads them): a build
    reads those files and rewrites none of them."""
    cache = Path(env["RECIPES_CACHE"])
    files = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in cache.iterdir()}
    assert any(path.name.startswith("tokenizer-bpe2048-stdlib-") for path in files)
    # the default corpus and any other corpus earlier tests of the session tokenized
    assert any(path.name.startswith("corpus-") and path.name.endswith(".tokens.npy") for path in files)
    tokenizer = build_tokenizer(DataConfig(), cache)
    assert tokenizer.vocab_size == 2048
    stream = build_dataloader(DataConfig(), tokenizer, 128, 2, 0, 1, 0, cache)
    assert stream.num_documents > 300 and stream.num_tokens > 1_000_000
    batch = next(stream)
    assert batch.inputs.dtype == batch.labels.dtype == torch.int64 and batch.inputs.shape == (2, 128)
    assert torch.equal(batch.inputs[:, 1:], batch.labels[:, :-1])  # labels are the inputs shifted by one
    assert batch.document_starts.dtype == torch.bool and batch.document_starts.shape == (2, 128)
    assert 0 <= int(batch.inputs.min()) and int(batch.labels.max()) < tokenizer.vocab_size
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in cache.iterdir()} == files


def test_hub_unreachable_is_a_config_error(tmp_path):
    """Hub names go through the real hub clients; HF_HUB_OFFLINE makes them fail at once instead of after retries."""
    script = (
        "from recipes.config import DataConfig\n"
        "from recipes.errors import UserError\n"
        "from recipes.data import build_dataloader, build_tokenizer\n"
        "for build in (lambda: build_tokenizer(DataConfig(tokenizer='Qwen/Qwen3-0.6B'), '.'),\n"
        "              lambda: build_dataloader(DataConfig(dataset='hf:roneneldan/TinyStories'), None, 8, 1, 0, 1, 0,\n"
        "                                       '.')):\n"
        "    try:\n"
        "        build()\n"
        "    except UserError as error:\n"
        "        print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith(
        "data.tokenizer: cannot load 'Qwen/Qwen3-0.6B' (not a file/folder, and the hub is unreachable"
    )
    assert lines[1].startswith("data.dataset: cannot reach the HF hub for 'roneneldan/TinyStories'; ")
