"""Tests for transformer_jax.data: reading corpora, the split, both batchings, evaluation rows.

`stream_rows` is checked against an independent, loop-by-loop transcription of the lecture's
`createdata`; the tokenizer is replaced there by a hand-built character table.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from transformer_jax import data
from transformer_jax.config import TrainConfig
from transformer_jax.errors import UserError
from transformer_jax.tokenizer import CharTokenizer

LOREM = ("It was the best of times, it was the worst of times, it was the age of wisdom, it "
         "was the age of foolishness, it was the epoch of belief, it was the epoch of "
         "incredulity, it was the season of Light, it was the season of Darkness.\n")


# --- read_text ------------------------------------------------------------------------------


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(b"  \n\t\r\n   \n", id="whitespace-only"),
    pytest.param(b"abc\x00def\n", id="binary-with-NUL"),
    pytest.param(b"caf\xe9 au lait\n", id="latin-1-not-utf8"),
    pytest.param(b"ok\n\xff\xfe\xfd", id="invalid-utf8-bytes"),
])
def test_read_text_rejects_bad_file_with_user_error_naming_it(tmp_path, content):
    path = _write(tmp_path / "corpus.txt", content)
    with pytest.raises(UserError) as err:
        data.read_text(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_read_text_missing_file_raises_user_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(UserError, match="does not exist") as err:
        data.read_text(path)
    assert str(path) in str(err.value)


def test_read_text_returns_utf8_text_unchanged(tmp_path):
    text = "Ünïcödé — ‘quotes’, tabs\tand\r\nline ends 日本\n"
    path = _write(tmp_path / "u.txt", text.encode("utf-8"))
    assert data.read_text(path) == text
    assert data.read_text(str(path)) == text


def test_read_text_directory_joins_txt_files_in_name_order(tmp_path):
    for name, body in [("b.txt", "second"), ("c.txt", "third\n"), ("a.txt", "first"),
                       ("notes.md", "ignored"), ("z.dat", "ignored")]:
        (tmp_path / name).write_text(body, encoding="utf-8")
    assert data.read_text(tmp_path) == "first\n\nsecond\n\nthird\n"


def test_read_text_directory_without_txt_files_raises(tmp_path):
    (tmp_path / "x.md").write_text("text")
    with pytest.raises(UserError) as err:
        data.read_text(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_read_text_directory_names_the_bad_file(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    bad = _write(tmp_path / "b.txt", b"\xc3\x28")
    with pytest.raises(UserError) as err:
        data.read_text(tmp_path)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 1 << 20])
def test_iter_text_reads_in_pieces_what_read_text_reads_whole(tmp_path, chunk_bytes):
    """Pieces cut inside multi-byte characters still decode to the text, each piece at most
    `chunk_bytes` bytes of the file and the (at most 3) bytes of a character the piece before
    left unfinished (bounded memory)."""
    text = "Ünïcödé — 日本語, 🙂 emoji\r\nend\n" * 3
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    for path in (tmp_path / "a.txt", tmp_path):
        pieces = list(data.iter_text(path, chunk_bytes))
        assert "".join(pieces) == data.read_text(path)
        assert max(len(p.encode()) for p in pieces) <= chunk_bytes + 3


@pytest.mark.parametrize("content, needle", [
    (b"ok " * 100 + b"\x00", "binary"),
    (b"ok " * 100 + b"\xe6\x97", "ends inside a character"),
    (b"ok " * 100 + b"\xff ok", "byte 300"),
])
def test_iter_text_names_a_bad_byte_in_a_later_piece(tmp_path, content, needle):
    path = _write(tmp_path / "late.txt", content)
    with pytest.raises(UserError, match=needle) as err:
        list(data.iter_text(path, 64, what="--data"))
    assert str(err.value).startswith(f"--data {path}")


# --- split_text -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction", [(100, 0.1), (1000, 0.1), (10, 0.25), (7, 0.5),
                                         (999, 0.2), (3, 0.9)])
def test_split_text_holds_out_the_last_fraction(n, fraction):
    text = "".join(chr(65 + i % 26) + str(i % 7) for i in range(n))[:n]
    train, val = data.split_text(text, fraction)
    n_val = math.floor(n * Fraction(str(fraction)))
    assert train + val == text
    assert len(val) == n_val
    assert val == text[n - n_val:]


# --- the lecture's createdata ----------------------------------------------------------------


def reference_createdata(text: str, seq_len: int, streams: int, row_multiple: int = 1
                         ) -> np.ndarray:
    """The lecture's createdata, with plain loops and its own character table."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    start, end, pad = len(chars), len(chars) + 1, len(chars) + 3
    chunk = math.ceil(len(text) / streams)
    batches = []
    for c in range(streams):
        part = text[c * chunk:(c + 1) * chunk]
        rows = []
        for i in range(0, len(part), seq_len):
            row = [start] + [index[ch] for ch in part[i:i + seq_len]] + [end]
            row += [pad] * (seq_len + 2 - len(row))
            rows.append(row)
        batches.append(rows)
    count = max(len(rows) for rows in batches)
    count = math.ceil(count / row_multiple) * row_multiple
    for rows in batches:
        rows += [[pad] * (seq_len + 2) for _ in range(count - len(rows))]
    return np.array(batches)


