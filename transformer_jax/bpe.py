"""Byte-level BPE tokenizers over Hugging Face `tokenizers`: GPT-2's, and one trained on a
corpus for a model from scratch (`--tokenizer bpe`).

Both encode any text (every byte is a token of the alphabet), so nothing is ever unknown, and
both pre-tokenize with GPT-2's pattern, so a text may be cut where `cut` says and its parts
encoded alone. `tokenizers` is imported when a tokenizer is first built, not with this module.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from transformer_jax.errors import UserError
from transformer_jax.tokenizer import smallest_uint

END_OF_TEXT = "<|endoftext|>"
SPECIALS = 4  # start, end, unknown, pad: after the trained vocabulary, as CharTokenizer's
MIN_VOCAB = 256 + SPECIALS  # the byte alphabet and the special symbols
# In reversed text, a whitespace character followed by a non-whitespace one (see `cut`).
_SPACE_AFTER_WORD_REVERSED = re.compile(r"\s(?=\S)")
_PIECE_CHARS = 1 << 13  # text encoded (or trained on) a piece at a time, cut where `cut` allows


class BPETokenizer:
    """GPT-2's byte-level BPE: any text to ids and back, losslessly; `<|endoftext|>` special.

    Speaks the character tokenizer's language where training and sampling need it: the start
    symbol is `<|endoftext|>`, no text is unknown, and the pad id lies just past the vocabulary
    (it only marks positions that are neither attended nor predicted).
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer  # a tokenizers.Tokenizer
        self._bytes = None  # each id's bytes, built on first use (see incremental_decoder)

    @classmethod
    def from_dir(cls, directory: str | Path) -> BPETokenizer:
        """From `tokenizer.json`, else from `vocab.json` + `merges.txt` set up as GPT-2's."""
        import tokenizers

        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            return cls(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")))
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise UserError(f"{directory} has no tokenizer: need tokenizer.json, or vocab.json "
                            "and merges.txt")
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
        _byte_level(tokenizer)
        if tokenizer.token_to_id(END_OF_TEXT) is not None:
            tokenizer.add_special_tokens([END_OF_TEXT])
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def start_id(self) -> int:
        eot = self._tokenizer.token_to_id(END_OF_TEXT)
        return self.vocab_size - 1 if eot is None else eot

    @property
    def end_id(self) -> int:
        return self.start_id  # <|endoftext|> separates documents: it ends one, starts the next

    @property
    def pad_id(self) -> int:
        return self.vocab_size

    @property
    def id_dtype(self) -> np.dtype:
        """Smallest unsigned integer type that holds every id, the pad included."""
        return smallest_uint(self.pad_id + 1)

    def _table(self) -> list[bytes]:
        """The bytes of each id, specials none (built once)."""
        if self._bytes is None:
            self._bytes = _token_bytes(self._tokenizer)
        return self._bytes

    def incremental_decoder(self):
        """`decode(ids, final=False)` of successive pieces of one sequence, special tokens
        dropped: a token may end inside a character's UTF-8 bytes, which are held back until
        the rest come (or, with `final`, shown as U+FFFD)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        table = self._table()
        return lambda ids, final=False: utf8.decode(b"".join(table[int(i)] for i in ids), final)

    def unknown_chars(self, text: str) -> list[str]:
        return []  # byte-level: every text has ids

    def cut(self, text: str) -> int:
        """Where `text` may be cut so that its two parts encode to the ids of the whole, however
        it continues (0: nowhere yet): before its last whitespace that follows a non-whitespace
        character. GPT-2's pre-tokenizer pattern ends every piece that is not whitespace there
        and looks neither back nor past a piece's end, so the pieces, and their BPE merges, are
        the same on both sides; `<|endoftext|>` holds no whitespace, so it is never cut."""
        found = _SPACE_AFTER_WORD_REVERSED.search(text[::-1])
        return len(text) - 1 - found.start() if found else 0

    def encode(self, text: str, add_start: bool = False) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.start_id] + ids if add_start else ids

    def decode(self, ids, skip_specials: bool = False) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_specials)

    def to_dict(self) -> dict:
        """What identifies the tokenizer (a pretrained one is read from its model's files)."""
        return {"kind": "pretrained", "tokenizer": self._tokenizer.to_str()}


class TrainedBPE(BPETokenizer):
    """A byte-level BPE trained on a corpus, for a model trained from scratch: the trained
    tokens (the 256 bytes first), then the four special symbols start, end, unknown and pad,
    laid out as `CharTokenizer` lays out its own after the characters.

    The special symbols live outside Hugging Face's tokenizer, so text never encodes to one,
    even text holding their characters (a character model reads those as unknown; here they
    are just bytes); `decode` shows them as their characters, chosen free of the corpus.
    """

    def __init__(self, tokenizer, specials: tuple[str, str, str, str]):
        super().__init__(tokenizer)
        self.start, self.end, self.unknown, self.pad = self.specials = specials

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int,
              specials: tuple[str, str, str, str]) -> TrainedBPE:
        """Merges learnt from `text` (a string, or the consecutive pieces of one, read once)
        until `vocab_size` tokens (specials included); a text that runs out of pairs to merge
        first is refused. No randomness: the same text and size give the same tokenizer."""
        import tokenizers

        if vocab_size < MIN_VOCAB:
            raise UserError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: it "
                            f"needs at least {MIN_VOCAB} (256 bytes and 4 special symbols)")
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        _byte_level(tokenizer)
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size - SPECIALS, show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        chunks = [text] if isinstance(text, str) else text
        tokenizer.train_from_iterator(_pieces(chunks), trainer=trainer)
        made = tokenizer.get_vocab_size() + SPECIALS
        if made < vocab_size:
            raise UserError(f"--vocab-size {vocab_size} is more than the training split "
                            f"supports: its pairs run out at {made} tokens; ask for {made} "
                            "or fewer")
        return cls(tokenizer, specials)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size() + SPECIALS

    @property
    def start_id(self) -> int:
        return self.vocab_size - SPECIALS

    @property
    def end_id(self) -> int:
        return self.start_id + 1

    @property
    def unknown_id(self) -> int:
        return self.start_id + 2

    @property
    def pad_id(self) -> int:
        return self.start_id + 3

    @property
    def id_dtype(self) -> np.dtype:
        return smallest_uint(self.vocab_size)

    def _table(self) -> list[bytes]:
        if self._bytes is None:
            self._bytes = _token_bytes(self._tokenizer) + [b""] * SPECIALS
        return self._bytes

    def encode(self, text: str, *, add_start: bool = False, add_end: bool = False
               ) -> np.ndarray:
        """Ids of `text` as `id_dtype`, encoded a piece at a time (in parallel, with the ids
        of the whole), after the start id and before the end id if asked."""
        pieces = self._tokenizer.encode_batch(list(_pieces([text])), add_special_tokens=False)
        ids = [np.asarray(p.ids, self.id_dtype) for p in pieces]
        head = [np.array([self.start_id], self.id_dtype)] if add_start else []
        tail = [np.array([self.end_id], self.id_dtype)] if add_end else []
        return np.concatenate([*head, *ids, *tail, np.zeros(0, self.id_dtype)])

    def decode(self, ids, skip_specials: bool = False) -> str:
        """Text of `ids`; special ids as their characters, or dropped with `skip_specials`."""
        table, first, out = self._table(), self.start_id, []
        for i in map(int, ids):
            if i >= first and not skip_specials:
                out.append(self.specials[i - first].encode("utf-8"))
            else:
                out.append(table[i])
        return b"".join(out).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "bpe", "tokenizer": self._tokenizer.to_str(), "start": self.start,
                "end": self.end, "unknown": self.unknown, "pad": self.pad}

    @classmethod
    def from_dict(cls, data: dict) -> TrainedBPE:
        import tokenizers

        return cls(tokenizers.Tokenizer.from_str(data["tokenizer"]),
                   (data["start"], data["end"], data["unknown"], data["pad"]))


