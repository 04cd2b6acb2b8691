"""Tests for transformer_jax.tokenizer: ids, specials, unknowns, persistence, dtypes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transformer_jax.tokenizer import DEFAULT_SPECIALS, CharTokenizer

CORPUS = "To be, or not to be: that is the question.\nWhether 'tis nobler!"


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.from_text(CORPUS)


def test_vocabulary_is_sorted_distinct_corpus_chars_then_four_specials(tok):
    chars = sorted(set(CORPUS))
    assert list(tok.chars) == chars
    assert tok.vocab_size == len(chars) + 4
    assert tok.specials == DEFAULT_SPECIALS == ("α", "Ω", "Ξ", "δ")
    assert (tok.start_id, tok.end_id, tok.unknown_id, tok.pad_id) == tuple(
        range(len(chars), len(chars) + 4))
    assert tok.decode([tok.start_id, tok.end_id, tok.unknown_id, tok.pad_id]) == "αΩΞδ"


def test_encode_matches_index_in_sorted_alphabet_and_decode_round_trips(tok):
    ids = tok.encode(CORPUS)
    expected = [sorted(set(CORPUS)).index(c) for c in CORPUS]
    np.testing.assert_array_equal(ids, expected)
    assert ids.shape == (len(CORPUS),)
    assert tok.decode(ids) == CORPUS


def test_ids_depend_only_on_character_set_not_order_or_counts(tok):
    shuffled = "".join(np.random.default_rng(0).permutation(list(CORPUS))) + CORPUS[:7] * 5
    other = CharTokenizer.from_text(shuffled)
    assert other == tok
    np.testing.assert_array_equal(other.encode(CORPUS), tok.encode(CORPUS))
    assert CharTokenizer.from_text(CORPUS) == tok  # same corpus, same ids


def test_unseen_character_maps_to_unknown_without_key_error(tok):
    assert not {"k", "z", "~"} & set(CORPUS)
    ids = tok.encode("kz~T")  # k, z, ~ are not in the corpus; T is
    assert list(ids[:3]) == [tok.unknown_id] * 3
    assert ids[3] == tok.chars.index("T")
    assert tok.decode(ids) == "ΞΞΞT"
    assert tok.unknown_chars("kz~Tk") == ["k", "z", "~"]


def test_code_points_below_above_and_between_corpus_chars_are_unknown():
    tok = CharTokenizer.from_text("bdf")
    ids = tok.encode("\x00abcdefg\U0010ffff")
    u = tok.unknown_id
    assert list(ids) == [u, u, 0, u, 1, u, 2, u, u]


def test_add_start_and_add_end_wrap_the_ids(tok):
    body = tok.encode("to be")
    both = tok.encode("to be", add_start=True, add_end=True)
    assert both[0] == tok.start_id and both[-1] == tok.end_id
    np.testing.assert_array_equal(both[1:-1], body)
    assert list(tok.encode("", add_start=True)) == [tok.start_id]
    assert list(tok.encode("", add_end=True)) == [tok.end_id]
    only_end = tok.encode("to", add_end=True)
    assert list(only_end) == [*tok.encode("to"), tok.end_id]


def test_decode_skip_specials_drops_all_four_specials_only(tok):
    ids = [tok.start_id, *tok.encode("to be"), tok.unknown_id, tok.pad_id, tok.end_id]
    assert tok.decode(ids) == "αto beΞδΩ"
    assert tok.decode(ids, skip_specials=True) == "to be"
    assert tok.decode(np.asarray(ids, np.uint8), skip_specials=True) == "to be"


@pytest.mark.parametrize("special", DEFAULT_SPECIALS)
def test_corpus_containing_default_special_raises_value_error_naming_it(special):
    with pytest.raises(ValueError, match=repr(special)):
        CharTokenizer.from_text("abc" + special)


def test_custom_specials_avoid_clash_with_corpus_containing_greek():
    text = "αβγ ΩΞδ"
    tok = CharTokenizer.from_text(text, specials=("<", ">", "?", "_"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.specials == ("<", ">", "?", "_")
    assert tok.decode([tok.start_id, tok.pad_id]) == "<_"


def test_invalid_specials_are_rejected():
    with pytest.raises(ValueError):
        CharTokenizer.from_text("abc", specials=("<", "<", "?", "_"))  # not distinct
    with pytest.raises(ValueError):
        CharTokenizer.from_text("abc", specials=("<<", ">", "?", "_"))  # not single chars


def test_special_symbol_typed_in_text_maps_to_unknown_not_to_the_special(tok):
    ids = tok.encode("αtoΩ δΞ")
    assert ids[0] == tok.unknown_id and ids[3] == tok.unknown_id
    assert ids[5] == tok.unknown_id and ids[6] == tok.unknown_id
    assert tok.start_id not in ids and tok.end_id not in ids and tok.pad_id not in ids


def test_json_save_load_round_trip(tmp_path, tok):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = CharTokenizer.load(path)
    assert loaded == tok
    np.testing.assert_array_equal(loaded.encode(CORPUS + "kz"), tok.encode(CORPUS + "kz"))
    assert json.loads(path.read_text(encoding="utf-8"))["chars"] == "".join(tok.chars)


def test_json_round_trip_with_custom_specials_and_non_ascii(tmp_path):
    tok = CharTokenizer.from_text("αβ😀\n\t", specials=("1", "2", "3", "4"))
    tok.save(tmp_path / "t.json")
    assert CharTokenizer.load(tmp_path / "t.json") == tok


def test_id_dtype_is_uint8_for_small_vocab():
    tok = CharTokenizer.from_text(CORPUS)
    assert tok.id_dtype == np.uint8
    assert tok.encode(CORPUS).dtype == np.uint8


def test_id_dtype_is_uint8_up_to_256_symbols_and_uint16_beyond():
    at_256 = CharTokenizer.from_text("".join(chr(0x100 + i) for i in range(252)))
    assert at_256.vocab_size == 256 and at_256.id_dtype == np.uint8
    assert at_256.encode("", add_end=True)[0] == 253  # largest real id fits
    assert at_256.pad_id == 255 and at_256.encode("\u0fff")[0] == at_256.unknown_id
    text = "".join(chr(0x100 + i) for i in range(253))
    over = CharTokenizer.from_text(text)
    assert over.vocab_size == 257 and over.id_dtype == np.uint16
    ids = over.encode(text, add_end=True)
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, [*range(253), over.end_id])
    assert over.decode(ids, skip_specials=True) == text


def test_non_bmp_emoji_in_prompt_is_unknown_and_in_corpus_round_trips(tok):
    ids = tok.encode("to 😀 be")  # one code point, one id (not two UTF-16 halves)
    assert len(ids) == 7 and ids[3] == tok.unknown_id
    assert tok.decode(ids) == "to Ξ be"
    emoji = CharTokenizer.from_text("a😀b🎉")
    assert emoji.decode(emoji.encode("🎉a😀")) == "🎉a😀"


def test_lone_surrogate_in_prompt_encodes_to_unknown_without_crashing(tok):
    ids = tok.encode("to\udc80be\ud800")
    assert len(ids) == 6
    assert ids[2] == tok.unknown_id and ids[5] == tok.unknown_id
    assert tok.decode(ids) == "toΞbeΞ"
    assert tok.unknown_chars("to\udc80") == ["\udc80"]


def test_chars_must_be_sorted_distinct():
    with pytest.raises(ValueError):
        CharTokenizer(("b", "a"))
    with pytest.raises(ValueError):
        CharTokenizer(("a", "a"))


def test_empty_corpus_gives_specials_only_and_everything_unknown():
    tok = CharTokenizer.from_text("")
    assert tok.vocab_size == 4
    assert list(tok.encode("ab")) == [tok.unknown_id] * 2


ALPHABET = sorted(set(CORPUS))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET))
def test_property_any_string_over_corpus_alphabet_round_trips_exactly(text):
    tok = CharTokenizer.from_text(CORPUS)
    ids = tok.encode(text)
    assert ids.shape == (len(text),)
    assert tok.unknown_id not in ids
    assert tok.decode(ids) == text


# st.text() never yields lone surrogates; prompts from argv can hold them, so mix some in.
ANY_TEXT = st.one_of(st.text(), st.lists(st.one_of(
    st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from(ALPHABET))).map("".join))


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_property_arbitrary_text_encodes_in_range_and_decodes_with_unknowns_replaced(text):
    tok = CharTokenizer.from_text(CORPUS)
    ids = tok.encode(text, add_start=True, add_end=True)
    assert ids.dtype == tok.id_dtype and ids.shape == (len(text) + 2,)
    assert ((0 <= ids) & (ids < tok.vocab_size)).all()
    expected = "".join(c if c in tok.chars else tok.unknown for c in text)
    assert tok.decode(ids) == tok.start + expected + tok.end
    assert tok.decode(ids, skip_specials=True) == "".join(c for c in text if c in tok.chars)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=0, max_size=40), st.text(max_size=40))
def test_property_vocabulary_of_any_corpus_round_trips_it_and_maps_rest_to_unknown(corpus, other):
    corpus = "".join(c for c in corpus if c not in DEFAULT_SPECIALS)
    tok = CharTokenizer.from_text(corpus)
    assert list(tok.chars) == sorted(set(corpus))
    assert tok.decode(tok.encode(corpus)) == corpus
    expected = [tok.chars.index(c) if c in tok.chars else tok.unknown_id for c in other]
    np.testing.assert_array_equal(tok.encode(other), np.asarray(expected, tok.id_dtype))


def test_free_specials_swaps_only_the_symbols_the_text_uses():
    from transformer_jax.tokenizer import free_specials

    assert free_specials("plain text") == DEFAULT_SPECIALS
    start, end, unknown, pad = free_specials("αβγ δέκα")
    assert (end, unknown) == ("Ω", "Ξ") and start not in "αβγ δέκα" and pad not in "αβγ δέκα"
    tok = CharTokenizer.from_text("αβγ δέκα", (start, end, unknown, pad))
    assert tok.decode(tok.encode("αβγ δέκα")) == "αβγ δέκα"
