"""Corpora, tokenizers and the packed, resumable loader.

One global token stream per seed: documents in a seeded order per epoch, each followed by EOS, concatenated and
cut into rows of seq_len+1 (no padding). Step i's global batch is rows [i*G, (i+1)*G) with G = local batch x
world size, and rank r takes the contiguous slice [r*local, (r+1)*local) of it, so every attention backend and
every world size with the same global batch trains on the same tokens. The loader's state is its position in
that stream (a token count, or a document and offset for hub streams), so a resumed run continues bit-identically.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sysconfig
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch

from recipes.config import Config, DataConfig
from recipes.errors import UserError
from recipes.qwen3.model import IGNORE_INDEX

DEFAULT_EOS = "<|endoftext|>"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_CACHE_VERSION = "v2"  # bump when the cached tokenizer or token-file format changes (v2: checksum records)
_ENCODE_CHUNK = 256  # documents per encode_batch call: large enough for the Rust thread pool, small in memory
_HUB_SHUFFLE_BUFFER = 10_000
log = logging.getLogger(__name__)
HASH_DIGITS = 16  # hex digits of a sha256 kept in cache names and stream identities: 64 bits, no collisions in practice
_SHOWN_HASH_DIGITS = 8  # enough to tell corpora apart in a log line
HELDOUT_EVERY = 20  # about 1 document in 20 is held out of training, chosen by a hash of its text


def is_heldout(text: str) -> bool:
    """The train/held-out split: by content, so it is the same for every source, order, seed and world size."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % HELDOUT_EVERY == 0


# ----------------------------------------------------------------------------------------------- documents


def stdlib_documents() -> Iterator[str]:
    """The running interpreter's standard library .py files (tests excluded), in sorted path order.

    Real text on any machine with Python, so the default run needs no download; it differs between Python builds,
    which the caches see through the content hash.
    """
    root = sysconfig.get_paths()["stdlib"]
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in _STDLIB_SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                text = Path(folder, name).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield text


def _missing_field(file: Path, text_field: str, keys) -> UserError:
    return UserError(f"data.text_field: {text_field!r} is not a field of the records in {file} "
                     f"(fields: {', '.join(map(str, keys))}); set data.text_field to the one holding the text")


def _bad_record(where: str, what: str) -> UserError:
    return UserError(f"data.dataset: {where}: {what}; fix or remove that record, or point data.dataset elsewhere")


def _records_text(file: Path, records: Iterable[tuple[str, object]], text_field: str) -> Iterator[str]:
    """The text of each (where, record) pair; `where` names the file and line (or array index) for errors."""
    for where, record in records:
        if not isinstance(record, dict):
            raise _bad_record(where, f"a record must be a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise _missing_field(file, text_field, record)
        text = record[text_field]
        if text is not None and not isinstance(text, str):
            raise _bad_record(where, f"{text_field!r} must be a string, got {type(text).__name__}")
        yield text


def _json_lines(file: Path, handle) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(handle, start=1):
        if line.strip():
            try:
                yield f"{file}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise _bad_record(f"{file}:{number}", f"not a JSON line ({error.msg})") from None


def _file_documents(file: Path, text_field: str) -> Iterator[str]:
    suffix = file.suffix.lower()
    if suffix == ".txt":
        yield file.read_text(encoding="utf-8", errors="replace")  # text files: a stray byte is not worth a stop
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(file)
        if text_field not in schema.names:
            raise _missing_field(file, text_field, schema.names)
        if schema.field(text_field).type not in ("string", "large_string"):
            raise _bad_record(f"{file} column {text_field!r}", f"must hold strings, holds {schema.field(text_field).type}")
        for batch in pq.ParquetFile(file).iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:  # .jsonl, or .json holding either JSON lines or one array of records
        with file.open(encoding="utf-8") as handle:
            try:
                head = handle.read(4096).lstrip()[:1]
                handle.seek(0)
                if head == "[":
                    try:
                        records = json.load(handle)
                    except json.JSONDecodeError as error:
                        raise _bad_record(f"{file}:{error.lineno}", f"not valid JSON ({error.msg})") from None
                    yield from _records_text(file, ((f"{file} record {i}", r) for i, r in enumerate(records)),
                                             text_field)
                else:
                    yield from _records_text(file, _json_lines(file, handle), text_field)
            except UnicodeDecodeError:
                raise _bad_record(*_first_non_utf8(file)) from None


def _first_non_utf8(file: Path) -> tuple[str, str]:
    """(file:line, what) of the first byte that is not UTF-8, read again in binary: the text reader's offsets count
    from its buffer, not from the file."""
    data = file.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return f"{file}:{line}", f"not UTF-8 (byte {error.start})"
    return str(file), "not UTF-8"


def local_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents of a .jsonl/.json/.parquet/.txt file, or of every such file under a folder (sorted); .txt files are
    one document each, the others one document per record's `text_field`."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise UserError(f"data.dataset: folder {path} holds no {'/'.join(FILE_SUFFIXES)} files; "
                            "point it at a folder that does")
    elif path.suffix.lower() in FILE_SUFFIXES:
        files = [path]
    else:
        raise UserError(f"data.dataset: {path} is not a {'/'.join(FILE_SUFFIXES)} file; convert it or use a folder")
    for file in files:
        for text in _file_documents(file, text_field):
            if text is not None and text.strip():
                yield text


