"""recipes.data: sources, tokenizers, packing, world-size independence and exact resume, on small corpora (the whole
stdlib corpus and the hub clients are tests/process/test_default_data.py's)."""

import itertools
import json
import re
from dataclasses import replace

import pytest
import torch

from recipes.build import check_fits, model_shape
from recipes.config import DataConfig, load_config
from recipes.data import build_dataloader, build_tokenizer
from recipes.data.cache import write_cached
from recipes.data.loader import PackedLoader
from recipes.data.sources import is_heldout, stdlib_documents
from recipes.data.tokenizer import DEFAULT_EOS, default_tokenizer_file, train_default_tokenizer
from recipes.errors import UserError
from recipes.qwen3.loss import IGNORE_INDEX, counted_labels


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A tokenizer of the default kind (byte-level BPE, vocabulary 2048, DEFAULT_EOS) trained on a slice of the
    stdlib corpus, a fraction of the whole corpus's training time; train.py's default, trained on all of it, is
    the process tier's (tests/process/test_default_data.py)."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(
        train_default_tokenizer([text[:5000] for text in itertools.islice(stdlib_documents(), 300)], 2048).to_str()
    )
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    return build_tokenizer(DataConfig(tokenizer=str(tokenizer_file)), tokenizer_file.parent)


@pytest.fixture(scope="session")
def documents():
    """40 real documents of very different lengths (cut from the standard library), so rows straddle them."""
    return [text[: 40 + 19 * i] for i, text in enumerate(itertools.islice(stdlib_documents(), 40))]


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("jsonl") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(documents)))
    return path


def loader(path, tokenizer, cache_dir, *, seq_len=32, local=4, rank=0, world=1, seed=0, **data) -> PackedLoader:
    return build_dataloader(
        DataConfig(dataset=str(path), **data), tokenizer, seq_len, local, rank, world, seed, cache_dir
    )


def flat(batch) -> torch.Tensor:
    """A Batch as one tensor (inputs, labels, document starts side by side), to compare batches whole."""
    return torch.cat([batch.inputs, batch.labels, batch.document_starts.long()], dim=1)


def batches(source, n) -> list[torch.Tensor]:
    return [flat(next(source)) for _ in range(n)]


