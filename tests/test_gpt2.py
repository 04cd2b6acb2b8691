"""Tests for transformer_jax.gpt2 against transformers' own outputs on a tiny random GPT-2.

tests/fixtures/gpt2-tiny/ was written by tests/make_gpt2_fixture.py (run by hand with torch and
transformers; neither is needed here): the model, its tokenizer, and the logits, token ids and
greedy continuations transformers computed. Every layer norm and bias of that model is random,
so a dropped or swapped tensor changes the logits (test_every_parameter_matters proves it).
The gpt2-tiny-* fixtures are checkpoint variants of a smaller one (sharded, float16, bfloat16,
scale_attn_by_inverse_layer_idx), each with transformers' float32 logits of one prompt.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
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

from transformer_jax import gpt2
from transformer_jax.errors import UserError
from transformer_jax.gpt2 import (
    config_from_hf,
    from_pretrained,
    params_from_state_dict,
    weight_files,
)
from transformer_jax.model import Transformer, init_cache, layered
from transformer_jax.sampling import generate

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
SHARDED, LAYERSCALE = (FIXTURE.with_name(f"gpt2-tiny-{name}") for name in ("sharded", "layerscale"))
SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
          "model-00003-of-00003.safetensors"]
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


def copy_fixture(tmp_path: Path, *, drop=(), tensors=None, config=None, source=FIXTURE) -> Path:
    """A copy of the fixture `source` without the files in `drop`, with the tensors
    `tensors(old)` returns and the config.json fields in `config` changed (None: removed)."""
    out = tmp_path / "model"
    shutil.copytree(source, out)
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


# Sharded and half-precision checkpoints; layer-scaled attention.


@pytest.fixture(scope="module")
def sharded():
    return from_pretrained(SHARDED)


@pytest.fixture(scope="module")
def layerscale():
    return from_pretrained(LAYERSCALE)


def variant_references(directory: Path) -> list[tuple[list[int], np.ndarray]]:
    """(prompt ids, transformers' float32 logits (T, V)) of each prompt a variant holds."""
    reference = np.load(directory / "reference_logits.npz")
    return [(REFERENCE["prompt_ids"][int(key.removeprefix("prompt_"))], reference[key])
            for key in reference]


def assert_matches_transformers(directory: Path, model, params) -> None:
    for ids, expected in variant_references(directory):
        np.testing.assert_allclose(logits_of(model, params, ids), expected, rtol=0,
                                   atol=TOLERANCE)


def test_sharded_checkpoint_loads_as_its_single_file(tmp_path, sharded):
    model, params, _ = sharded
    assert weight_files(SHARDED) == [SHARDED / gpt2.INDEX, *(SHARDED / name for name in SHARDS)]
    assert_matches_transformers(SHARDED, model, params)
    single = copy_fixture(tmp_path, source=SHARDED, drop=[gpt2.INDEX, *SHARDS])
    save_file({name: value for shard in SHARDS for name, value in
               load_file(str(SHARDED / shard)).items()}, str(single / "model.safetensors"))
    assert weight_files(single) == [single / "model.safetensors"]
    jax.tree.map(np.testing.assert_array_equal, from_pretrained(single)[1], params)


@pytest.mark.parametrize("name, dtype", [("fp16", np.float16), ("bf16", jnp.bfloat16)])
def test_half_precision_weights_load_as_float32(sharded, name, dtype):
    """The same model stored in float16 or bfloat16 loads as exactly the float32 model's
    parameters rounded to that type; transformers' logits of the stored weights (computed in
    float32) are matched as closely as the float32 model's."""
    directory = FIXTURE.with_name(f"gpt2-tiny-{name}")
    model, params, _ = from_pretrained(directory)
    assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    rounded = jax.tree.map(lambda p: np.asarray(p).astype(dtype).astype(np.float32), sharded[1])
    jax.tree.map(np.testing.assert_array_equal, params, rounded)
    assert_matches_transformers(directory, model, params)


@pytest.mark.parametrize("layout", [{}, {"scan_layers": True}, {"remat": True}],
                         ids=["unrolled", "scanned", "remat"])
def test_layer_scaled_attention_matches_transformers(layerscale, layout):
    """scale_attn_by_inverse_layer_idx (levanter's and Stanford's Mistral GPT-2s): block i's
    scores divided by i + 1, the index reaching scanned blocks too."""
    model, params, _ = layerscale
    assert model.config.attn_scale_by_layer
    config = dataclasses.replace(model.config, **layout)
    assert_matches_transformers(LAYERSCALE, Transformer(config),
                                layered(params, config.scan_layers))
    ids, expected = variant_references(LAYERSCALE)[0]
    unscaled = Transformer(dataclasses.replace(model.config, attn_scale_by_layer=False))
    assert np.abs(logits_of(unscaled, params, ids) - expected).max() > 100 * TOLERANCE


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_layer_scaled_attention_when_decoding(layerscale, scan_layers):
    """Queries attending to the cache are scaled as well: a prompt fed in two calls."""
    model, params, _ = layerscale
    config = dataclasses.replace(model.config, scan_layers=scan_layers)
    ids, expected = variant_references(LAYERSCALE)[0]
    ids_1xT, apply = jnp.asarray([ids]), Transformer(config).apply
    variables = {"params": layered(params, scan_layers), "cache": init_cache(config, 1)}
    with jax.default_matmul_precision("highest"):
        first, state = apply(variables, ids_1xT[:, :10], decode=True, mutable=["cache"])
        rest, _ = apply({**variables, **state}, ids_1xT[:, 10:], decode=True, mutable=["cache"])
    np.testing.assert_allclose(np.concatenate([first[0], rest[0]]), expected, rtol=0,
                               atol=TOLERANCE)


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


# A value of each field that _ONLY refuses.
REFUSED = {"model_type": "gpt_neo", "architectures": ["GPT2ForSequenceClassification"],
           "auto_map": {"AutoModelForCausalLM": "modelling.Custom"}, "scale_attn_weights": False,
           "add_cross_attention": True, "is_encoder_decoder": True, "pruned_heads": {"0": [1]}}


def test_every_refusal_of_the_decision_table_is_tested():
    assert set(REFUSED) == set(gpt2._ONLY)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_config_refuses_by_name_what_we_do_not_compute(tmp_path, name):
    value, reason = REFUSED[name], gpt2._ONLY[name][1]
    directory = copy_fixture(tmp_path, config={name: value})
    raises_one_line("config.json: " + re.escape(f"{name}={json.dumps(value)} is not supported: "
                                                f"{reason}"), from_pretrained, directory)


@pytest.mark.parametrize("change, match", [
    ({"activation_function": "swish"}, 'activation_function="swish" is not supported'),
    ({"n_ctx": 32}, "n_ctx=32 differs from n_positions=64"),
    ({"hidden_size": 64}, "hidden_size=64 contradicts n_embd=32"),
    ({"scale_attn_by_inverse_layer_idx": "yes"}, 'scale_attn_by_inverse_layer_idx="yes" must be '
                                                 "true or false"),
    ({"n_head": None}, "missing field.*n_head"),
    ({"n_head": 5}, "divisible"),
], ids=["activation", "n_ctx", "alias", "not a bool", "missing", "invalid"])
def test_config_refusals(tmp_path, change, match):
    directory = copy_fixture(tmp_path, config=change)
    raises_one_line(f"config.json: .*{match}", from_pretrained, directory)


def test_config_honours_aliases_n_ctx_and_layer_scaling():
    aliased = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": 64, "vocab_size": 400}
    assert config_from_hf(aliased) == config_from_hf(MINIMAL)
    assert config_from_hf({**MINIMAL, "n_ctx": 64, "hidden_size": 32}) == config_from_hf(MINIMAL)
    assert not config_from_hf(MINIMAL).attn_scale_by_layer
    assert config_from_hf({**MINIMAL, "scale_attn_by_inverse_layer_idx": True}).attn_scale_by_layer


def test_config_ignores_what_changes_nothing_we_compute():
    ignored = {"attn_pdrop": 0.5, "embd_pdrop": 0.5, "resid_pdrop": 0.5, "summary_type": "mean",
               "reorder_and_upcast_attn": True, "dtype": "float16", "torch_dtype": "bfloat16",
               "initializer_range": 1.0, "use_cache": False, "bos_token_id": 7}
    assert set(ignored) <= set(gpt2._IGNORED)
    assert config_from_hf({**MINIMAL, **ignored}) == config_from_hf(MINIMAL)


def test_every_field_transformers_wrote_is_decided():
    decided = {*gpt2._READ, *gpt2._ALIASES, *gpt2._ONLY, *gpt2._IGNORED}
    for directory in sorted(FIXTURE.parent.glob("gpt2-tiny*")):
        assert set(json.loads((directory / "config.json").read_text())) <= decided, directory


# Refusals.


@pytest.mark.parametrize("pickle", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_refuses_pickled_weights(tmp_path, pickle):
    directory = copy_fixture(tmp_path, drop=["model.safetensors"])
    (directory / pickle).write_bytes(b"not unpickled, ever")
    raises_one_line(f"has {pickle} but no model.safetensors.*arbitrary code.*"
                    "safe_serialization=True", from_pretrained, directory)


def edit_index(directory: Path, edit) -> None:
    """Replace the index's weight_map (tensor name -> shard) by `edit(weight_map)`."""
    path = directory / gpt2.INDEX
    index = json.loads(path.read_text())
    path.write_text(json.dumps({**index, "weight_map": edit(index["weight_map"])}))


def edit_shard(directory: Path, shard: str, edit) -> None:
    """Replace the shard's tensors by `edit(tensors)`."""
    save_file(edit(load_file(str(directory / shard))), str(directory / shard))


SHARD_OF = json.loads((SHARDED / gpt2.INDEX).read_text())["weight_map"]
IN_SECOND = min(name for name, shard in SHARD_OF.items() if shard == SHARDS[1])
_drop = lambda old: {name: value for name, value in old.items() if name != IN_SECOND}
_rename = lambda new: lambda old: {k: new if v == SHARDS[0] else v for k, v in old.items()}


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / SHARDS[1]).unlink(),
     f"{SHARDS[1]} does not exist: .*{gpt2.INDEX} names it as a shard"),
    (lambda d: edit_shard(d, SHARDS[1], _drop),
     rf"{SHARDS[1]}: lacks tensor\(s\) {IN_SECOND} that {gpt2.INDEX} places in it"),
    (lambda d: edit_shard(d, SHARDS[1], lambda old: {**old, "h.9.ln_1.bias": np.ones(16)}),
     rf"{SHARDS[1]}: holds tensor\(s\) h.9.ln_1.bias that {gpt2.INDEX} does not place in it"),
    (lambda d: (edit_shard(d, SHARDS[1], _drop), edit_index(d, _drop)),
     f"{gpt2.INDEX}: missing tensor '{IN_SECOND.removeprefix('transformer.')}'"),
    (lambda d: edit_index(d, _rename("pytorch_model-00001-of-00003.bin")),
     f"{gpt2.INDEX}: names the shard 'pytorch_model-00001-of-00003.bin'.*never a pickle"),
    (lambda d: edit_index(d, _rename("../model.safetensors")),
     f"{gpt2.INDEX}: names the shard '../model.safetensors', but only safetensors files beside"),
    (lambda d: (d / gpt2.INDEX).write_text('{"weight_map": '),
     f"{gpt2.INDEX}: cannot read it as JSON"),
    (lambda d: (d / gpt2.INDEX).write_text('{"metadata": {}}'),
     f'{gpt2.INDEX}: needs a non-empty "weight_map" object'),
    (lambda d: (d / SHARDS[2]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     f"{SHARDS[2]}: cannot read it as safetensors"),
], ids=["missing shard", "shard lacks a tensor", "shard holds more", "tensor missing",
        "pickle shard", "shard elsewhere", "malformed index", "no weight map", "bad shard"])
def test_refuses_bad_sharded_checkpoints(tmp_path, edit, match):
    directory = copy_fixture(tmp_path, source=SHARDED)
    edit(directory)
    raises_one_line(match, from_pretrained, directory)


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


@pytest.mark.parametrize("source, downloads", [
    (FIXTURE, [gpt2.HUB_FILES]), (SHARDED, [gpt2.HUB_FILES, SHARDS])], ids=["single", "sharded"])
def test_hub_download_fetches_every_shard(tmp_path, monkeypatch, source, downloads):
    """A sharded model's index comes with the first files; every shard it names follows, of
    the same revision (the commit that names the snapshot directory)."""
    snapshot, calls = tmp_path / "snapshots" / ("0123abcd" * 5), []

    def snapshot_download(repo_id, allow_patterns, revision=None):
        calls.append((repo_id, allow_patterns, revision))
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # so that the name is no local directory
    _, params, _ = from_pretrained("transformer-jax-tests/gpt2")
    revisions = [None, snapshot.name][:len(downloads)]
    assert calls == [("transformer-jax-tests/gpt2", patterns, revision)
                     for patterns, revision in zip(downloads, revisions)]
    jax.tree.map(np.testing.assert_array_equal, params, from_pretrained(source)[1])


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
