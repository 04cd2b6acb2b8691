"""transformer_jax.tokens: a corpus read in pieces gives what the text read whole gives, and its
token file holds the ids of the whole, is reused, and is rebuilt when it does not match."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transformer_jax import data, tokens
from transformer_jax.bpe import TrainedBPE
from transformer_jax.config import TrainConfig
from transformer_jax.errors import UserError
from transformer_jax.tokenizer import DEFAULT_SPECIALS, CharTokenizer
from transformer_jax.tokens import Corpus

TEXT = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May, — été 🙂\n") * 40


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    """A corpus of three files, read 64 bytes at a time (so in many pieces, some cut inside a
    character's UTF-8 bytes), with the cache in the test's own directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tokens, "PIECE_BYTES", 64)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, part in enumerate((TEXT[:1000], TEXT[1000:1001], TEXT[1001:])):
        (folder / f"{i}.txt").write_text(part, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bpe():
    return TrainedBPE.train(TEXT, 300, DEFAULT_SPECIALS)


def test_a_corpus_read_in_pieces_is_the_text_read_whole(corpus_dir):
    text = data.read_text(corpus_dir)
    scanned, whole = Corpus.scan(corpus_dir), Corpus.of_text(text)
    assert (scanned.chars, scanned.sha256, scanned.charset) == \
        (whole.chars, whole.sha256, whole.charset)
    assert scanned.record()["path"] == str(corpus_dir.absolute())
    assert scanned.read() == text
    for start, stop in ((0, len(text)), (5, 6), (990, 1003), (1002, len(text) - 1)):
        assert "".join(scanned.pieces(start, stop)) == text[start:stop]
    assert scanned.split(0.1) == len(data.split_text(text, 0.1)[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(TEXT)), max_size=8))
def test_pieces_encode_to_the_ids_of_the_whole(bpe, cuts):
    """However the text arrives, `encode_pieces` gives the ids of the whole, for both kinds."""
    bounds = [0, *sorted(cuts), len(TEXT)]
    pieces = [TEXT[a:b] for a, b in zip(bounds, bounds[1:])]
    for tok in (bpe, CharTokenizer.from_text(TEXT)):
        got = np.concatenate([np.zeros(0, tok.id_dtype), *tokens.encode_pieces(tok, pieces)])
        assert got.dtype == tok.id_dtype
        assert np.array_equal(got, tok.encode(TEXT))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_token_file_holds_each_splits_ids_and_is_reused(corpus_dir, bpe, kind):
    tok = CharTokenizer.from_text(TEXT) if kind == "char" else bpe
    said = []
    train, val = tokens.token_ids(Corpus.scan(corpus_dir), tok, 0.25, say=said.append)
    expected = [tok.encode(t) for t in data.split_text(data.read_text(corpus_dir), 0.25)]
    assert np.array_equal(train, expected[0]) and np.array_equal(val, expected[1])
    assert train.dtype == tok.id_dtype and not train.flags.writeable  # a read-only map
    assert len(said) == 1 and "encoding the corpus once" in said[0]
    files = sorted(tokens.cache_dir().iterdir())
    assert [f.suffix for f in files] == [".ids", ".json"]
    assert files[0].stat().st_size == (len(train) + len(val)) * tok.id_dtype.itemsize
    said.clear()
    again = tokens.token_ids(Corpus.scan(corpus_dir), tok, 0.25, say=said.append)
    assert said == [] and np.array_equal(again[0], train)
    assert tokens.mapping(train) is tokens.mapping(val) is not None
    assert tokens.mapping(expected[0]) is None
    starts = np.array([[0, 5, len(val) - 7], [3, 3, 1]])
    for ids, whole in ((train, expected[0]), (val, expected[1])):
        got = tokens.rows(ids, starts, 7)  # read, each row's pages let go, read again
        assert np.array_equal(got, whole[starts[..., None] + np.arange(7)])
        assert np.array_equal(tokens.rows(ids, starts, 7), got)
    assert np.array_equal(train, expected[0])


def test_each_corpus_tokenizer_and_split_has_its_own_file(corpus_dir, bpe):
    corpus = Corpus.scan(corpus_dir)
    tokens.token_ids(corpus, bpe, 0.1, say=lambda *a: 0)
    tokens.token_ids(corpus, bpe, 0.2, say=lambda *a: 0)
    tokens.token_ids(corpus, CharTokenizer.from_text(TEXT), 0.1, say=lambda *a: 0)
    (corpus_dir / "3.txt").write_text("more", encoding="utf-8")
    tokens.token_ids(Corpus.scan(corpus_dir), bpe, 0.1, say=lambda *a: 0)
    assert len(list(tokens.cache_dir().glob("*.ids"))) == 4


@pytest.mark.parametrize("damage,why", [
    ("truncate", "holds .* bytes, not"),
    ("other key", "made for another corpus or tokenizer"),
    ("bad record", "unreadable"),
])
def test_a_token_file_that_does_not_match_is_rebuilt_and_said_so(corpus_dir, bpe, damage, why):
    corpus = Corpus.scan(corpus_dir)
    train, _ = tokens.token_ids(corpus, bpe, 0.1, say=lambda *a: 0)
    expected = np.array(train)
    ids = next(tokens.cache_dir().glob("*.ids"))
    meta = ids.with_suffix(".json")
    if damage == "truncate":
        ids.write_bytes(ids.read_bytes()[:-3])
    elif damage == "other key":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "0" * 64}))
    else:
        meta.write_text("{")
    said = []
    again, _ = tokens.token_ids(corpus, bpe, 0.1, say=said.append)
    assert np.array_equal(again, expected)
    assert len(said) == 2 and str(ids) in said[0], said
    assert re.search(why, said[0]) and "encoding the corpus again" in said[0]


def test_random_windows_read_the_token_file_and_the_lectures_pieces_the_text(corpus_dir):
    corpus, tok = Corpus.scan(corpus_dir), CharTokenizer.from_text(TEXT)
    cfg = TrainConfig(seq_len=16, batch_size=4)
    batches, val = tokens.datasets(tok, corpus, cfg, 2, say=lambda *a: 0)
    whole_batches, whole_val = data.datasets(tok, data.read_text(corpus_dir), cfg, 2)
    assert np.array_equal(batches.source, whole_batches.source) and np.array_equal(val, whole_val)
    assert not batches.source.flags.writeable  # the token file's map
    stream = TrainConfig(batching="stream", seq_len=16, streams=2)
    batches, val = tokens.datasets(tok, corpus, stream, 1, say=lambda *a: 0)
    whole_batches, whole_val = data.datasets(tok, data.read_text(corpus_dir), stream, 1)
    assert np.array_equal(batches.source, whole_batches.source) and np.array_equal(val, whole_val)
    assert len(list(tokens.cache_dir().glob("*.ids"))) == 1  # the windows' only


def test_an_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        Corpus.scan(tmp_path / "empty.txt")
