"""transformer_jax.bpe: the byte-level BPE trained for a model from scratch.

References: Hugging Face `tokenizers`' own encoding of the whole text (our piecewise encoding
must equal it), exact round trips of arbitrary Unicode, and the layout of CharTokenizer's ids
(the four special symbols after the vocabulary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transformer_jax import bpe
from transformer_jax.bpe import MIN_VOCAB, TrainedBPE
from transformer_jax.errors import UserError
from transformer_jax.tokenizer import DEFAULT_SPECIALS

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
# Words of random syllables: pairs enough for a few hundred merges.
_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "he", "wu", "sel", "dor", "an",
              "ith", "gre", "vo", ",", ".", "!"]
_RNG = np.random.default_rng(0)
TEXT = " ".join("".join(_RNG.choice(_SYLLABLES, _RNG.integers(1, 4))) for _ in range(8000)) + "\n"


@pytest.fixture(scope="module")
def tok() -> TrainedBPE:
    return TrainedBPE.train(TEXT, 400, DEFAULT_SPECIALS)


def test_the_vocabulary_is_the_size_asked_with_the_specials_last(tok):
    assert tok.vocab_size == 400 and tok.id_dtype == np.uint16
    assert (tok.start_id, tok.end_id, tok.unknown_id, tok.pad_id) == (396, 397, 398, 399)
    ids = tok.encode("Speak, speak.", add_start=True, add_end=True)
    assert ids[0] == tok.start_id and ids[-1] == tok.end_id and ids.dtype == np.uint16
    assert tok.decode(ids) == "αSpeak, speak.Ω"
    assert tok.decode(ids, skip_specials=True) == "Speak, speak."
    assert len(ids) < len("Speak, speak.") + 2  # merges learnt: fewer tokens than bytes


def test_training_is_deterministic_and_survives_the_checkpoint_metadata(tok):
    again = TrainedBPE.train(TEXT, 400, DEFAULT_SPECIALS)
    assert again.to_dict() == tok.to_dict()
    loaded = TrainedBPE.from_dict(tok.to_dict())
    assert loaded.specials == tok.specials and loaded.vocab_size == tok.vocab_size
    assert np.array_equal(loaded.encode(TEXT[:500]), tok.encode(TEXT[:500]))


def test_a_size_the_text_cannot_reach_and_a_tiny_size_are_refused():
    with pytest.raises(UserError, match="--vocab-size 1000 is more than .* run out at 262 "):
        TrainedBPE.train("abab", 1000, DEFAULT_SPECIALS)
    assert TrainedBPE.train("abab", 262, DEFAULT_SPECIALS).vocab_size == 262
    with pytest.raises(UserError, match=f"--vocab-size 100 is too small.*at least {MIN_VOCAB}"):
        TrainedBPE.train(TEXT, 100, DEFAULT_SPECIALS)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_any_text_round_trips_and_never_encodes_to_a_special(tok, text):
    """Bytes are the alphabet: emoji, lone specials' characters, NUL all encode; the special
    symbols' characters typed in a text are text."""
    text = text + "αΩΞδ"
    ids = tok.encode(text)
    assert ids.max(initial=0) < tok.start_id
    assert tok.decode(ids) == text and tok.unknown_chars(text) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", " ", "  ", "\n", "é", "🙂", "ab", "'s"]),
                max_size=60), st.integers(1, 12))
def test_pieces_join_to_the_text_and_encode_as_the_whole(tok, parts, size):
    """Our encoding, piece by piece in parallel, equals `tokenizers`' encoding of the whole;
    the pieces do not depend on how the text arrives (here: in `parts`)."""
    text = "".join(parts)
    pieces = list(bpe._pieces([text], size))
    assert "".join(pieces) == text and all(pieces)
    assert list(bpe._pieces(parts, size)) == pieces
    whole = tok._tokenizer.encode(text, add_special_tokens=False).ids
    assert [i for p in pieces for i in tok._tokenizer.encode(p, add_special_tokens=False).ids] \
        == whole
    assert tok.encode(text).tolist() == whole


def test_a_long_text_encodes_as_the_whole(tok):
    text = TEXT * 8  # several of the pieces encoded in parallel
    assert len(text) > 2 * bpe._PIECE_CHARS
    assert tok.encode(text).tolist() == tok._tokenizer.encode(text).ids


def test_the_incremental_decoder_holds_back_a_split_character(tok):
    ids = tok.encode("héllo 🙂!").tolist()
    decode = tok.incremental_decoder()
    shown = "".join(decode([i]) for i in ids) + decode([], final=True)
    assert shown == "héllo 🙂!"
    assert decode([tok.start_id, tok.pad_id]) == ""  # specials are dropped


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data")
def test_on_shakespeare_a_larger_vocabulary_gives_fewer_tokens():
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    counts = [len(TrainedBPE.train(text, n, DEFAULT_SPECIALS).encode(text)) for n in (300, 1000)]
    assert counts[0] > counts[1] and counts[0] < len(text)
