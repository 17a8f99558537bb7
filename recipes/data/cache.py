"""The cache of what is built once per machine: the default tokenizer and tokenized corpora, keyed by content
hashes, each file written atomically with its size and sha256 beside it and checked before it is read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recipes.errors import UserError
from recipes.files import write_atomic

if TYPE_CHECKING:
    from recipes.data.tokenizer import Tokenizer

CACHE_VERSION = "v2"  # bump when the cached tokenizer or token-file format changes (v2: checksum records)
HASH_DIGITS = 16  # hex digits of a sha256 kept in cache names and stream identities: 64 bits, no collisions in practice
ENCODE_CHUNK = 256  # documents per encode_batch call: large enough for the Rust thread pool, small in memory
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where tokenizers and tokenized corpora are cached: $RECIPES_CACHE, else ~/.cache/qwen3-recipes."""
    return Path(os.environ.get("RECIPES_CACHE", Path.home() / ".cache" / "qwen3-recipes"))


def corpus_hash(documents: Iterable[str], kind: str = "") -> str:
    """sha256 over the documents and their boundaries: the cache key of everything built from a corpus."""
    digest = hashlib.sha256()
    count = 0
    for text in documents:
        raw = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
        count += 1
    if count == 0:
        raise UserError(
            f"data.dataset: the corpus has no non-empty {kind}documents; point it at files with (more) text"
        )
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _record_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_cached(path: Path, write) -> None:
    """A cache file and, beside it, the size and sha256 it had when built (the record is written last)."""
    write_atomic(path, write)
    record = json.dumps({"size": path.stat().st_size, "sha256": sha256_file(path)})
    write_atomic(_record_of(path), lambda handle: handle.write(record.encode()))


def intact(path: Path) -> bool:
    """Whether a cache file exists with the size and sha256 recorded when it was built. A damaged or truncated
    one (or one without its record) is named in a warning, and the caller rebuilds it."""
    if not path.exists():
        return False
    try:
        record = json.loads(_record_of(path).read_text())
        if path.stat().st_size == record["size"] and sha256_file(path) == record["sha256"]:
            return True
        why = "its size or checksum differs from when it was built"
    except (OSError, ValueError, KeyError, TypeError):
        why = f"its record {_record_of(path).name} is missing or unreadable"
    log.warning("cache: %s is damaged (%s); rebuilding it", path, why)
    return False


def _tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """All documents, each followed by EOS, as one uint32 array, and the int64 offsets of document starts (n+1)."""
    pieces, lengths = [], [0]
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)
    documents = iter(documents)
    while chunk := list(itertools.islice(documents, ENCODE_CHUNK)):
        for ids in tokenizer.encode_batch(chunk):
            pieces += [np.asarray(ids, dtype=np.uint32), eos]
            lengths.append(len(ids) + 1)
    return np.concatenate(pieces), np.cumsum(lengths, dtype=np.int64)


def corpus_tokens(
    documents: Callable[[], Iterator[str]], tokenizer: Tokenizer, cache_dir: Path, kind: str = ""
) -> tuple[np.ndarray, np.ndarray, str]:
    """Tokenize once per machine: the arrays are cached as .npy files keyed by corpus and tokenizer hash."""
    corpus_key = corpus_hash(documents(), kind)[:HASH_DIGITS]
    key = f"{corpus_key}-{tokenizer.hash[:HASH_DIGITS]}-{CACHE_VERSION}"
    tokens_path = Path(cache_dir) / f"corpus-{key}.tokens.npy"
    offsets_path = Path(cache_dir) / f"corpus-{key}.offsets.npy"
    if not (intact(tokens_path) and intact(offsets_path)):
        tokens, offsets = _tokenize_documents(documents(), tokenizer)
        if int(tokens.max()) >= tokenizer.vocab_size:
            raise UserError(
                f"data.tokenizer: {tokenizer.name} produced token id {int(tokens.max())}, outside its "
                f"vocabulary of {tokenizer.vocab_size}; the tokenizer file is inconsistent, replace it"
            )
        # Ranks that miss together write identical files, so whichever rename lands last is as good.
        write_cached(tokens_path, lambda handle: np.save(handle, tokens))
        write_cached(offsets_path, lambda handle: np.save(handle, offsets))
    return np.load(tokens_path, mmap_mode="r"), np.load(offsets_path), corpus_key
