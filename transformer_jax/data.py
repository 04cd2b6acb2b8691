"""Corpus reading, the train/validation split and the two batchings.

A training set is one flat array of token ids plus, per step, the start offsets of its rows:
`random` rows are nanoGPT's raw windows at random offsets; `stream` rows are the lecture's
`createdata` pieces (start symbol, seq_len characters, end symbol, padding), laid end to end so
that the same gather serves both. Batches are a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from transformer_jax.config import TrainConfig
from transformer_jax.errors import UserError
from transformer_jax.tokenizer import CharTokenizer


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a directory's *.txt files in name order joined by blank lines."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"corpus {path} does not exist; give a UTF-8 text file with --data")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"corpus directory {path} holds no .txt files")
    texts = []
    for file in files:
        raw = file.read_bytes()
        if b"\0" in raw:
            raise UserError(f"corpus {file} is binary (it holds NUL bytes); give a text file")
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"corpus {file} is not UTF-8 (byte {e.start}); "
                            "convert it, e.g. iconv -t UTF-8") from None
    text = "\n\n".join(texts)
    if not text.strip():
        raise UserError(f"corpus {path} is empty; give a file with some text")
    return text


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation): the last `val_fraction` of the characters is held out."""
    cut = len(text) - int(len(text) * val_fraction)
    return text[:cut], text[cut:]


@dataclass(frozen=True)
class Batches:
    """Rows of `row_len` tokens gathered from one flat `source` array of ids."""

    source: np.ndarray  # (N,) token ids
    row_len: int
    batch_size: int
    batching: str
    seed: int

    @property
    def tokens_per_step(self) -> int:
        """Predicted positions per batch (each row's last token is only a target)."""
        return self.batch_size * (self.row_len - 1)

    @property
    def steps_per_epoch(self) -> int:
        """Stream batching: batches in one pass over the text (random: windows per pass)."""
        return max(1, len(self.source) // (self.row_len * self.batch_size))

    def starts(self, step: int, n: int) -> np.ndarray:
        """Start offsets into `source` of the rows of steps [step, step + n): (n, batch_size)."""
        if self.batching == "stream":
            rows = np.arange(step, step + n)[:, None] % self.steps_per_epoch * self.batch_size
            return ((rows + np.arange(self.batch_size)) * self.row_len).astype(np.int32)
        high = len(self.source) - self.row_len + 1
        return np.stack([np.random.default_rng([self.seed, s]).integers(0, high, self.batch_size)
                         for s in range(step, step + n)]).astype(np.int32)


def gather(source_N: jnp.ndarray, starts: jnp.ndarray, row_len: int) -> jnp.ndarray:
    """Rows source[s : s + row_len] for every start: (...,) int -> (..., row_len) int32."""
    return source_N[starts[..., None] + jnp.arange(row_len)].astype(jnp.int32)


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


def train_batches(tokenizer: CharTokenizer, text: str, cfg: TrainConfig,
                  row_multiple: int = 1) -> Batches:
    """The training rows of `text` under `cfg`'s batching; rows per batch are a multiple of
    `row_multiple` (data devices x micro-batches)."""
    if cfg.batching == "stream":
        rows = stream_rows(tokenizer, text, cfg.seq_len, cfg.streams, row_multiple)
        if not (rows[:, :, 2] != tokenizer.pad_id).any(axis=1).all():
            raise UserError(f"the training text ({len(text)} characters) is too short for "
                            f"--streams {cfg.streams}; lower --streams or give a longer corpus")
        return Batches(rows.reshape(-1), rows.shape[2], rows.shape[1], "stream", cfg.seed)
    if cfg.batch_size % row_multiple:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by {row_multiple} "
                        f"(data-parallel devices x --micro-batches {cfg.micro_batches})")
    if len(text) < cfg.tokens_per_sequence:
        raise UserError(f"the training text ({len(text)} characters) is shorter than one "
                        f"sequence ({cfg.tokens_per_sequence}); lower --seq-len or add text")
    return Batches(tokenizer.encode(text), cfg.tokens_per_sequence, cfg.batch_size, "random",
                   cfg.seed)


def eval_rows(tokenizer: CharTokenizer, text: str, cfg: TrainConfig) -> np.ndarray:
    """Every validation row once, (N, row_len): stream pieces, or for random batching all
    non-overlapping windows (each character is predicted exactly once)."""
    if cfg.batching == "stream":
        return stream_rows(tokenizer, text, cfg.seq_len, 1)[0]
    ids = tokenizer.encode(text)
    if len(ids) < cfg.tokens_per_sequence:
        raise UserError(f"the validation text ({len(text)} characters) is shorter than one "
                        f"sequence ({cfg.tokens_per_sequence}); lower --seq-len or "
                        "raise --val-fraction")
    # ceil: the last window holds the tail, padded (pad targets are ignored).
    n = -(-(len(ids) - 1) // cfg.seq_len)
    padded = np.full(n * cfg.seq_len + 1, tokenizer.pad_id, dtype=ids.dtype)
    padded[:len(ids)] = ids
    starts = np.arange(n) * cfg.seq_len
    return padded[starts[:, None] + np.arange(cfg.tokens_per_sequence)]


def pad_rows(rows: np.ndarray, multiple: int, pad_id: int) -> np.ndarray:
    """`rows` (N, S) with all-pad rows appended up to a multiple of `multiple`."""
    extra = -len(rows) % multiple
    return np.concatenate([rows, np.full((extra, rows.shape[1]), pad_id, rows.dtype)])