def test_default_tokenizer_is_deterministic_and_cached(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 2048 and tokenizer.eos_id == tokenizer.engine.token_to_id(DEFAULT_EOS)
    [ids] = tokenizer.encode_batch(["def f(x):\n    return x + 1\n"])
    assert tokenizer.engine.decode(ids) == "def f(x):\n    return x + 1\n" and tokenizer.eos_id not in ids
    assert tokenizer.encode_batch(["import os", "x = 1"]) == [
        tokenizer.encode_batch([text])[0] for text in ("import os", "x = 1")
    ]

    # Training is deterministic (shown on part of the default corpus, to keep the suite fast on 2 cores).
    part = [text[:5000] for text in itertools.islice(stdlib_documents(), 60)]
    first, second = (json.loads(train_default_tokenizer(part, 512).to_str()) for _ in range(2))
    assert len(first["model"]["vocab"]) == 512
    assert first["model"]["vocab"] == second["model"]["vocab"] and first["model"]["merges"] == second["model"]["merges"]

    # A build reads the cached file instead of training: plant a different tokenizer under the cache's name.
    small = train_default_tokenizer(["a tiny corpus, a tiny corpus"], 300)
    cache_file, _ = default_tokenizer_file(2048, tmp_path)
    write_cached(cache_file, lambda handle: handle.write(small.to_str().encode()))
    assert build_tokenizer(DataConfig(), tmp_path).vocab_size == small.get_vocab_size() < 2048


def test_same_seed_same_rows_other_seed_other_rows(jsonl, tokenizer, cache_dir):
    a = batches(loader(jsonl, tokenizer, cache_dir, seed=1), 5)
    b = batches(loader(jsonl, tokenizer, cache_dir, seed=1), 5)
    c = batches(loader(jsonl, tokenizer, cache_dir, seed=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))


def test_world_sizes_see_the_same_global_batches(jsonl, tokenizer, cache_dir):
    steps = 100  # a few epochs of the small corpus, so rows straddle epoch boundaries too
    one = loader(jsonl, tokenizer, cache_dir, local=4)
    assert steps * 4 * 33 > 2 * one.num_tokens
    ranks = [loader(jsonl, tokenizer, cache_dir, local=2, rank=r, world=2) for r in range(2)]
    for _ in range(steps):
        assert torch.equal(flat(next(one)), torch.cat([flat(next(r)) for r in ranks]))


def whole_row(batch) -> torch.Tensor:
    """The single row of a one-row batch as the seq_len + 1 tokens it was cut from."""
    return torch.cat([batch.inputs[0], batch.labels[0, -1:]])


def one_epoch_of_documents(stream, eos_id) -> list[list[int]]:
    """The stream's first epoch, cut at each EOS (which must end it)."""
    rows = [whole_row(next(stream)) for _ in range(stream.num_tokens // 16 + 1)]
    epoch = torch.cat(rows)[: stream.num_tokens].tolist()
    assert epoch[-1] == eos_id
    pieces, current = [], []
    for token in epoch:
        if token == eos_id:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    return pieces


def test_every_document_once_per_epoch_each_followed_by_eos(jsonl, documents, tokenizer, cache_dir):
    pieces = one_epoch_of_documents(loader(jsonl, tokenizer, cache_dir, seq_len=15, local=1), tokenizer.eos_id)
    training = [text for text in documents if not is_heldout(text)]
    assert 0 < len(training) < len(documents)  # the fixture corpus has held-out documents too
    expected = tokenizer.encode_batch(training)
    assert sorted(pieces) == sorted(expected) and pieces != expected  # all training documents once, shuffled


def test_heldout_stream_reads_only_the_heldout_documents(jsonl, documents, tokenizer, cache_dir):
    heldout = build_dataloader(DataConfig(dataset=str(jsonl)), tokenizer, 15, 1, 0, 1, 0, cache_dir, heldout=True)
    expected = tokenizer.encode_batch([text for text in documents if is_heldout(text)])
    assert sorted(one_epoch_of_documents(heldout, tokenizer.eos_id)) == sorted(expected)


@pytest.mark.parametrize("world", [1, 2])
def test_resume_continues_the_exact_stream(jsonl, tokenizer, cache_dir, world):
    ranks = [loader(jsonl, tokenizer, cache_dir, local=4 // world, rank=r, world=world) for r in range(world)]
    for source in ranks:
        batches(source, 7)
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert all(source.state_dict() == state for source in ranks)  # one global position, the same on every rank
    expected = [torch.cat(step) for step in zip(*(batches(source, 30) for source in ranks))]

    # resume on one rank with twice the local batch: same global batches
    resumed = loader(jsonl, tokenizer, cache_dir, local=4)
    resumed.load_state_dict(state)
    assert all(torch.equal(flat(next(resumed)), batch) for batch in expected)


def test_resume_refuses_another_seed(jsonl, tokenizer, cache_dir):
    state = loader(jsonl, tokenizer, cache_dir, seed=0).state_dict()
    with pytest.raises(UserError, match="^training.seed: "):
        loader(jsonl, tokenizer, cache_dir, seed=1).load_state_dict(state)


def test_local_formats_give_the_same_stream(documents, jsonl, tokenizer, cache_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = tmp_path / "array.json"
    records.write_text(json.dumps([{"body": text} for text in documents]))
    jsonl_body = tmp_path / "body.jsonl"
    jsonl_body.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents))
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": documents}), parquet, row_group_size=16)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, text in enumerate(documents):
        (texts / f"doc{i:03d}.txt").write_text(text)
    (texts / "notes.md").write_text("not a corpus file")

    reference = batches(loader(jsonl, tokenizer, cache_dir), 8)
    for path, field in [(records, "body"), (jsonl_body, "body"), (parquet, "body"), (texts, "text")]:
        stream = loader(path, tokenizer, cache_dir, text_field=field)
        assert stream.num_documents == sum(not is_heldout(text) for text in documents), path
        assert all(torch.equal(x, y) for x, y in zip(batches(stream, 8), reference)), path


def test_streamed_dataset_is_deterministic_world_size_free_and_resumable(jsonl, tokenizer, cache_dir):
    """hf:NAME through the real `datasets` streaming path; NAME is a local dataset folder, so it runs offline."""

    def stream(local=4, rank=0, world=1, seed=0):
        return loader(
            f"hf:{jsonl.parent}", tokenizer, cache_dir, seq_len=30, local=local, rank=rank, world=world, seed=seed
        )

    one, ranks = stream(), [stream(2, r, 2) for r in range(2)]
    assert one.num_documents is None
    steps = loader(jsonl, tokenizer, cache_dir).num_tokens // (4 * 31) + 2  # into the second epoch
    first = batches(one, steps)
    assert all(torch.equal(batch, torch.cat([flat(next(r)) for r in ranks])) for batch in first)
    assert not all(torch.equal(x, y) for x, y in zip(first, batches(stream(seed=5), steps)))

    state = json.loads(json.dumps(one.state_dict()))
    assert state["epoch"] == 1
    expected = batches(one, 6)
    resumed = stream()
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(batches(resumed, 6), expected))
    with pytest.raises(UserError, match="^data.split: "):
        loader(f"hf:{jsonl.parent}", tokenizer, cache_dir, split="validation")


def test_tokenizer_json_file_and_folder(tokenizer, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer.engine.to_str())
    assert build_tokenizer(DataConfig(tokenizer=str(folder)), tmp_path).eos_id == tokenizer.eos_id  # <|endoftext|>

    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "def"}}))
    from_config = build_tokenizer(DataConfig(tokenizer=str(folder / "tokenizer.json")), tmp_path)
    assert from_config.eos_id == tokenizer.engine.token_to_id("def") != tokenizer.eos_id
    assert from_config.hash != tokenizer.hash  # so its token cache is another file
    override = build_tokenizer(DataConfig(tokenizer=str(folder), eos_token=DEFAULT_EOS), tmp_path)
    assert override.eos_id == tokenizer.eos_id

    bare = tmp_path / "bare.json"
    bare_backend = train_default_tokenizer(["no special tokens here"], 280)
    bare.write_text(bare_backend.to_str().replace(DEFAULT_EOS, "<eos>"))
    with pytest.raises(UserError, match="^data.eos_token: "):
        build_tokenizer(DataConfig(tokenizer=str(bare)), tmp_path)
    with_eos = build_tokenizer(DataConfig(tokenizer=str(bare), eos_token="<eos>"), tmp_path)
    assert (with_eos.eos_id, with_eos.vocab_size) == (0, bare_backend.get_vocab_size())


