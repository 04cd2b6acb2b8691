"""Corpus reading, the train/validation split, documents and the two batchings.

A training set is one flat array of token ids plus, per step, the start offsets of its rows:
`random` rows are nanoGPT's raw windows at random offsets (with `--split-docs`, the lecture's
`createbatch`: a window at a random offset inside a random document); `stream` rows are the
lecture's `createdata` pieces (start symbol, seq_len characters, end symbol, padding), laid end
to end so that the same gather serves both. Batches are a pure function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import TrainConfig
from transformer_jax.errors import UserError
from transformer_jax.tokenizer import CharTokenizer

# A training set (token ids) up to this size is placed on every device and its rows gathered
# there; a larger one stays on the host, its rows gathered there a chunk of steps ahead.
ON_DEVICE_BYTES = 1 << 28


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a directory's *.txt files in name order joined by blank lines."""
    text = "".join(iter_text(path))
    if not text or text.isspace():  # (strip() would copy a large corpus once more)
        raise UserError(f"corpus {path} is empty; give a file with some text")
    return text


def iter_text(path: str | Path, chunk_bytes: int = 1 << 22, *, what: str = "corpus"):
    """The text of `read_text(path)` as consecutive pieces of about `chunk_bytes` bytes, read
    one at a time (memory bounded by the piece, not by the file); `what` names the file in
    errors (corpus, --data)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; give a UTF-8 text file with --data")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{what} directory {path} holds no .txt files")
    for i, file in enumerate(files):
        if i:
            yield "\n\n"
        decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(chunk_bytes), b""):
                if b"\0" in block:
                    raise UserError(f"{what} {file} is binary (it holds NUL bytes); give a text "
                                    "file")
                try:
                    yield decoder.decode(block)
                except UnicodeDecodeError as e:
                    raise UserError(f"{what} {file} is not UTF-8 (byte {done + e.start}); "
                                    "convert it, e.g. iconv -t UTF-8") from None
                done += len(block)
        try:
            yield decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{what} {file} is not UTF-8 (it ends inside a character); "
                            "convert it, e.g. iconv -t UTF-8") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation): the last `val_fraction` of the characters is held out."""
    cut = split_point(len(text), val_fraction)
    return text[:cut], text[cut:]


def split_point(chars: int, val_fraction: float) -> int:
    """Where the validation split of a text of `chars` characters starts."""
    return chars - int(chars * val_fraction)