def _local_source(data: DataConfig) -> Callable[[], Iterator[str]] | None:
    """A function that reads data.dataset's documents afresh (so no pass holds the corpus in memory) if it names an
    offline source; None for a hub dataset."""
    if data.dataset == "stdlib":
        return stdlib_documents
    if data.dataset.startswith("hf:"):
        return None
    path = Path(data.dataset).expanduser()
    if not path.exists():
        raise UserError(f"data.dataset: {data.dataset!r} does not exist; give \"stdlib\", a "
                        f"{'/'.join(FILE_SUFFIXES)} file or folder, or \"hf:NAME\" for a hub dataset")
    return lambda: local_documents(path, data.text_field)


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
        raise UserError(f"data.dataset: the corpus has no non-empty {kind}documents; point it at files with (more) "
                        "text")
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Write through a private temporary file and rename, so a reader (or another rank) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _record_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_cached(path: Path, write) -> None:
    """A cache file and, beside it, the size and sha256 it had when built (the record is written last)."""
    _write_atomic(path, write)
    record = json.dumps({"size": path.stat().st_size, "sha256": _sha256(path)})
    _write_atomic(_record_of(path), lambda handle: handle.write(record.encode()))


def _intact(path: Path) -> bool:
    """Whether a cache file exists with the size and sha256 recorded when it was built. A damaged or truncated
    one (or one without its record) is named in a warning, and the caller rebuilds it."""
    if not path.exists():
        return False
    try:
        record = json.loads(_record_of(path).read_text())
        if path.stat().st_size == record["size"] and _sha256(path) == record["sha256"]:
            return True
        why = "its size or checksum differs from when it was built"
    except (OSError, ValueError, KeyError, TypeError):
        why = f"its record {_record_of(path).name} is missing or unreadable"
    log.warning("cache: %s is damaged (%s); rebuilding it", path, why)
    return False


