"""Where documents come from: the standard library's sources (the offline default), local .jsonl/.json/.parquet/.txt
files and folders, and HF hub datasets (streamed); and the train/held-out split, by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from recipes.config import DataConfig
from recipes.data.cache import HASH_DIGITS, sha256_file
from recipes.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELDOUT_EVERY = 20  # about 1 document in 20 is held out of training, chosen by a hash of its text


def is_heldout(text: str) -> bool:
    """The train/held-out split: by content, so it is the same for every source, order, seed and world size."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % HELDOUT_EVERY == 0


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


def missing_field(file: Path, text_field: str, keys) -> UserError:
    return UserError(
        f"data.text_field: {text_field!r} is not a field of the records in {file} "
        f"(fields: {', '.join(map(str, keys))}); set data.text_field to the one holding the text"
    )


def _bad_record(where: str, what: str) -> UserError:
    return UserError(f"data.dataset: {where}: {what}; fix or remove that record, or point data.dataset elsewhere")


def _records_text(file: Path, records: Iterable[tuple[str, object]], text_field: str) -> Iterator[str]:
    """The text of each (where, record) pair; `where` names the file and line (or array index) for errors."""
    for where, record in records:
        if not isinstance(record, dict):
            raise _bad_record(where, f"a record must be a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise missing_field(file, text_field, record)
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
        import pyarrow
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(file)
        except (pyarrow.ArrowException, OSError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"data.dataset: {file} is not a readable parquet file ({reason}); copy it again, or point "
                "data.dataset elsewhere"
            ) from None
        if text_field not in schema.names:
            raise missing_field(file, text_field, schema.names)
        if schema.field(text_field).type not in ("string", "large_string"):
            raise _bad_record(
                f"{file} column {text_field!r}", f"must hold strings, holds {schema.field(text_field).type}"
            )
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
                    yield from _records_text(
                        file, ((f"{file} record {i}", r) for i, r in enumerate(records)), text_field
                    )
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
            raise UserError(
                f"data.dataset: folder {path} holds no {'/'.join(FILE_SUFFIXES)} files; point it at a folder that does"
            )
    elif path.suffix.lower() in FILE_SUFFIXES:
        files = [path]
    else:
        raise UserError(f"data.dataset: {path} is not a {'/'.join(FILE_SUFFIXES)} file; convert it or use a folder")
    for file in files:
        for text in _file_documents(file, text_field):
            if text is not None and text.strip():
                yield text


def local_source(data: DataConfig) -> Callable[[], Iterator[str]] | None:
    """A function that reads data.dataset's documents afresh (so no pass holds the corpus in memory) if it names an
    offline source; None for a hub dataset."""
    if data.dataset == "stdlib":
        return stdlib_documents
    if data.dataset.startswith("hf:"):
        return None
    path = Path(data.dataset).expanduser()
    if not path.exists():
        raise UserError(
            f'data.dataset: {data.dataset!r} does not exist; give "stdlib", a '
            f'{"/".join(FILE_SUFFIXES)} file or folder, or "hf:NAME" for a hub dataset'
        )
    return lambda: local_documents(path, data.text_field)


def hub_fingerprint(name: str, data: DataConfig) -> str:
    """What a streamed dataset is made of, so that a changed corpus is refused on resume as a local one is: its
    data files, by content where they are local, by resolved URL (which names the hub revision) where remote, and
    the builder's own hash (its code and configuration)."""
    import datasets

    builder = datasets.load_dataset_builder(name, data.dataset_config or None)
    digest = hashlib.sha256(str(builder.hash).encode())
    for split, files in sorted((builder.config.data_files or {}).items(), key=lambda item: str(item[0])):
        for file in files:
            local = Path(file)
            digest.update(f"{split} {file} {sha256_file(local) if local.is_file() else ''}\n".encode())
    return digest.hexdigest()[:HASH_DIGITS]


def hub_dataset(name: str, data: DataConfig):
    import datasets

    try:
        return datasets.load_dataset(name, data.dataset_config or None, split=data.split, streaming=True)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as error:
        if isinstance(error, ConnectionError) or "offline" in str(error).lower():
            raise UserError(
                f"data.dataset: cannot reach the HF hub for {name!r}; connect, or give a local "
                '.jsonl/.parquet/.txt file or folder, or "stdlib"'
            ) from None
        raise UserError(f"data.dataset: {name!r} not found on the HF hub ({error}); check the name") from None
    except ValueError as error:  # "Bad split: ..." or "BuilderConfig 'x' not found. Available: [...]"
        field = "data.split" if "split" in str(error).lower() else "data.dataset_config"
        raise UserError(f"{field}: {name!r}: {error}; pick one it lists") from None