def test_user_errors_name_the_field(jsonl, tokenizer, tokenizer_file, cache_dir, tmp_path):
    debug = model_shape(load_config(None), tokenizer.eos_id)
    cases = [
        (lambda: loader(tmp_path / "missing.jsonl", tokenizer, cache_dir), "data.dataset: "),
        (lambda: loader(jsonl, tokenizer, cache_dir, text_field="content"), "data.text_field: "),
        (
            lambda: build_tokenizer(DataConfig(tokenizer=str(tokenizer_file), eos_token="<|nope|>"), cache_dir),
            "data.eos_token: ",
        ),
        (lambda: build_tokenizer(DataConfig(tokenizer="./no/such/tokenizer"), cache_dir), "data.tokenizer: "),
        (lambda: build_tokenizer(DataConfig(vocab_size=100), cache_dir), "data.vocab_size: "),
        (
            lambda: check_fits(replace(debug, vocab_size=1024), 64, tokenizer),
            "data.tokenizer: vocabulary 2048 exceeds model vocab 1024",
        ),
        (lambda: check_fits(debug, 2049, tokenizer), "training.seq_len: 2049 exceeds the model's max_seq_len 2048"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    cases.append((lambda: loader(empty, tokenizer, cache_dir), "data.dataset: the corpus has no"))
    for build, message in cases:
        with pytest.raises(UserError, match="^" + message.replace(".", r"\.")):
            build()
    check_fits(debug, 2048, tokenizer)  # the edges fit


def documents_by_starts(batch) -> list[list[int]]:
    """The first row's tokens cut where the loader says documents begin."""
    pieces = []
    for token, start in zip(batch.inputs[0].tolist(), batch.document_starts[0].tolist()):
        if start:
            pieces.append([])
        pieces[-1].append(token)
    return pieces


def test_document_starts_come_from_the_packing_not_from_eos_ids(tokenizer, cache_dir, tmp_path):
    """A document whose text holds the EOS token (so its ids hold the eos id) stays one document; chat data that
    ends turns with the eos id is packed the same way."""
    texts = [
        "first document, plain",
        f"a document quoting {DEFAULT_EOS} inside and going on",
        f"turn one{DEFAULT_EOS}turn two{DEFAULT_EOS}turn three",
        "last one",
    ] * 6
    texts = [f"{i}: {text}" for i, text in enumerate(texts) if not is_heldout(f"{i}: {text}")]
    path = tmp_path / "eos-inside.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    stream = loader(path, tokenizer, cache_dir, seq_len=1023, local=1)
    assert stream.num_tokens < 1023  # one row holds the whole first epoch
    pieces = documents_by_starts(next(stream))[: len(texts)]
    expected = [ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    assert any(tokenizer.eos_id in ids[:-1] for ids in expected)  # the eos id really is inside some documents
    assert sorted(pieces) == sorted(expected), "a document was cut at an eos id inside it"


def test_boundary_loss_masking_ignores_the_label_of_the_next_documents_first_token(jsonl, tokenizer, cache_dir):
    plain = next(loader(jsonl, tokenizer, cache_dir, seq_len=64))
    masked = next(loader(jsonl, tokenizer, cache_dir, seq_len=64, mask_boundary_loss=True))
    assert torch.equal(plain.inputs, masked.inputs) and torch.equal(plain.document_starts, masked.document_starts)
    ignored = masked.labels == IGNORE_INDEX
    # ignored exactly where the next token begins a document, which is where the input is the EOS
    assert torch.equal(ignored[:, :-1], plain.document_starts[:, 1:])
    assert ignored.any() and (plain.inputs[ignored[:, :-1].nonzero(as_tuple=True)] == tokenizer.eos_id).all()
    assert plain.global_labels == plain.labels.numel()  # world size 1: every row of the step is here
    assert masked.global_labels == counted_labels(masked.labels) == plain.global_labels - int(ignored.sum())
    halves = [
        next(loader(jsonl, tokenizer, cache_dir, seq_len=64, local=2, rank=r, world=2, mask_boundary_loss=True))
        for r in range(2)
    ]
    assert [h.global_labels for h in halves] == [masked.global_labels] * 2  # each rank knows the whole step's count
    assert torch.equal(masked.labels[~ignored], plain.labels[~ignored])


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "fine"}\n{"text": 7}\n', ":2: 'text' must be a string, got int"),
        (b'{"text": "fine"}\n\n["a", "list"]\n', ":3: a record must be a JSON object, got list"),
        (b'{"text": "fine"}\n{"text": "broken\n', ":2: not a JSON line"),
        (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8 (byte 30)"),
        (b'[{"text": "fine"}, {"text": null}, {"text": ["x"]}]', " record 2: 'text' must be a string, got list"),
    ],
    ids=["not-a-string", "not-an-object", "torn-line", "latin-1", "array"],
)
def test_malformed_records_name_the_file_and_line(tokenizer, cache_dir, tmp_path, content, message):
    path = tmp_path / ("corpus.json" if content.startswith(b"[") else "corpus.jsonl")
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        loader(path, tokenizer, cache_dir)
    assert str(error.value).startswith(f"data.dataset: {path}{message}"), str(error.value)


@pytest.mark.parametrize("content", ['{"eos_token": ', '{"eos_token": 5}'], ids=["not-json", "not-a-string"])
def test_a_bad_tokenizer_config_is_a_user_error(tokenizer, tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(tokenizer.engine.to_str())
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(UserError, match=rf"^data.tokenizer: {tmp_path / 'tokenizer_config.json'}"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path)), tmp_path)


