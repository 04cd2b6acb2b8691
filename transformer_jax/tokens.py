"""A corpus read a piece at a time, and encoded once into a memory-mapped token file.

A `Corpus` is a text held in memory or a file (or directory) that is only ever read in pieces:
one pass counts, hashes and collects its characters, later passes feed tokenizer training and
encoding, so no pass holds the whole text. `token_ids` encodes its training and validation
splits into one file in the cache, `<cache>/tokens/<key>.ids` (the ids as the smallest
unsigned type that holds the vocabulary) beside `<key>.json`, the key hashing the corpus's
content, the tokenizer and the split: later runs on the same corpus map the file instead of
encoding again, and a file that does not match its record is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transformer_jax import data
from transformer_jax.config import TrainConfig
from transformer_jax.corpus import user_cache_dir
from transformer_jax.errors import UserError
from transformer_jax.tokenizer import distinct_chars

FORMAT = 1  # of the token files' record: a file of another format is rebuilt
PIECE_BYTES = 1 << 22  # a corpus on disk is read this much at a time


@dataclass(frozen=True)
class Corpus:
    """A text to train on: `chars` characters, the sha256 of its UTF-8 bytes, and its distinct
    characters (`charset`, sorted); read from `path` in pieces, or held whole as `text`."""

    chars: int
    sha256: str
    charset: str
    path: Path | None = None
    text: str | None = None

    @classmethod
    def of_text(cls, text: str) -> Corpus:
        """A text already in memory (nothing is cached for it)."""
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return cls(len(text), digest, distinct_chars(text), text=text)

    @classmethod
    def scan(cls, path: str | Path) -> Corpus:
        """A file or directory of text (see `data.iter_text`), read once in pieces: an empty
        one, or one that is not UTF-8 text, is refused."""
        digest, chars, seen = hashlib.sha256(), 0, set()
        for piece in data.iter_text(path, PIECE_BYTES):
            digest.update(piece.encode("utf-8", "surrogatepass"))
            chars += len(piece)
            seen.update(distinct_chars(piece))
        if not seen or "".join(seen).isspace():
            raise UserError(f"corpus {path} is empty; give a file with some text")
        return cls(chars, digest.hexdigest(), "".join(sorted(seen)), path=Path(path))

    def pieces(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """Characters [start, stop) of the text, in consecutive pieces."""
        stop = self.chars if stop is None else stop
        if self.text is not None:
            yield self.text[start:stop]
            return
        done = 0
        for piece in data.iter_text(self.path, PIECE_BYTES):
            lo, hi = max(start - done, 0), min(stop - done, len(piece))
            if lo < hi:
                yield piece[lo:hi]
            done += len(piece)
            if done >= stop:
                return

    def read(self) -> str:
        """The whole text, in memory."""
        return self.text if self.text is not None else "".join(self.pieces())

    def split(self, val_fraction: float) -> int:
        """Where the validation split starts (`data.split_text`'s cut)."""
        return data.split_point(self.chars, val_fraction)

    def record(self) -> dict:
        """What a run records of its corpus: the file's absolute path, the text's length and
        sha256 (a changed file then no longer passes for the same split)."""
        return {"path": str(self.path.absolute()) if self.path else None, "chars": self.chars,
                "sha256": self.sha256}


def encode_pieces(tokenizer, pieces: Iterable[str]) -> Iterator[np.ndarray]:
    """The ids of the text `pieces` make, a piece at a time, equal to the ids of the whole:
    each piece is encoded up to where `tokenizer.cut` allows and the rest carried over."""
    carry = ""
    for piece in pieces:
        carry += piece
        cut = tokenizer.cut(carry)
        if cut:
            yield np.asarray(tokenizer.encode(carry[:cut]), tokenizer.id_dtype)
            carry = carry[cut:]
    if carry:
        yield np.asarray(tokenizer.encode(carry), tokenizer.id_dtype)


def token_ids(corpus: Corpus, tokenizer, val_fraction: float, *, say=print
              ) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, validation ids) of `corpus`: encoded in memory for a text, else mapped
    from the corpus's token file in the cache (written first if missing or unsound)."""
    cut = corpus.split(val_fraction)
    if corpus.text is not None:
        return tuple(np.asarray(tokenizer.encode(t), tokenizer.id_dtype)
                     for t in data.split_text(corpus.text, val_fraction))
    key = _key(corpus, tokenizer, val_fraction)
    path = cache_dir() / f"{key[:40]}.ids"
    record = _record_of(path, key, say)
    if record is None:
        record = _write(path, key, corpus, tokenizer, cut, say)
    ids = np.frombuffer(_map(path), np.dtype(record["dtype"]))
    return ids[:record["train"]], ids[record["train"]:]