# ----------------------------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """A HF `tokenizers` tokenizer with the EOS that separates packed documents.

    encode_batch() adds no special tokens (no BOS): the packer puts exactly one EOS after every document. Not torchtitan's
    HuggingFaceTokenizer: it has no batch encode, adds BOS/EOS by its own inference, and torchtitan 0.2.2 does not
    import on torch >= 2.13 without triton.
    """

    def __init__(self, engine: tokenizers.Tokenizer, eos_token: str, name: str):
        eos_id = engine.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"data.eos_token: {eos_token!r} is not a token of {name}; "
                            "set data.eos_token to a token in its vocabulary")
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
        vocab_size=vocab_size, special_tokens=[DEFAULT_EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    engine.train_from_iterator(documents, trainer)
    return engine


def _default_tokenizer(data: DataConfig, cache_dir: Path) -> Tokenizer:
    minimum = len(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + 1
    if data.vocab_size < minimum:
        raise UserError(f"data.vocab_size: {data.vocab_size} is below the byte-level minimum {minimum}; raise it")
    key = corpus_hash(stdlib_documents())
    path = Path(cache_dir) / f"tokenizer-bpe{data.vocab_size}-stdlib-{key[:HASH_DIGITS]}-{_CACHE_VERSION}.json"
    if not _intact(path):
        engine = train_default_tokenizer(stdlib_documents(), data.vocab_size)
        _write_cached(path, lambda handle: handle.write(engine.to_str().encode()))
    engine = tokenizers.Tokenizer.from_file(str(path))
    return Tokenizer(engine, data.eos_token or DEFAULT_EOS, f"default BPE {data.vocab_size} (stdlib {key[:_SHOWN_HASH_DIGITS]})")


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
        raise UserError(f"data.tokenizer: {config}: eos_token must be a string, got {type(eos).__name__}; fix it, "
                        "or set data.eos_token")
    return eos


def _file_tokenizer(data: DataConfig, tokenizer_json: Path, name: str) -> Tokenizer:
    try:
        engine = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as error:  # the Rust side raises a bare Exception for a malformed file
        raise UserError(f"data.tokenizer: {tokenizer_json} is not a tokenizers JSON file ({error}); "
                        "point it at a HF tokenizer.json") from None
    eos = data.eos_token or _config_eos(tokenizer_json.parent)
    if not eos:
        if engine.token_to_id(DEFAULT_EOS) is None:
            raise UserError(f"data.eos_token: {name} names no end-of-text token and has no {DEFAULT_EOS!r}; "
                            "set data.eos_token to the token that separates documents")
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
        raise UserError(f"data.tokenizer: no hub repository {repo_id!r}; check the id, or give a tokenizer.json "
                        "file or folder") from None
    except Exception as error:  # offline, the hub client raises several unrelated types (OSError, httpx, offline mode)
        raise UserError(f"data.tokenizer: cannot load {repo_id!r} (not a file/folder, and the hub is unreachable: "
                        f"{type(error).__name__}); give a local tokenizer.json or folder, or \"default\"") from None


def default_cache_dir() -> Path:
    """Where tokenizers and tokenized corpora are cached: $RECIPES_CACHE, else ~/.cache/qwen3-recipes."""
    return Path(os.environ.get("RECIPES_CACHE", Path.home() / ".cache" / "qwen3-recipes"))


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
        raise UserError(f"data.tokenizer: {spec!r} does not exist; give a tokenizer.json, a folder, a hub id "
                        "or \"default\"")
    folder = _hub_tokenizer_folder(spec)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"data.tokenizer: hub repository {spec!r} has no tokenizer.json; use one that has")
    return _file_tokenizer(data, folder / "tokenizer.json", spec)


# ----------------------------------------------------------------------------------------------- token streams


def _tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """All documents, each followed by EOS, as one uint32 array, and the int64 offsets of document starts (n+1)."""
    pieces, lengths = [], [0]
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)
    documents = iter(documents)
    while chunk := list(itertools.islice(documents, _ENCODE_CHUNK)):
        for ids in tokenizer.encode_batch(chunk):
            pieces += [np.asarray(ids, dtype=np.uint32), eos]
            lengths.append(len(ids) + 1)
    return np.concatenate(pieces), np.cumsum(lengths, dtype=np.int64)


class CorpusTokens:
    """A tokenized finite corpus as an endless stream: epoch e is every document once, in the order of
    default_rng([seed, e]).permutation. Any position is reachable at once, so the state is one token count."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seed: int):
        self.tokens, self.offsets, self.seed = tokens, offsets, seed
        self.num_documents = len(offsets) - 1
        self.num_tokens = int(offsets[-1])  # EOS separators included
        self.position = 0
        self._layout_epoch, self._order, self._starts = -1, None, None

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch != self._layout_epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)
            lengths = np.diff(self.offsets)[order]
            self._order, self._starts = order, np.concatenate([[0], np.cumsum(lengths)])
            self._layout_epoch = epoch
        return self._order, self._starts

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` tokens, and a bool array marking the tokens that begin a document."""
        out = np.empty(count, dtype=np.uint32)
        begins = np.zeros(count, dtype=bool)
        filled = 0
        while filled < count:
            epoch, within = divmod(self.position + filled, self.num_tokens)
            order, starts = self._layout(epoch)
            k = int(np.searchsorted(starts, within, side="right")) - 1
            document = order[k]
            begin = int(self.offsets[document]) + within - int(starts[k])
            n = min(count - filled, int(self.offsets[document + 1]) - begin)
            out[filled:filled + n] = self.tokens[begin:begin + n]
            begins[filled] = begin == self.offsets[document]
            filled += n
        self.position += count
        return out, begins

    def state_dict(self) -> dict:
        return {"tokens_consumed": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["tokens_consumed"])


class StreamedTokens:
    """A (hub) IterableDataset tokenized on the fly, in the order of its seeded shuffle buffer per epoch.

    Every rank reads and tokenizes the whole stream and keeps its own rows: that is what keeps the stream free of
    the world size (the dataset's own split_dataset_by_node would give each world size other batches). The state is the first document not yet fully consumed (epoch, index in that epoch's order) and how many of its
    tokens were; resuming re-reads that epoch up to the document without tokenizing the skipped ones.
    """

    def __init__(self, dataset, tokenizer: Tokenizer, text_field: str, seed: int, name: str, heldout: bool):
        self.dataset = dataset.shuffle(seed=seed, buffer_size=_HUB_SHUFFLE_BUFFER)
        self.tokenizer, self.text_field, self.name, self.heldout = tokenizer, text_field, name, heldout
        self.num_documents = self.num_tokens = None  # unknown for a stream
        self._seek(epoch=0, document=0, offset=0)

    def _documents(self, epoch: int, skip: int) -> Iterator[tuple[int, int, str]]:
        while True:
            self.dataset.set_epoch(epoch)
            index, yielded = -1, 0
            for index, record in enumerate(self.dataset):
                if index < skip:
                    continue
                if self.text_field not in record:
                    raise _missing_field(Path(self.name), self.text_field, record)
                text = record[self.text_field]
                if text and text.strip() and is_heldout(text) == self.heldout:
                    yielded += 1
                    yield epoch, index, text
            if index < 0:
                raise UserError(f"data.dataset: {self.name} yields no records (split empty?); check data.split")
            if not yielded and not skip:  # else the next epoch would be as empty, forever
                raise UserError(f"data.dataset: {self.name} has no {'held-out' if self.heldout else 'training'} "
                                f"documents with text in {self.text_field!r}; check data.text_field and data.split")
            epoch, skip = epoch + 1, 0

    def _seek(self, epoch: int, document: int, offset: int) -> None:
        self._reader = self._documents(epoch, document)
        self._buffer: deque[tuple[int, int, np.ndarray]] = deque()  # (epoch, index, tokens + EOS)
        self._head_offset = offset  # tokens of the buffer's first document already consumed
        self._buffered = -offset

    def _read_chunk(self) -> None:
        chunk = list(itertools.islice(self._reader, _ENCODE_CHUNK))
        eos = [self.tokenizer.eos_id]
        for (epoch, index, _), ids in zip(chunk, self.tokenizer.encode_batch([text for *_, text in chunk])):
            tokens = np.asarray(ids + eos, dtype=np.uint32)
            self._buffer.append((epoch, index, tokens))
            self._buffered += len(tokens)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` tokens, and a bool array marking the tokens that begin a document."""
        while self._buffered < count:
            self._read_chunk()
        out = np.empty(count, dtype=np.uint32)
        begins = np.zeros(count, dtype=bool)
        filled = 0
        while filled < count:
            tokens = self._buffer[0][2]
            n = min(count - filled, len(tokens) - self._head_offset)
            out[filled:filled + n] = tokens[self._head_offset:self._head_offset + n]
            begins[filled] = self._head_offset == 0
            filled, self._head_offset = filled + n, self._head_offset + n
            if self._head_offset == len(tokens):
                self._buffer.popleft()
                self._head_offset = 0
        self._buffered -= count
        return out, begins

    def state_dict(self) -> dict:
        if not self._buffer:
            self._read_chunk()
        epoch, index, _ = self._buffer[0]
        return {"epoch": epoch, "document": index, "offset": self._head_offset}

    def load_state_dict(self, state: dict) -> None:
        self._seek(int(state["epoch"]), int(state["document"]), int(state["offset"]))


# ----------------------------------------------------------------------------------------------- loader


@dataclass
class Batch:
    """This process's rows of one step: `inputs` and `labels` (rows, seq_len) int64, and `document_starts`
    (rows, seq_len) bool, True at each input token that begins a document. The loader, which packed the documents,
    is the one source of where they begin: nothing looks for EOS ids (a document may contain the EOS id, and
    chat data ends turns with it)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    document_starts: torch.Tensor
    global_labels: int  # labels the loss counts in the whole step, over every rank: the loss is a mean over them

    def split(self, rows: int) -> list[Batch]:
        """Micro-batches of `rows` rows each (the step's global label count stays theirs)."""
        parts = (t.split(rows) for t in (self.inputs, self.labels, self.document_starts))
        return [Batch(*part, self.global_labels) for part in zip(*parts)]


