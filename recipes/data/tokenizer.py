"""Tokenizers: the default byte-level BPE trained on the stdlib corpus (cached), a tokenizer.json or folder, or a
HF hub id; each with the EOS that separates packed documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers

from recipes.config import DataConfig
from recipes.data.cache import CACHE_VERSION, HASH_DIGITS, corpus_hash, intact, write_cached
from recipes.data.sources import stdlib_documents
from recipes.errors import UserError

DEFAULT_EOS = "<|endoftext|>"
_SHOWN_HASH_DIGITS = 8  # enough to tell corpora apart in a log line


class Tokenizer:
    """A HF `tokenizers` tokenizer with the EOS that separates packed documents.

    encode_batch() adds no special tokens (no BOS): the packer puts exactly one EOS after every document. Not
    torchtitan's HuggingFaceTokenizer: it has no batch encode, adds BOS/EOS by its own inference, and torchtitan
    0.2.2 does not import on torch >= 2.13 without triton.
    """

    def __init__(self, engine: tokenizers.Tokenizer, eos_token: str, name: str):
        eos_id = engine.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(
                f"data.eos_token: {eos_token!r} is not a token of {name}; "
                "set data.eos_token to a token in its vocabulary"
            )
        self.engine, self.eos_token, self.eos_id, self.name = engine, eos_token, eos_id, name
        self.vocab_size = engine.get_vocab_size(with_added_tokens=True)
        self.hash = hashlib.sha256(f"{engine.to_str()}\0{eos_id}".encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.engine.encode_batch_fast(texts, add_special_tokens=False)]

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab {self.vocab_size}, eos {self.eos_token!r}={self.eos_id})"


def train_default_tokenizer(documents: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE with DEFAULT_EOS as its one special token; the same documents give the same merges."""
    engine = tokenizers.Tokenizer(tokenizers.models.BPE())
    engine.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    engine.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOS],
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    engine.train_from_iterator(documents, trainer)
    return engine


def default_tokenizer_file(vocab_size: int, cache_dir: Path) -> tuple[Path, str]:
    """Where the default tokenizer of `vocab_size` is cached, keyed by the stdlib corpus; and that key."""
    key = corpus_hash(stdlib_documents())
    return Path(cache_dir) / f"tokenizer-bpe{vocab_size}-stdlib-{key[:HASH_DIGITS]}-{CACHE_VERSION}.json", key


def _default_tokenizer(data: DataConfig, cache_dir: Path) -> Tokenizer:
    minimum = len(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + 1
    if data.vocab_size < minimum:
        raise UserError(f"data.vocab_size: {data.vocab_size} is below the byte-level minimum {minimum}; raise it")
    path, key = default_tokenizer_file(data.vocab_size, cache_dir)
    if not intact(path):
        engine = train_default_tokenizer(stdlib_documents(), data.vocab_size)
        write_cached(path, lambda handle: handle.write(engine.to_str().encode()))
    engine = tokenizers.Tokenizer.from_file(str(path))
    name = f"default BPE {data.vocab_size} (stdlib {key[:_SHOWN_HASH_DIGITS]})"
    return Tokenizer(engine, data.eos_token or DEFAULT_EOS, name)


def _config_eos(folder: Path) -> str:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return ""
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise UserError(f"data.tokenizer: {config} is not JSON ({error}); fix it, or set data.eos_token") from None
    eos = (settings.get("eos_token") if isinstance(settings, dict) else None) or ""
    eos = eos.get("content", "") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        raise UserError(
            f"data.tokenizer: {config}: eos_token must be a string, got {type(eos).__name__}; fix it, "
            "or set data.eos_token"
        )
    return eos


def _file_tokenizer(data: DataConfig, tokenizer_json: Path, name: str) -> Tokenizer:
    try:
        engine = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as error:  # the Rust side raises a bare Exception for a malformed file
        raise UserError(
            f"data.tokenizer: {tokenizer_json} is not a tokenizers JSON file ({error}); point it at a HF tokenizer.json"
        ) from None
    eos = data.eos_token or _config_eos(tokenizer_json.parent)
    if not eos:
        if engine.token_to_id(DEFAULT_EOS) is None:
            raise UserError(
                f"data.eos_token: {name} names no end-of-text token and has no {DEFAULT_EOS!r}; "
                "set data.eos_token to the token that separates documents"
            )
        eos = DEFAULT_EOS
    return Tokenizer(engine, eos, name)


def _looks_like_path(text: str) -> bool:
    """Hub ids are NAME or ORG/NAME; anything else that does not exist is a mistyped path, not worth a hub try."""
    return text.startswith((".", "/", "~")) or text.endswith(".json") or text.count("/") > 1


def _hub_tokenizer_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["tokenizer.json", "tokenizer_config.json"]))
    except RepositoryNotFoundError:
        raise UserError(
            f"data.tokenizer: no hub repository {repo_id!r}; check the id, or give a tokenizer.json file or folder"
        ) from None
    except Exception as error:  # offline, the hub client raises several unrelated types (OSError, httpx, offline mode)
        raise UserError(
            f"data.tokenizer: cannot load {repo_id!r} (not a file/folder, and the hub is unreachable: "
            f'{type(error).__name__}); give a local tokenizer.json or folder, or "default"'
        ) from None


def build_tokenizer(data: DataConfig, cache_dir: Path) -> Tokenizer:
    """data.tokenizer: "default" (byte-level BPE of data.vocab_size trained on the stdlib corpus, cached under
    cache_dir), a tokenizer.json or a folder holding one, or a HF hub id such as "Qwen/Qwen3-0.6B"."""
    spec = data.tokenizer
    if spec == "default":
        return _default_tokenizer(data, cache_dir)
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_tokenizer(data, path, str(path))
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"data.tokenizer: folder {path} has no tokenizer.json; point it at one that does")
        return _file_tokenizer(data, path / "tokenizer.json", str(path))
    if _looks_like_path(spec):
        raise UserError(
            f'data.tokenizer: {spec!r} does not exist; give a tokenizer.json, a folder, a hub id or "default"'
        )
    folder = _hub_tokenizer_folder(spec)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"data.tokenizer: hub repository {spec!r} has no tokenizer.json; use one that has")
    return _file_tokenizer(data, folder / "tokenizer.json", spec)