def datasets(tokenizer, corpus: Corpus, cfg: TrainConfig, n_dev: int, *, say=print
             ) -> tuple[data.Batches, np.ndarray]:
    """`data.datasets` of `corpus`: random windows over the whole text read its token ids
    (`token_ids`: a token file for a corpus on disk); the lecture's pieces and documents
    (--batching stream, --split-docs) are cut from the text itself, read whole."""
    if cfg.batching == "random" and cfg.split_docs is None:
        train, val = token_ids(corpus, tokenizer, cfg.val_fraction, say=say)
        return data.window_datasets(train, val, tokenizer.pad_id, cfg, n_dev)
    return data.datasets(tokenizer, corpus.read(), cfg, n_dev)


def cache_dir() -> Path:
    """Where token files live: `tokens/` in the user cache directory."""
    return user_cache_dir() / "tokens"


def rows(ids: np.ndarray, starts: np.ndarray, row_len: int) -> np.ndarray:
    """ids[s : s + row_len] for every start: (...,) -> (..., row_len). From a token file's
    map, a row at a time, each row's pages let go once read (they stay in the system's file
    cache): a process reading all over a large file keeps only the row it reads, though the
    kernel may map a large block of the file around each."""
    mapped = mapping(ids)
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return ids[starts[..., None] + np.arange(row_len)]
    out = np.empty((starts.size, row_len), ids.dtype)
    size, page = ids.itemsize, mmap.PAGESIZE
    offset = ids.ctypes.data - np.frombuffer(mapped, np.uint8).ctypes.data  # of ids in the map
    for i, start in enumerate(starts.reshape(-1).tolist()):
        out[i] = ids[start:start + row_len]
        lo = (offset + start * size) // page * page
        mapped.madvise(mmap.MADV_DONTNEED, lo, offset + (start + row_len) * size - lo)
    return out.reshape(*starts.shape, row_len)


def mapping(ids: np.ndarray) -> mmap.mmap | None:
    """The token file's map that `ids` views, if it views one."""
    base = ids
    while isinstance(base, np.ndarray):
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base
    return base if isinstance(base, mmap.mmap) else None


def _key(corpus: Corpus, tokenizer, val_fraction: float) -> str:
    """A token file's key: the corpus's content, the tokenizer and the split."""
    facts = {"format": FORMAT, "corpus": corpus.sha256, "chars": corpus.chars,
             "tokenizer": tokenizer.to_dict(), "val_fraction": val_fraction}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _record_of(path: Path, key: str, say) -> dict | None:
    """The record of the token file at `path` if the file is whole and made for `key`; else
    None, having said why it is rebuilt (nothing said for a file never written)."""
    meta = path.with_suffix(".json")
    if not meta.exists():
        return None
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        size = (record["train"] + record["val"]) * np.dtype(record["dtype"]).itemsize
        why = ("it was made for another corpus or tokenizer" if record["key"] != key else
               f"it holds {path.stat().st_size:,} bytes, not {size:,}"
               if not path.exists() or path.stat().st_size != size else None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"its record {meta} is unreadable ({e})"
    if why is None:
        return record
    say(f"token file {path}: {why}; encoding the corpus again")
    return None


def _write(path: Path, key: str, corpus: Corpus, tokenizer, cut: int, say) -> dict:
    """Encode `corpus` into `path` (through a temporary file, renamed when complete), then its
    record beside it; returns the record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    say(f"encoding the corpus once into {path} (reused by later runs)")
    counts = []
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for start, stop in ((0, cut), (cut, corpus.chars)):
                n = 0
                for ids in encode_pieces(tokenizer, corpus.pieces(start, stop)):
                    f.write(ids.tobytes())
                    n += len(ids)
                counts.append(n)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"key": key, "dtype": np.dtype(tokenizer.id_dtype).name, "train": counts[0],
              "val": counts[1], "corpus": corpus.record()}
    meta_tmp = path.with_name(f".{path.stem}.{os.getpid()}.json.tmp")
    meta_tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(meta_tmp, path.with_suffix(".json"))
    return record


def _map(path: Path) -> mmap.mmap:
    """`path` (never empty: a corpus has at least one token) mapped read-only, for reads at
    random places: no read-ahead, which on some kernels maps megabytes around every row."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return mapped