@pytest.mark.parametrize("n, seq_len, streams, row_multiple", [
    (len(LOREM), 16, 3, 1),     # uneven last chunk
    (len(LOREM), 50, 1, 1),     # one stream, last piece short
    (240, 8, 10, 1),            # everything divides
    (241, 8, 10, 1),            # one character over: the last chunk is short
    (100, 500, 4, 1),           # pieces longer than the chunks (the lecture's seq_len 500)
    (len(LOREM), 7, 5, 4),      # rows rounded up to a multiple of 4 devices
    (97, 1, 3, 2),              # one character per piece
])
def test_stream_rows_matches_lecture_createdata(n, seq_len, streams, row_multiple):
    text = (LOREM * 3)[:n]
    tok = CharTokenizer.from_text(text)
    got = data.stream_rows(tok, text, seq_len, streams, row_multiple)
    want = reference_createdata(text, seq_len, streams, row_multiple)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_stream_rows_hold_every_character_once_in_order():
    text = LOREM[:173]
    tok = CharTokenizer.from_text(text)
    rows = data.stream_rows(tok, text, 12, 4)
    flat = rows.reshape(-1)
    body = flat[flat < len(tok.chars)]
    assert tok.decode(body) == text


# --- Batches.starts and gather --------------------------------------------------------------


@pytest.fixture
def random_batches() -> data.Batches:
    tok = CharTokenizer.from_text(LOREM)
    return data.train_batches(tok, LOREM, TrainConfig(seq_len=16, batch_size=6, seed=7))


def test_random_starts_are_deterministic_per_seed_and_step(random_batches):
    b = random_batches
    again = data.Batches(b.source, b.row_len, b.batch_size, "random", b.seed)
    for step in (0, 1, 5, 1234):
        np.testing.assert_array_equal(b.starts(step, 1), again.starts(step, 1))
        np.testing.assert_array_equal(b.starts(step, 1), b.starts(step, 1))
    other_seed = data.Batches(b.source, b.row_len, b.batch_size, "random", b.seed + 1)
    assert not np.array_equal(b.starts(0, 4), other_seed.starts(0, 4))


def test_random_starts_differ_across_steps(random_batches):
    starts = random_batches.starts(0, 20)
    assert len({tuple(row) for row in starts}) == 20


def test_random_starts_are_in_range_and_reach_both_ends():
    text = "abcdefghijkl"  # 12 characters, rows of 10 tokens: starts 0, 1, 2
    tok = CharTokenizer.from_text(text)
    b = data.train_batches(tok, text, TrainConfig(seq_len=9, batch_size=4, seed=0))
    starts = b.starts(0, 50)
    assert starts.shape == (50, 4) and starts.dtype == np.int32
    assert starts.min() >= 0 and starts.max() <= len(text) - b.row_len
    assert set(starts.ravel().tolist()) == {0, 1, 2}


def test_starts_for_n_steps_equal_stacked_single_steps(random_batches):
    for b in (random_batches, _stream_batches()):
        many = b.starts(3, 7)
        assert many.shape == (7, b.batch_size)
        np.testing.assert_array_equal(many, np.concatenate([b.starts(3 + i, 1)
                                                            for i in range(7)]))


def _stream_batches(streams: int = 4) -> data.Batches:
    tok = CharTokenizer.from_text(LOREM)
    return data.train_batches(tok, LOREM, TrainConfig(batching="stream", seq_len=10,
                                                      streams=streams))


def test_stream_step_k_covers_chunk_k_mod_streams():
    streams = 4
    b = _stream_batches(streams)
    tok = CharTokenizer.from_text(LOREM)
    rows = data.stream_rows(tok, LOREM, 10, streams)
    assert b.steps_per_epoch == streams
    assert b.batch_size == rows.shape[1] and b.row_len == 12
    for k in range(3 * streams + 1):
        got = np.asarray(data.gather(jnp.asarray(b.source), jnp.asarray(b.starts(k, 1)[0]),
                                     b.row_len))
        np.testing.assert_array_equal(got, rows[k % streams], err_msg=f"step {k}")


