"""Character vocabulary with start, end, unknown and pad symbols (the lecture's text encoder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_SPECIALS = ("α", "Ω", "Ξ", "δ")  # start, end, unknown, pad: the lecture's symbols


@dataclass(frozen=True)
class CharTokenizer:
    """Maps characters to ids: the corpus's sorted distinct characters, then the four specials.

    Ids depend only on the set of characters, so the same corpus always gives the same ids.
    Encoding is vectorised (numpy over code points), so large corpora encode at memory speed.
    """

    chars: tuple[str, ...]
    start: str = DEFAULT_SPECIALS[0]
    end: str = DEFAULT_SPECIALS[1]
    unknown: str = DEFAULT_SPECIALS[2]
    pad: str = DEFAULT_SPECIALS[3]

    def __post_init__(self) -> None:
        specials = self.specials
        if any(len(s) != 1 for s in specials) or len(set(specials)) != 4:
            raise ValueError(f"special symbols {specials} must be four distinct single characters")
        clash = sorted(set(specials) & set(self.chars))
        if clash:
            raise ValueError(
                f"the corpus contains the special symbol(s) {', '.join(map(repr, clash))}; "
                "choose other start/end/unknown/pad symbols")
        if list(self.chars) != sorted(set(self.chars)) or any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be sorted, distinct single characters")
        # Dense code point -> id table; anything else (specials included) is unknown.
        points = np.array([ord(c) for c in self.chars], dtype=np.int64)
        table = np.full(int(points.max(initial=0)) + 2, self.unknown_id, dtype=self.id_dtype)
        table[points] = np.arange(len(self.chars))
        object.__setattr__(self, "_table", table)

    @classmethod
    def from_text(cls, text: str, specials: tuple[str, str, str, str] = DEFAULT_SPECIALS
                  ) -> CharTokenizer:
        """Vocabulary of `text`'s distinct characters plus `specials` (start, end, unknown, pad)."""
        return cls(tuple(distinct_chars(text)), *specials)

    @property
    def specials(self) -> tuple[str, str, str, str]:
        return (self.start, self.end, self.unknown, self.pad)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 4

    @property
    def start_id(self) -> int:
        return len(self.chars)

    @property
    def end_id(self) -> int:
        return len(self.chars) + 1

    @property
    def unknown_id(self) -> int:
        return len(self.chars) + 2

    @property
    def pad_id(self) -> int:
        return len(self.chars) + 3

    @property
    def id_dtype(self) -> np.dtype:
        """Smallest unsigned integer type that holds every id."""
        return smallest_uint(self.vocab_size)

    def encode(self, text: str, *, add_start: bool = False, add_end: bool = False) -> np.ndarray:
        """Ids of `text`, shape (len(text) + add_start + add_end,), dtype `id_dtype`.

        A character outside the vocabulary maps to the unknown id; so does a special symbol
        typed in the text, which is a character, not the symbol.
        """
        ids = np.empty(len(text) + add_start + add_end, dtype=self.id_dtype)
        if add_start:
            ids[0] = self.start_id
        if add_end:
            ids[-1] = self.end_id
        done = int(add_start)
        for points in _code_point_chunks(text):
            # The table's last slot is unknown: clipping sends every larger code point there.
            ids[done:done + len(points)] = self._table[np.minimum(points, len(self._table) - 1)]
            done += len(points)
        return ids

    def decode(self, ids, *, skip_specials: bool = False) -> str:
        """Text of a sequence of ids; specials are dropped when `skip_specials`."""
        symbols = self.chars + self.specials
        return "".join(symbols[i] for i in map(int, ids)
                       if not (skip_specials and i >= len(self.chars)))

    def incremental_decoder(self):
        """`decode(ids, final=False)` of successive pieces of one sequence, specials dropped
        (every id is a whole character, so nothing is ever held back)."""
        return lambda ids, final=False: self.decode(ids, skip_specials=True)

    def cut(self, text: str) -> int:
        """Where `text` may be cut so that its two parts encode to the ids of the whole, however
        it continues: anywhere, for characters (the end)."""
        return len(text)

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of `text` that the vocabulary lacks, sorted."""
        return sorted(set(text) - set(self.chars))

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars), "start": self.start, "end": self.end,
                "unknown": self.unknown, "pad": self.pad}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        return cls(tuple(data["chars"]), data["start"], data["end"], data["unknown"], data["pad"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def distinct_chars(text: str) -> str:
    """The distinct characters of `text`, sorted (numpy over its code points)."""
    seen = np.zeros(0x110000, dtype=bool)
    for points in _code_point_chunks(text):
        seen[points] = True
    return "".join(map(chr, np.flatnonzero(seen)))


def smallest_uint(n: int) -> np.dtype:
    """The smallest unsigned integer type that holds 0 .. n - 1."""
    return np.dtype(np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.uint32)


def free_specials(text: str, preferred: tuple[str, str, str, str] = DEFAULT_SPECIALS
                  ) -> tuple[str, str, str, str]:
    """`preferred`, with each symbol that occurs in `text` (α and δ in Greek, say) swapped for
    an unused character of Unicode's private use area, which no real text needs."""
    used = set(text)
    spare = (chr(p) for p in range(0xE000, 0xF900) if chr(p) not in used)
    return tuple(s if s not in used else next(spare) for s in preferred)


def _code_point_chunks(text: str, chunk: int = 1 << 22):
    """Unicode code points of `text` as uint32 arrays of at most `chunk` characters.

    Chunks bound the temporary memory; numpy does the per-character work.
    """
    for i in range(0, len(text), chunk):
        # surrogatepass: prompts from argv may hold lone surrogates (undecodable bytes).
        part = text[i:i + chunk].encode("utf-32-le", "surrogatepass")
        yield np.frombuffer(part, dtype=np.uint32)
