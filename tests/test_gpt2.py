"""Tests for transformer_jax.gpt2 against transformers' own outputs on a tiny random GPT-2.

tests/fixtures/gpt2-tiny/ was written by tests/make_gpt2_fixture.py (run by hand with torch and
transformers; neither is needed here): the model, its tokenizer, and the logits, token ids and
greedy continuations transformers computed. Every layer norm and bias of that model is random,
so a dropped or swapped tensor changes the logits (test_every_parameter_matters proves it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from transformer_jax.errors import UserError
from transformer_jax.gpt2 import config_from_hf, from_pretrained, params_from_state_dict
from transformer_jax.model import Transformer
from transformer_jax.sampling import generate

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text(encoding="utf-8"))
TOLERANCE = 1e-4
PAD_TO = 32  # every prompt is run right-padded to this length: one compile serves all
MINIMAL = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=400)


@pytest.fixture(scope="module")
def pretrained():
    return from_pretrained(FIXTURE)


def logits_of(model, params, ids) -> np.ndarray:
    """Float32 logits (len(ids), V) of one sequence at full matmul precision."""
    padded = np.zeros((1, PAD_TO), np.int32)
    padded[0, :len(ids)] = ids
    with jax.default_matmul_precision("highest"):
        return np.asarray(forward(model.config)({"params": params}, jnp.asarray(padded)))[0,
                                                                                         :len(ids)]


def copy_fixture(tmp_path: Path, *, drop=(), tensors=None, config=None) -> Path:
    """A copy of the fixture without the files in `drop`, with the tensors `tensors(old)`
    returns and the config.json fields in `config` changed (None: removed)."""
    out = tmp_path / "model"
    shutil.copytree(FIXTURE, out)
    for name in drop:
        (out / name).unlink()
    if tensors is not None:
        save_file(tensors(load_file(str(FIXTURE / "model.safetensors"))),
                  str(out / "model.safetensors"))
    if config:
        hf = json.loads((out / "config.json").read_text())
        hf.update(config)
        hf = {k: v for k, v in hf.items() if v is not None}
        (out / "config.json").write_text(json.dumps(hf))
    return out


def raises_one_line(match: str, fn, *args):
    """Call fn(*args), expecting a single-line UserError matching `match`."""
    with pytest.raises(UserError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


# Equality with transformers.


def test_logits_match_transformers(pretrained):
    model, params, _ = pretrained
    reference = np.load(FIXTURE / "reference_logits.npz")
    for i, ids in enumerate(REFERENCE["prompt_ids"]):
        expected = reference[f"prompt_{i}"]
        assert expected.shape == (len(ids), model.config.vocab_size)
        np.testing.assert_allclose(logits_of(model, params, ids), expected, rtol=0,
                                   atol=TOLERANCE)


def test_greedy_matches_transformers(pretrained):
    model, params, tokenizer = pretrained
    for prompt, expected in zip(REFERENCE["greedy_prompts"], REFERENCE["greedy_new_ids"]):
        new = generate(model, params, tokenizer.encode(prompt), max_new_tokens=len(expected),
                       temperature=0.0, rng=jax.random.PRNGKey(0))
        assert new[0].tolist() == expected


def test_scanned_layers_load_the_same_model(pretrained):
    """The key map names per-block tensors; a scanned model gets them stacked, same logits."""
    model, params, _ = pretrained
    scanned = dataclasses.replace(model.config, scan_layers=True)
    stacked = params_from_state_dict(load_file(str(FIXTURE / "model.safetensors")), scanned)
    assert stacked["trunk"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == scanned.layers
    reference = np.load(FIXTURE / "reference_logits.npz")
    for i, ids in enumerate(REFERENCE["prompt_ids"]):
        np.testing.assert_allclose(logits_of(Transformer(scanned), stacked, ids),
                                   reference[f"prompt_{i}"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("drop", [(), ("tokenizer.json",)], ids=["tokenizer.json", "vocab+merges"])
def test_tokenizer_matches_transformers(tmp_path, drop):
    _, _, tokenizer = from_pretrained(copy_fixture(tmp_path, drop=drop))
    assert tokenizer.vocab_size == 400
    for prompt, ids, text in zip(REFERENCE["prompts"], REFERENCE["prompt_ids"],
                                 REFERENCE["decoded"]):
        assert tokenizer.encode(prompt) == ids
        assert tokenizer.decode(ids) == text == prompt
    assert tokenizer.encode("<|endoftext|>") == [0]  # special, not spelled in bytes


_CUT_ALPHABET = "ab é中\n\t  .,'s<|endoftext|>0123"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=_CUT_ALPHABET, max_size=60), more=st.text(alphabet=_CUT_ALPHABET,
                                                                       max_size=20))
def test_a_cut_text_encodes_in_two_parts_to_the_ids_of_the_whole(pretrained, text, more):
    """evaluate.py encodes long files piece by piece, cut where `cut` allows: whatever
    follows, the two parts' ids must be the whole text's."""
    tokenizer = pretrained[2]
    cut = tokenizer.cut(text)
    assert 0 <= cut <= len(text)
    whole = text + more
    assert tokenizer.encode(whole[:cut]) + tokenizer.encode(whole[cut:]) == \
        tokenizer.encode(whole)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=_CUT_ALPHABET + "ü€😀", max_size=40),
       cuts=st.lists(st.integers(0, 60), max_size=6))
def test_incremental_decoding_of_any_split_of_the_ids_is_the_whole_decode(pretrained, text, cuts):
    """Streaming decodes a sample's ids a chunk at a time; a chunk may end inside a
    character's UTF-8 bytes (the tiny vocabulary spells most non-ASCII characters in several
    byte tokens), which must then wait for the rest: the pieces join to Hugging Face's decode
    of the whole (special tokens dropped)."""
    tokenizer = pretrained[2]
    ids = tokenizer.encode(text)
    points = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    decode = tokenizer.incremental_decoder()
    pieces = [decode(ids[a:b]) for a, b in zip(points, points[1:])] + [decode([], final=True)]
    assert "".join(pieces) == tokenizer.decode(ids, skip_specials=True)
    assert "\ufffd" not in "".join(pieces)


def test_an_unfinished_character_shows_as_a_replacement_at_the_end(pretrained):
    tokenizer = pretrained[2]
    ids = tokenizer.encode("a😀")
    assert len(ids) > 2  # the emoji is spelled in byte tokens
    decode = tokenizer.incremental_decoder()
    assert decode(ids[:-1]) == "a" and decode([], final=True) == "\ufffd"


def test_every_parameter_matters(pretrained):
    """Zeroing any one tensor (a layer norm scale: setting it to 1) moves the logits far beyond
    the tolerance, so the equality tests above would catch a dropped or misplaced tensor."""
    model, params, _ = pretrained
    ids = REFERENCE["prompt_ids"][1]
    base = logits_of(model, params, ids)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    for i, (path, leaf) in enumerate(flat):
        blank = jnp.ones_like(leaf) if path[-1].key == "scale" else jnp.zeros_like(leaf)
        changed = treedef.unflatten([blank if j == i else x for j, (_, x) in enumerate(flat)])
        moved = np.abs(logits_of(model, changed, ids) - base).max()
        assert moved > 100 * TOLERANCE, jax.tree_util.keystr(path)


# Checkpoint variants.


@pytest.mark.parametrize("rename", [
    lambda name: name.removeprefix("transformer."),
    lambda name: name if name.startswith("transformer.") else "transformer." + name,
], ids=["no prefix", "prefix"])
def test_key_prefix_optional(tmp_path, pretrained, rename):
    _, params, _ = pretrained
    directory = copy_fixture(
        tmp_path, tensors=lambda old: {rename(name): value for name, value in old.items()})
    _, loaded, _ = from_pretrained(directory)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_attention_mask_buffers_ignored(tmp_path, pretrained):
    _, params, _ = pretrained

    def with_buffers(old):
        mask = np.tril(np.ones((64, 64), np.float32))[None, None]
        for i in range(2):
            old[f"transformer.h.{i}.attn.bias"] = mask
            old[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        return old

    _, loaded, _ = from_pretrained(copy_fixture(tmp_path, tensors=with_buffers))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_tied_head_saved_as_copy_is_accepted(tmp_path, pretrained):
    _, params, _ = pretrained
    directory = copy_fixture(tmp_path, tensors=lambda old: {
        **old, "lm_head.weight": old["transformer.wte.weight"]})
    _, loaded, _ = from_pretrained(directory)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_untied_head(tmp_path, pretrained):
    """An untied head (V, D) loads transposed, without a bias: twice the embedding as head
    gives twice the tied logits."""
    model, params, _ = pretrained
    directory = copy_fixture(tmp_path, config={"tie_word_embeddings": False}, tensors=lambda old: {
        **old, "lm_head.weight": 2 * old["transformer.wte.weight"]})
    untied, loaded, _ = from_pretrained(directory)
    assert not untied.config.tie_embeddings
    assert not np.any(loaded["head"]["bias"])
    ids = REFERENCE["prompt_ids"][0]
    np.testing.assert_allclose(logits_of(untied, loaded, ids), 2 * logits_of(model, params, ids),
                               rtol=1e-5, atol=TOLERANCE)


# Configuration.


def test_config_defaults():
    config = config_from_hf(MINIMAL)
    assert (config.vocab_size, config.d_model, config.layers, config.heads, config.max_len) == (
        400, 32, 2, 4, 64)
    assert (config.d_ff, config.activation, config.layer_norm_eps) == (128, "gelu_tanh", 1e-5)
    assert (config.norm, config.positions, config.tie_embeddings, config.dropout) == (
        "pre", "learned", True, 0.0)
    assert config_from_hf({**MINIMAL, "n_inner": 96, "layer_norm_epsilon": 1e-6}).d_ff == 96


@pytest.mark.parametrize("hf_name, ours", [("gelu_new", "gelu_tanh"),
                                           ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu"),
                                           ("relu", "relu")])
def test_config_activations(hf_name, ours):
    assert config_from_hf({**MINIMAL, "activation_function": hf_name}).activation == ours


@pytest.mark.parametrize("change, match", [
    ({"activation_function": "swish"}, "activation_function='swish' is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"model_type": "gpt_neo"}, "model_type='gpt_neo' is not GPT-2"),
    ({"n_head": None}, "missing field.*n_head"),
    ({"n_head": 5}, "divisible"),
], ids=["activation", "inverse layer idx", "unscaled", "model type", "missing", "invalid"])
def test_config_refusals(tmp_path, change, match):
    directory = copy_fixture(tmp_path, config=change)
    raises_one_line(f"config.json: .*{match}", from_pretrained, directory)


# Refusals.


def test_refuses_pickled_weights(tmp_path):
    directory = copy_fixture(tmp_path, drop=["model.safetensors"])
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    raises_one_line("pytorch_model.bin.*arbitrary code.*safe_serialization=True",
                    from_pretrained, directory)


@pytest.mark.parametrize("edit, match", [
    (lambda old: {k: v for k, v in old.items() if k != "transformer.h.1.mlp.c_fc.bias"},
     "missing tensor 'h.1.mlp.c_fc.bias'"),
    (lambda old: {**old, "transformer.h.0.attn.c_attn.weight": np.zeros((96, 32), np.float32)},
     r"tensor 'h.0.attn.c_attn.weight' has shape \(96, 32\), expected \(32, 96\)"),
    (lambda old: {**old, "transformer.h.2.ln_1.weight": np.ones(32, np.float32)},
     "unexpected tensor.*h.2.ln_1.weight"),
    (lambda old: {**old, "lm_head.weight": old["transformer.wte.weight"] + 1},
     "lm_head.weight differs from wte.weight"),
], ids=["missing", "wrong shape", "unexpected", "tied head differs"])
def test_refuses_bad_tensors(tmp_path, edit, match):
    raises_one_line(f"model.safetensors: {match}", from_pretrained,
                    copy_fixture(tmp_path, tensors=edit))


def test_params_from_state_dict_names_missing_head():
    config = config_from_hf({**MINIMAL, "tie_word_embeddings": False})
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    raises_one_line("missing tensor 'lm_head.weight'", params_from_state_dict, tensors, config)


def test_refuses_missing_files(tmp_path):
    raises_one_line("has no tokenizer", from_pretrained,
                    copy_fixture(tmp_path / "a", drop=["tokenizer.json", "merges.txt"]))
    raises_one_line("has no model.safetensors", from_pretrained,
                    copy_fixture(tmp_path / "b", drop=["model.safetensors"]))
    raises_one_line("config.json does not exist", from_pretrained,
                    copy_fixture(tmp_path / "c", drop=["config.json"]))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("setting", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_hub_name_without_network_or_cache(tmp_path, monkeypatch, setting):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    if setting == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                            f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.chdir(tmp_path)  # so that the name is no local directory
    raises_one_line("'transformer-jax-tests/gpt2-absent' is no local directory and cannot be "
                    "downloaded: .*unreachable.*not in the cache",
                    from_pretrained, "transformer-jax-tests/gpt2-absent")


def test_refuses_what_is_neither_directory_nor_hub_name(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    raises_one_line("neither a directory nor a Hugging Face hub name", from_pretrained,
                    str(tmp_path / "no" / "such" / "dir"))