def test_gather_returns_source_slices():
    source = np.arange(100, 160, dtype=np.uint8)
    starts = np.array([[0, 5, 53], [10, 40, 1]], dtype=np.int32)
    got = np.asarray(data.gather(jnp.asarray(source), jnp.asarray(starts), 7))
    assert got.shape == (2, 3, 7) and got.dtype == np.uint8
    for i in range(2):
        for j in range(3):
            s = starts[i, j]
            np.testing.assert_array_equal(got[i, j], source[s:s + 7])


def test_random_rows_are_the_text_windows(random_batches):
    b = random_batches
    tok = CharTokenizer.from_text(LOREM)
    starts = b.starts(11, 1)[0]
    rows = np.asarray(data.gather(jnp.asarray(b.source), jnp.asarray(starts), b.row_len))
    assert [tok.decode(r) for r in rows] == [LOREM[s:s + 17] for s in starts]


# --- eval_rows ------------------------------------------------------------------------------


def _distinct_text(n: int) -> str:
    """n distinct characters: each id names its position in the text."""
    return "".join(chr(0x100 + i) for i in range(n))


@pytest.mark.parametrize("n, seq_len", [
    (49, 8),   # 48 targets: six full windows
    (9, 8),    # exactly one window
    (50, 8),   # one target past the last full window
    (60, 8),   # seven targets past it
    (100, 16),
])
def test_eval_rows_random_targets_every_character_after_the_first_exactly_once(n, seq_len):
    """Non-overlapping windows: each character but the first (nothing precedes it) is a
    target exactly once, the tail after the last full window included."""
    text = _distinct_text(n)
    tok = CharTokenizer.from_text(text)
    rows = data.eval_rows(tok, text, TrainConfig(seq_len=seq_len))
    assert rows.shape[1] == seq_len + 1
    targets = rows[:, 1:].ravel()
    targets = targets[targets != tok.pad_id].tolist()
    assert sorted(targets) == list(range(1, n)), "each position 1..n-1 exactly once"
    # Consecutive windows share one token: the last input of one is the first of the next.
    np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])
    # Inputs are the text itself (in order), never a skip.
    assert all(rows[i, 0] == i * seq_len for i in range(len(rows)))


def test_eval_rows_stream_targets_every_character_once_plus_piece_ends():
    text = LOREM[:101]
    tok = CharTokenizer.from_text(text)
    rows = data.eval_rows(tok, text, TrainConfig(batching="stream", seq_len=16))
    np.testing.assert_array_equal(rows, reference_createdata(text, 16, 1)[0])
    targets = rows[:, 1:]
    assert (targets == tok.end_id).sum() == len(rows) == 7
    body = targets[targets < len(tok.chars)]
    assert tok.decode(body) == text


def test_eval_rows_too_short_validation_text_raises():
    with pytest.raises(UserError, match="--val-fraction"):
        text = "abcd"
        data.eval_rows(CharTokenizer.from_text(text), text, TrainConfig(seq_len=8))


# --- train_batches errors -------------------------------------------------------------------


def test_corpus_shorter_than_one_sequence_raises_user_error():
    text = "x" * 16
    tok = CharTokenizer.from_text(text)
    with pytest.raises(UserError, match="--seq-len"):
        data.train_batches(tok, text, TrainConfig(seq_len=16, batch_size=2))
    # One character more holds exactly one window: fine, and every start is 0.
    text = "x" * 17
    b = data.train_batches(tok, text, TrainConfig(seq_len=16, batch_size=2))
    assert (b.starts(0, 3) == 0).all()


def test_batch_size_not_divisible_by_devices_raises_user_error():
    tok = CharTokenizer.from_text(LOREM)
    with pytest.raises(UserError, match="--batch-size 6"):
        data.train_batches(tok, LOREM, TrainConfig(seq_len=8, batch_size=6), row_multiple=4)
    b = data.train_batches(tok, LOREM, TrainConfig(seq_len=8, batch_size=8), row_multiple=4)
    assert b.batch_size == 8


def test_stream_text_too_short_for_streams_raises_user_error():
    text = "abc"
    with pytest.raises(UserError, match="--streams"):
        data.train_batches(CharTokenizer.from_text(text), text,
                           TrainConfig(batching="stream", seq_len=4, streams=5))


# --- documents (--split-docs): the lecture's createbatch ----------------------------------------