@dataclass(frozen=True)
class Batches:
    """Rows of `row_len` positions gathered from `source`, an (N, ...) array or a pytree of them.

    `random` rows start at random offsets, or, given `docs`, at a random offset inside a random
    document; `stream` rows are read in order.
    """

    source: Any
    row_len: int
    batch_size: int
    batching: str
    seed: int
    docs: np.ndarray | None = None  # (D, 2) start and length in `source` of each document
    predicts_last: bool = False  # True: every position is a target (else the last is only one)

    @property
    def tokens_per_step(self) -> int:
        """Predicted positions per full batch."""
        return self.batch_size * (self.row_len - (0 if self.predicts_last else 1))

    @property
    def length(self) -> int:
        return len(jax.tree.leaves(self.source)[0])

    @property
    def steps_per_epoch(self) -> int:
        """Stream batching: batches in one pass over the text (random: windows per pass)."""
        return max(1, self.length // (self.row_len * self.batch_size))

    def starts(self, step: int, n: int) -> np.ndarray:
        """Start offsets into `source` of the rows of steps [step, step + n): (n, batch_size)."""
        if self.batching == "stream":
            rows = np.arange(step, step + n)[:, None] % self.steps_per_epoch * self.batch_size
            return ((rows + np.arange(self.batch_size)) * self.row_len).astype(np.int32)
        out = np.empty((n, self.batch_size), np.int64)
        for i, s in enumerate(range(step, step + n)):
            rng = np.random.default_rng([self.seed, s])
            if self.docs is None:
                out[i] = rng.integers(0, self.length - self.row_len + 1, self.batch_size)
            else:
                doc_start, doc_len = self.docs[rng.integers(0, len(self.docs), self.batch_size)].T
                out[i] = doc_start + rng.integers(0, np.maximum(doc_len - self.row_len, 0) + 1)
        return out.astype(np.int32)


def stays_on_host(source) -> bool:
    """Whether a training set is too large to place on every device (see `ON_DEVICE_BYTES`)."""
    return isinstance(source, np.ndarray) and source.nbytes > ON_DEVICE_BYTES


def gather(source, starts: jnp.ndarray, row_len: int):
    """Rows source[s : s + row_len] for every start: (...,) int -> (..., row_len, ...) for each
    array of the `source` pytree."""
    index = starts[..., None] + jnp.arange(row_len)
    return jax.tree.map(lambda s: s[index], source)


def split_documents(text: str, pattern: str) -> list[str]:
    """The documents of `text`: the first group of each match of `pattern` if it has a group,
    else the pieces between matches; blank ones dropped (`.` matches newlines too)."""
    regex = re.compile(pattern, re.DOTALL)
    if regex.groups:
        pieces = [m.group(1) or "" for m in regex.finditer(text)]
    else:
        pieces = regex.split(text)
    return [p for p in pieces if p.strip()]


def document_source(docs: list[np.ndarray], pad_id: int, row_len: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Documents laid end to end, each followed by row_len - 1 pads, so that a row starting
    inside a document reads pads, never the next document, past its end.

    Returns:
      (source (N,), docs (D, 2) start and length of each document).
    """
    lengths = np.array([len(d) for d in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + row_len - 1)[:-1]]).astype(np.int64)
    dtype = np.result_type(*docs) if docs else np.int32
    source = np.full(int(lengths.sum()) + len(docs) * (row_len - 1), pad_id, dtype)
    for start, doc in zip(starts, docs):
        source[start:start + len(doc)] = doc
    return source, np.stack([starts, lengths], axis=1)


def stream_rows(tokenizer: CharTokenizer, text: str, seq_len: int, streams: int,
                row_multiple: int = 1) -> np.ndarray:
    """The lecture's `createdata`: (streams, R, seq_len + 2) ids.

    The text is cut into `streams` contiguous chunks of ceil(len/streams) characters, each chunk
    into pieces of `seq_len`; a piece becomes start, its characters, end, then padding. Chunk c's
    pieces are batch c. R (pieces per chunk) is rounded up to `row_multiple` with all-pad rows.
    """
    chunk = -(-len(text) // streams)
    rows = -(-chunk // seq_len)
    rows = -(-rows // row_multiple) * row_multiple
    out = np.full((streams, rows, seq_len + 2), tokenizer.pad_id, dtype=tokenizer.id_dtype)
    for c in range(streams):
        ids = tokenizer.encode(text[c * chunk:(c + 1) * chunk])
        n = len(ids)
        lengths = np.clip(n - np.arange(rows) * seq_len, 0, seq_len)
        body = np.full(rows * seq_len, tokenizer.pad_id, dtype=tokenizer.id_dtype)
        body[:n] = ids
        out[c, :, 1:seq_len + 1] = body.reshape(rows, seq_len)
        used = lengths > 0
        out[c, used, 0] = tokenizer.start_id
        out[c, np.flatnonzero(used), lengths[used] + 1] = tokenizer.end_id
    return out


def documents(tokenizer, text: str, cfg: TrainConfig) -> list[np.ndarray]:
    """`text` as id arrays: one per document of at least `min_len` tokens under `split_docs`,
    else the whole text as one."""
    encode = lambda t: np.asarray(tokenizer.encode(t))
    if cfg.split_docs is None:
        return [encode(text)]
    return [ids for ids in map(encode, split_documents(text, cfg.split_docs))
            if len(ids) >= cfg.min_len]


def train_batches(tokenizer, text: str, cfg: TrainConfig, row_multiple: int = 1) -> Batches:
    """The training rows of `text` under `cfg`'s batching; rows per batch are a multiple of
    `row_multiple` (data devices x micro-batches). `tokenizer` needs `encode` and `pad_id`."""
    if cfg.batching == "stream":
        rows = stream_rows(tokenizer, text, cfg.seq_len, cfg.streams, row_multiple)
        if not (rows[:, :, 2] != tokenizer.pad_id).any(axis=1).all():
            raise UserError(f"the training text ({len(text)} characters) is too short for "
                            f"--streams {cfg.streams}; lower --streams or give a longer corpus")
        return Batches(rows.reshape(-1), rows.shape[2], rows.shape[1], "stream", cfg.seed)
    if cfg.split_docs is None:
        return window_batches(np.asarray(tokenizer.encode(text)), cfg, row_multiple)
    check_batch_size(cfg, row_multiple)
    docs = documents(tokenizer, text, cfg)
    if not docs:
        raise UserError(f"--split-docs {cfg.split_docs!r} finds no training document of "
                        f"--min-len {cfg.min_len} tokens or more")
    source, spans = document_source(docs, tokenizer.pad_id, cfg.tokens_per_sequence)
    return Batches(source, cfg.tokens_per_sequence, cfg.batch_size, "random", cfg.seed,
                   docs=spans)


def window_batches(ids: np.ndarray, cfg: TrainConfig, row_multiple: int = 1) -> Batches:
    """nanoGPT's windows at random offsets of `ids` (N,), which may be a token file's map."""
    check_batch_size(cfg, row_multiple)
    if len(ids) < cfg.tokens_per_sequence:
        raise UserError(f"the training text ({len(ids)} tokens) is shorter than one "
                        f"sequence ({cfg.tokens_per_sequence}); lower --seq-len or add text")
    return Batches(ids, cfg.tokens_per_sequence, cfg.batch_size, "random", cfg.seed)


def eval_rows(tokenizer, text: str, cfg: TrainConfig) -> np.ndarray:
    """Every validation row once, (N, row_len): stream pieces, or for random batching all
    non-overlapping windows of each document (each token is predicted exactly once)."""
    if cfg.batching == "stream":
        return stream_rows(tokenizer, text, cfg.seq_len, 1)[0]
    return window_rows(documents(tokenizer, text, cfg), tokenizer.pad_id, cfg)


def window_rows(docs: list[np.ndarray], pad_id: int, cfg: TrainConfig, row_multiple: int = 1
                ) -> np.ndarray:
    """Every target of the documents `docs` once, in rows of `windows` (N, seq_len + 1), with
    all-pad rows up to a multiple of `row_multiple`; of one document, a view of one copy."""
    if sum(map(len, docs)) < cfg.tokens_per_sequence:
        raise UserError(f"the validation text ({sum(map(len, docs))} tokens) is shorter than "
                        f"one sequence ({cfg.tokens_per_sequence}); lower --seq-len or raise "
                        "--val-fraction")
    if len(docs) == 1:
        return windows(docs[0], cfg.seq_len, pad_id, row_multiple)
    rows = np.concatenate([windows(ids, cfg.seq_len, pad_id) for ids in docs])
    return pad_rows(rows, row_multiple, pad_id)


def windows(ids: np.ndarray, seq_len: int, pad_id: int, row_multiple: int = 1) -> np.ndarray:
    """Non-overlapping rows of seq_len + 1 ids covering every target of `ids` once (a row's
    last id is the next row's first), the last row padded, and all-pad rows after it up to a
    multiple of `row_multiple`: (ceil((len - 1) / seq_len) rounded up, seq_len + 1). A
    read-only view of one padded copy of `ids`: a large split costs its size once."""
    n = -(-(len(ids) - 1) // seq_len)
    n += -n % row_multiple
    padded = np.full(n * seq_len + 1, pad_id, dtype=ids.dtype)
    padded[:len(ids)] = ids
    size = padded.itemsize
    return np.lib.stride_tricks.as_strided(padded, (n, seq_len + 1), (seq_len * size, size),
                                           writeable=False)


def pad_rows(rows: np.ndarray, multiple: int, pad_id) -> np.ndarray:
    """`rows` (N, ...) with all-pad rows appended up to a multiple of `multiple` (`rows`
    itself when N is one)."""
    extra = -len(rows) % multiple
    if not extra:
        return rows
    return np.concatenate([rows, np.full((extra, *rows.shape[1:]), pad_id, rows.dtype)])


def eval_batch_size(cfg: TrainConfig, n_dev: int) -> int:
    """Rows per evaluation batch: --batch-size rounded up to a multiple of the devices."""
    return -(-cfg.batch_size // n_dev) * n_dev


def check_batch_size(cfg: TrainConfig, row_multiple: int) -> None:
    """Raise UserError unless the rows of a batch split evenly over devices x micro-batches."""
    if cfg.batch_size % row_multiple:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by {row_multiple} "
                        f"(data-parallel devices x --micro-batches {cfg.micro_batches})")


def datasets(tokenizer, text: str, cfg: TrainConfig, n_dev: int) -> tuple[Batches, np.ndarray]:
    """Training batches of `text`'s training split, and every row of its validation split as
    (N, B, S) evaluation batches for `n_dev` devices."""
    train_text, val_text = split_text(text, cfg.val_fraction)
    batches = train_batches(tokenizer, train_text, cfg, row_multiple=n_dev * cfg.micro_batches)
    return batches, eval_batches(eval_rows(tokenizer, val_text, cfg), tokenizer.pad_id, cfg,
                                 n_dev)


def window_datasets(train_ids: np.ndarray, val_ids: np.ndarray, pad_id: int, cfg: TrainConfig,
                    n_dev: int) -> tuple[Batches, np.ndarray]:
    """`datasets` of a text already encoded, for random windows over it whole (no documents):
    its training and validation splits' ids (N,), each maybe a token file's map."""
    batches = window_batches(train_ids, cfg, row_multiple=n_dev * cfg.micro_batches)
    rows = window_rows([val_ids], pad_id, cfg, eval_batch_size(cfg, n_dev))
    return batches, eval_batches(rows, pad_id, cfg, n_dev)


def eval_batches(rows: np.ndarray, pad_id: int, cfg: TrainConfig, n_dev: int) -> np.ndarray:
    """Validation rows (N, S) as (M, B, S) batches for `n_dev` devices, padded with pad rows."""
    batch = eval_batch_size(cfg, n_dev)
    return pad_rows(rows, batch, pad_id).reshape(-1, batch, rows.shape[1])