def _byte_level(tokenizer) -> None:
    """GPT-2's pre-tokenizer (its pattern, no prefix space) and decoder on `tokenizer`."""
    import tokenizers

    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()


def _pieces(chunks: Iterable[str], size: int = _PIECE_CHARS) -> Iterator[str]:
    """The text `chunks` make, in consecutive pieces of about `size` characters, each cut where
    `BPETokenizer.cut` allows (a stretch without such a place runs on to the next one)."""
    carry, reach = "", size
    for chunk in chunks:
        carry += chunk
        while len(carry) > reach:
            found = _SPACE_AFTER_WORD_REVERSED.search(carry[1:reach][::-1])
            if not found:
                reach += size
                continue
            end = reach - 1 - found.start()  # before that whitespace character
            yield carry[:end]
            carry, reach = carry[end:], size
    if carry:
        yield carry


def _byte_symbols() -> dict[str, int]:
    """Byte-level BPE's alphabet: the character that stands for each byte in a token's text.
    Bytes that print as themselves (`!` to `~`, `¡` to `¬`, `®` to `ÿ`) keep their code
    point; the other 68 take the code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _token_bytes(tokenizer) -> list[bytes]:
    """The bytes each id of a byte-level BPE `tokenizers.Tokenizer` stands for (special
    tokens: none; a token outside the byte alphabet: its decoded text)."""
    symbols = _byte_symbols()
    table = [b""] * tokenizer.get_vocab_size()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token, i in tokenizer.get_vocab().items():
        if token in specials:
            continue
        if all(c in symbols for c in token):
            table[i] = bytes(symbols[c] for c in token)
        else:
            table[i] = tokenizer.decode([i]).encode("utf-8")
    return table