def test_split_documents_takes_a_group_or_the_text_between_matches():
    text = "head<body>one\ntwo</body>mid<body>three</body><body> </body>tail"
    assert data.split_documents(text, "<body>(.*?)</body>") == ["one\ntwo", "three"]
    assert data.split_documents(text, "</?body>") == ["head", "one\ntwo", "mid", "three", "tail"]


def test_document_source_lays_documents_out_with_pad_gaps():
    docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    source, spans = data.document_source(docs, pad_id=9, row_len=3)
    assert source.tolist() == [1, 2, 3, 9, 9, 4, 9, 9, 5, 6, 9, 9]
    assert spans.tolist() == [[0, 3], [5, 1], [8, 2]]


def test_document_rows_lie_in_one_document_with_the_lecture_length():
    """Each row is min(seq_len + 1, L) tokens of one document (at a random start), then pads:
    inputs of length min(context, L - 1), as the lecture's createbatch draws them."""
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwx|")
    text = "|".join(["abcdefghij", "klm", "n", "opqrstuv", "wx"])
    cfg = TrainConfig(seq_len=4, batch_size=64, split_docs=r"\|", min_len=2)
    b = data.train_batches(tok, text, cfg)
    assert b.docs[:, 1].tolist() == [10, 3, 8, 2]  # "n" is shorter than --min-len
    rows = np.asarray(data.gather(jnp.asarray(b.source), jnp.asarray(b.starts(0, 8)), b.row_len))
    docs = ["abcdefghij", "klm", "opqrstuv", "wx"]
    seen = set()
    for row in rows.reshape(-1, b.row_len):
        chars = tok.decode(row[row != tok.pad_id])
        assert (row[:len(chars)] != tok.pad_id).all()  # real tokens first, pads after
        doc = next(d for d in docs if chars in d)
        assert len(chars) == min(cfg.seq_len + 1, len(doc))
        seen.add(doc)
    assert seen == set(docs)


def test_no_document_long_enough_is_a_user_error():
    tok = CharTokenizer.from_text("ab|")
    with pytest.raises(UserError, match="--min-len 5"):
        data.train_batches(tok, "ab|ab", TrainConfig(seq_len=4, split_docs=r"\|", min_len=5))


def test_document_eval_rows_target_every_token_after_each_documents_first_once():
    tok = CharTokenizer.from_text("abcdefg|")
    cfg = TrainConfig(seq_len=3, split_docs=r"\|")
    rows = data.eval_rows(tok, "abcdefg|abc|abcde", cfg)
    targets = rows[:, 1:][rows[:, 1:] != tok.pad_id]
    assert tok.decode(targets) == "bcdefg" + "bc" + "bcde"


def test_pad_rows_appends_all_pad_rows_to_a_multiple():
    rows = np.arange(15, dtype=np.uint8).reshape(5, 3)
    padded = data.pad_rows(rows, 4, 99)
    assert padded.shape == (8, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:5], rows)
    assert (padded[5:] == 99).all()
    assert data.pad_rows(rows, 5, 99).shape == (5, 3)


# --- property: any small corpus either batches cleanly or fails with a UserError -------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3000), seq_len=st.integers(1, 64), batch_size=st.integers(1, 8),
       streams=st.integers(1, 5), batching=st.sampled_from(["random", "stream"]),
       row_multiple=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_train_batches_give_full_in_range_rows_or_a_user_error(
        n, seq_len, batch_size, streams, batching, row_multiple, seed):
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefgh ij\nKLM.,;é"))
    text = "".join(rng.choice(alphabet, size=n))
    tok = CharTokenizer.from_text(text)
    cfg = TrainConfig(batching=batching, seq_len=seq_len, batch_size=batch_size,
                      streams=streams, seed=seed)
    try:
        b = data.train_batches(tok, text, cfg, row_multiple=row_multiple)
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message and "--" in message
        return
    assert b.row_len == cfg.tokens_per_sequence
    assert b.batch_size % row_multiple == 0
    starts = b.starts(seed % 97, 3)
    assert starts.shape == (3, b.batch_size)
    assert starts.min() >= 0 and starts.max() + b.row_len <= len(b.source)
    rows = np.asarray(data.gather(jnp.asarray(b.source), jnp.asarray(starts), b.row_len))
    assert rows.shape == (3, b.batch_size, b.row_len)
    assert rows.min() >= 0 and rows.max() < tok.vocab_size
    if batching == "random":
        assert (rows < len(tok.chars)).all()  # raw text windows: no specials
    else:
        real = rows[..., 0] != tok.pad_id  # non-pad rows: start, text, end, padding
        assert (rows[..., 0][real] == tok.start_id).all()
        assert ((rows == tok.end_id).sum(-1) == real).all()
        assert real.any(axis=-1).all()  # every batch has text to learn from