def test_a_damaged_cache_file_is_named_and_rebuilt(jsonl, tokenizer, tmp_path, caplog):
    """Cache files record their size and sha256 when built; one truncated or changed since is rebuilt."""
    cache = tmp_path / "cache"
    expected = batches(loader(jsonl, tokenizer, cache), 3)
    [tokens_file] = cache.glob("corpus-*.tokens.npy")
    for damage in (lambda data: data[:-8], lambda data: data[:-8] + bytes(8)):  # truncated, then overwritten
        tokens_file.write_bytes(damage(tokens_file.read_bytes()))
        caplog.clear()
        with caplog.at_level("WARNING", logger="recipes.data.cache"):
            again = batches(loader(jsonl, tokenizer, cache), 3)
        assert f"cache: {tokens_file} is damaged" in caplog.text
        assert all(torch.equal(a, b) for a, b in zip(again, expected))


def test_a_changed_streamed_dataset_is_refused_on_resume(jsonl, tokenizer, cache_dir, tmp_path):
    """hf: datasets carry a fingerprint of their files in the stream's identity, as local corpora do."""
    folder = tmp_path / "hub-like"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl.read_bytes())
    state = json.loads(json.dumps(loader(f"hf:{folder}", tokenizer, cache_dir).state_dict()))
    loader(f"hf:{folder}", tokenizer, cache_dir).load_state_dict(state)  # unchanged: resumes

    text = (folder / "train.jsonl").read_text()
    (folder / "train.jsonl").write_text(text.replace("a", "b", 1))  # same size, other contents
    with pytest.raises(UserError, match="^data.dataset: the checkpoint's data stream was made with"):
        loader(f"hf:{folder}", tokenizer, cache_dir).load_state_dict(state)


def test_an_empty_split_is_named(tokenizer, cache_dir, tmp_path):
    """A one-document corpus: that document lands in one split, and the other split's error names it."""
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": "print('only one document')"}) + "\n")
    empty = "held-out (validation" if not is_heldout("print('only one document')") else "training ("
    with pytest.raises(UserError, match=rf"^data.dataset: the corpus has no non-empty {re.escape(empty)}"):
        for heldout in (False, True):
            build_dataloader(DataConfig(dataset=str(corpus)), tokenizer, 32, 4, 0, 1, 0, cache_dir, heldout=heldout)