class PackedLoader:
    """Yields this rank's Batch of local_batch_size rows of the world-size-independent global stream.

    An iterator of its own rather than torch's (or torchdata's Stateful) DataLoader: the whole state is a stream
    position, and worker processes would only add state to thread through checkpoints.
    """

    def __init__(self, stream: CorpusTokens | StreamedTokens, identity: dict, seq_len: int,
                 local_batch_size: int, rank: int, world_size: int, mask_boundary_loss: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.stream, self.identity, self.mask_boundary_loss = stream, identity, mask_boundary_loss
        self.row_len, self.local_batch_size, self.rank = seq_len + 1, local_batch_size, rank
        self.global_batch_size = local_batch_size * world_size
        self.num_documents, self.num_tokens = stream.num_documents, stream.num_tokens

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> Batch:
        shape = (self.global_batch_size, self.row_len)
        tokens, begins = (a.reshape(shape) for a in self.stream.take(shape[0] * shape[1]))
        mine = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        rows, starts = torch.from_numpy(tokens[mine].astype(np.int64)), torch.from_numpy(begins[mine])
        labels = rows[:, 1:].clone()
        global_labels = shape[0] * (shape[1] - 1)
        if self.mask_boundary_loss:  # the label at a document's last token (its EOS) is the next one's first token
            labels[starts[:, 1:]] = IGNORE_INDEX
            global_labels -= int(begins[:, 1:].sum())  # every rank reads the whole global batch: no collective
        return Batch(rows[:, :-1], labels, starts[:, :-1], global_labels)

    def state_dict(self) -> dict:
        """JSON-serialisable; the same on every rank, since the position is in the global stream."""
        return {**self.identity, **self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for field, value in self.identity.items():
            if state.get(field) != value:
                raise UserError(f"{field}: the checkpoint's data stream was made with {state.get(field)!r}, this run "
                                f"has {value!r}; resume with the same setting, or use a new job.output_dir")
        self.stream.load_state_dict(state)


def _corpus_tokens(documents: Callable[[], Iterator[str]], tokenizer: Tokenizer, cache_dir: Path,
                   kind: str = "") -> tuple[np.ndarray, np.ndarray, str]:
    """Tokenize once per machine: the arrays are cached as .npy files keyed by corpus and tokenizer hash."""
    corpus_key = corpus_hash(documents(), kind)[:HASH_DIGITS]
    key = f"{corpus_key}-{tokenizer.hash[:HASH_DIGITS]}-{_CACHE_VERSION}"
    tokens_path = Path(cache_dir) / f"corpus-{key}.tokens.npy"
    offsets_path = Path(cache_dir) / f"corpus-{key}.offsets.npy"
    if not (_intact(tokens_path) and _intact(offsets_path)):
        tokens, offsets = _tokenize_documents(documents(), tokenizer)
        if int(tokens.max()) >= tokenizer.vocab_size:
            raise UserError(f"data.tokenizer: {tokenizer.name} produced token id {int(tokens.max())}, outside its "
                            f"vocabulary of {tokenizer.vocab_size}; the tokenizer file is inconsistent, replace it")
        # Ranks that miss together write identical files, so whichever rename lands last is as good.
        _write_cached(tokens_path, lambda handle: np.save(handle, tokens))
        _write_cached(offsets_path, lambda handle: np.save(handle, offsets))
    return np.load(tokens_path, mmap_mode="r"), np.load(offsets_path), corpus_key


def build_dataloader(data: DataConfig, tokenizer: Tokenizer, seq_len: int, local_batch_size: int, rank: int,
                     world_size: int, seed: int, cache_dir: Path, heldout: bool = False) -> PackedLoader:
    """data.dataset: "stdlib", a local file or folder (tokenized once, cached under cache_dir), or "hf:NAME" with
    NAME anything `datasets.load_dataset` streams (a hub id, or a local dataset folder), tokenized on the fly.
    Training reads the documents `is_heldout` rejects; heldout=True reads only the others (for evaluation)."""
    source = _local_source(data)
    if source is not None:
        def documents() -> Iterator[str]:
            return (text for text in source() if is_heldout(text) == heldout)

        # About 1 document in 20 is held out (is_heldout): a tiny corpus can leave either split empty.
        kind = "held-out (validation, [eval]) " if heldout else "training (the ~95% not held out for validation) "
        tokens, offsets, corpus_key = _corpus_tokens(documents, tokenizer, cache_dir, kind)
        stream = CorpusTokens(tokens, offsets, seed)
        dataset = f"{data.dataset} ({corpus_key})"
    else:
        name = data.dataset.removeprefix("hf:")
        stream = StreamedTokens(_hub_dataset(name, data), tokenizer, data.text_field, seed, name, heldout)
        dataset = f"{data.dataset} {data.dataset_config} {data.split} ({_hub_fingerprint(name, data)})"
    # What the stream is made of, keyed by the setting to change; load_state_dict refuses a different stream.
    # The global batch too: the stream is world-size free, but the same checkpoint read with more rows per step
    # (more ranks, same local batch) would continue a different run.
    identity = {"data.dataset": dataset, "data.tokenizer": tokenizer.hash[:HASH_DIGITS], "training.seed": seed,
                "world size x training.local_batch_size": world_size * local_batch_size}
    return PackedLoader(stream, identity, seq_len, local_batch_size, rank, world_size, data.mask_boundary_loss)


def heldout_batches(config: Config, tokenizer: Tokenizer, rank: int, world_size: int, cache_dir: Path) -> list[Batch]:
    """[eval] batches global batches of held-out rows (this rank's share of each), read once: every evaluation
    sees the same rows, whatever the world size. None are read when [eval] interval is 0."""
    if not config.eval.interval:
        return []
    t = config.training
    loader = build_dataloader(config.data, tokenizer, t.seq_len, t.local_batch_size, rank, world_size, t.seed,
                              cache_dir, heldout=True)
    return [next(loader) for _ in range(config.eval.batches)]


def _hub_fingerprint(name: str, data: DataConfig) -> str:
    """What a streamed dataset is made of, so that a changed corpus is refused on resume as a local one is: its
    data files, by content where they are local, by resolved URL (which names the hub revision) where remote, and
    the builder's own hash (its code and configuration)."""
    import datasets

    builder = datasets.load_dataset_builder(name, data.dataset_config or None)
    digest = hashlib.sha256(str(builder.hash).encode())
    for split, files in sorted((builder.config.data_files or {}).items(), key=lambda item: str(item[0])):
        for file in files:
            local = Path(file)
            digest.update(f"{split} {file} {_sha256(local) if local.is_file() else ''}\n".encode())
    return digest.hexdigest()[:HASH_DIGITS]


def _hub_dataset(name: str, data: DataConfig):
    import datasets

    try:
        return datasets.load_dataset(name, data.dataset_config or None, split=data.split, streaming=True)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as error:
        if isinstance(error, ConnectionError) or "offline" in str(error).lower():
            raise UserError(f"data.dataset: cannot reach the HF hub for {name!r}; connect, or give a local "
                            ".jsonl/.parquet/.txt file or folder, or \"stdlib\"") from None
        raise UserError(f"data.dataset: {name!r} not found on the HF hub ({error}); check the name") from None
    except ValueError as error:  # "Bad split: ..." or "BuilderConfig 'x' not found. Available: [...]"
        field = "data.split" if "split" in str(error).lower() else "data.dataset_config"
        raise UserError(f"{field}: {name!r}: {error}; pick one it lists") from None
