"""The packed, resumable loader: token streams, rows with their document starts, and held-out batches.

One global token stream per seed: documents in a seeded order per epoch, each followed by EOS, concatenated and
cut into rows of seq_len+1 (no padding). Step i's global batch is rows [i*G, (i+1)*G) with G = local batch x
world size, and rank r takes the contiguous slice [r*local, (r+1)*local) of it, so every attention backend and
every world size with the same global batch trains on the same tokens. The loader's state is its position in
that stream (a token count, or a document and offset for hub streams), so a resumed run continues bit-identically.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipes.config import Config, DataConfig
from recipes.data.cache import ENCODE_CHUNK, HASH_DIGITS, corpus_tokens
from recipes.data.sources import hub_dataset, hub_fingerprint, is_heldout, local_source, missing_field
from recipes.data.tokenizer import Tokenizer
from recipes.errors import UserError
from recipes.qwen3.attention import to_device
from recipes.qwen3.loss import IGNORE_INDEX, counted_labels

_HUB_SHUFFLE_BUFFER = 10_000


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
            out[filled : filled + n] = self.tokens[begin : begin + n]
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
    the world size (the dataset's own split_dataset_by_node would give each world size other batches). The state is
    the first document not yet fully consumed (epoch, index in that epoch's order) and how many of its tokens were;
    resuming re-reads that epoch up to the document without tokenizing the skipped ones.
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
                    raise missing_field(Path(self.name), self.text_field, record)
                text = record[self.text_field]
                if text and text.strip() and is_heldout(text) == self.heldout:
                    yielded += 1
                    yield epoch, index, text
            if index < 0:
                raise UserError(f"data.dataset: {self.name} yields no records (split empty?); check data.split")
            if not yielded and not skip:  # else the next epoch would be as empty, forever
                raise UserError(
                    f"data.dataset: {self.name} has no {'held-out' if self.heldout else 'training'} "
                    f"documents with text in {self.text_field!r}; check data.text_field and data.split"
                )
            epoch, skip = epoch + 1, 0

    def _seek(self, epoch: int, document: int, offset: int) -> None:
        self._reader = self._documents(epoch, document)
        self._buffer: deque[tuple[int, int, np.ndarray]] = deque()  # (epoch, index, tokens + EOS)
        self._head_offset = offset  # tokens of the buffer's first document already consumed
        self._buffered = -offset

    def _read_chunk(self) -> None:
        chunk = list(itertools.islice(self._reader, ENCODE_CHUNK))
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
            out[filled : filled + n] = tokens[self._head_offset : self._head_offset + n]
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

    def to(self, device: torch.device) -> Batch:
        """Inputs and labels on `device` (attention.to_device: no wait for the queued kernels); the document
        starts stay on the host, where the attention backends build their metadata from them."""
        return Batch(
            to_device(self.inputs, device), to_device(self.labels, device), self.document_starts, self.global_labels
        )

    def split(self, rows: int) -> list[Batch]:
        """Micro-batches of `rows` rows each (the step's global label count stays theirs)."""
        parts = (t.split(rows) for t in (self.inputs, self.labels, self.document_starts))
        return [Batch(*part, self.global_labels) for part in zip(*parts)]


class PackedLoader:
    """Yields this rank's Batch of local_batch_size rows of the world-size-independent global stream.

    An iterator of its own rather than torch's (or torchdata's Stateful) DataLoader: the whole state is a stream
    position, and worker processes would only add state to thread through checkpoints.
    """

    def __init__(
        self,
        stream: CorpusTokens | StreamedTokens,
        identity: dict,
        seq_len: int,
        local_batch_size: int,
        rank: int,
        world_size: int,
        mask_boundary_loss: bool = False,
    ):
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
        labels = tokens[:, 1:].astype(np.int64)
        if self.mask_boundary_loss:  # the label at a document's last token (its EOS) is the next one's first token
            labels[begins[:, 1:]] = IGNORE_INDEX
        inputs, starts = torch.from_numpy(tokens[mine, :-1].astype(np.int64)), torch.from_numpy(begins[mine, :-1])
        # every rank reads the whole global batch, so each counts the step's labels itself: no collective
        return Batch(inputs, torch.from_numpy(labels[mine]), starts, counted_labels(labels))

    def state_dict(self) -> dict:
        """JSON-serialisable; the same on every rank, since the position is in the global stream."""
        return {**self.identity, **self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for field, value in self.identity.items():
            if state.get(field) != value:
                raise UserError(
                    f"{field}: the checkpoint's data stream was made with {state.get(field)!r}, this run "
                    f"has {value!r}; resume with the same setting, or use a new job.output_dir"
                )
        self.stream.load_state_dict(state)


def build_dataloader(
    data: DataConfig,
    tokenizer: Tokenizer,
    seq_len: int,
    local_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    cache_dir: Path,
    heldout: bool = False,
) -> PackedLoader:
    """data.dataset: "stdlib", a local file or folder (tokenized once, cached under cache_dir), or "hf:NAME" with
    NAME anything `datasets.load_dataset` streams (a hub id, or a local dataset folder), tokenized on the fly.
    Training reads the documents `is_heldout` rejects; heldout=True reads only the others (for evaluation)."""
    source = local_source(data)
    if source is not None:

        def documents() -> Iterator[str]:
            return (text for text in source() if is_heldout(text) == heldout)

        # About 1 document in 20 is held out (is_heldout): a tiny corpus can leave either split empty.
        kind = "held-out (validation, [eval]) " if heldout else "training (the ~95% not held out for validation) "
        tokens, offsets, corpus_key = corpus_tokens(documents, tokenizer, cache_dir, kind)
        stream = CorpusTokens(tokens, offsets, seed)
        dataset = f"{data.dataset} ({corpus_key})"
    else:
        name = data.dataset.removeprefix("hf:")
        stream = StreamedTokens(hub_dataset(name, data), tokenizer, data.text_field, seed, name, heldout)
        dataset = f"{data.dataset} {data.dataset_config} {data.split} ({hub_fingerprint(name, data)})"
    # What the stream is made of, keyed by the setting to change; load_state_dict refuses a different stream.
    # The global batch too: the stream is world-size free, but the same checkpoint read with more rows per step
    # (more ranks, same local batch) would continue a different run.
    identity = {
        "data.dataset": dataset,
        "data.tokenizer": tokenizer.hash[:HASH_DIGITS],
        "training.seed": seed,
        "world size x training.local_batch_size": world_size * local_batch_size,
    }
    return PackedLoader(stream, identity, seq_len, local_batch_size, rank, world_size, data.mask_boundary_loss)


def heldout_batches(config: Config, tokenizer: Tokenizer, rank: int, world_size: int, cache_dir: Path) -> list[Batch]:
    """[eval] batches global batches of held-out rows (this rank's share of each), read once: every evaluation
    sees the same rows, whatever the world size. None are read when [eval] interval is 0."""
    if not config.eval.interval:
        return []
    t = config.training
    loader = build_dataloader(
        config.data, tokenizer, t.seq_len, t.local_batch_size, rank, world_size, t.seed, cache_dir, heldout=True
    )
    return [next(loader) for _ in range(config.eval.batches)]
