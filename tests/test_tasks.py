"""transformer_jax.tasks: the one dispatch from a config to its kind of run, and the contract
every kind keeps."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib, parallel, tasks
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.model import SeriesTransformer, init_params
from transformer_jax.tasks import char as char_task, series as series_task
from transformer_jax.tokens import Corpus

GPT2 = "tests/fixtures/gpt2-tiny"


@pytest.mark.parametrize("changes,kind", [
    ({}, "char"), ({"init": GPT2}, "transfer"), ({"columns": "a,b"}, "series"),
    ({"columns": "a", "covariates": "c", "head": "gaussian"}, "series")])
def test_each_config_dispatches_to_its_kind(changes, kind):
    config = Config().replace(**changes)
    assert config.kind == config.train.kind == kind
    assert tasks.kind_of(config).name == kind


def test_every_kind_of_the_config_has_a_module_and_the_same_contract():
    assert tuple(tasks.KINDS) == config_lib.KINDS
    for name, kind in tasks.KINDS.items():
        assert kind.name == name and kind.reader in ("sample", "forecast")
        assert callable(kind.build) and callable(kind.load)
        assert isinstance(kind.loss_label(Config().replace(columns="a")), str)


def test_an_old_config_without_a_kind_loads_with_its_kind():
    saved = json.loads(json.dumps(Config().replace(columns="a,b").to_dict()))
    assert "kind" not in saved["train"]
    assert Config.from_dict(saved).kind == "series"


def test_the_char_task_trains_and_evaluates_with_two_named_losses():
    mesh = parallel.data_mesh(jax.devices()[:1])
    config = Config().replace(d_model=16, layers=1, heads=2, d_ff=32, max_len=16, seq_len=8,
                              batch_size=2, steps=1)
    task = tasks.kind_of(config).build(config, Corpus.of_text("the dismal science " * 20), mesh,
                                       say=lambda *a: None)
    assert task.kind is tasks.KINDS["char"] and task.config.model.vocab_size > 4
    params = task.init_params()
    rows = np.asarray(task.val_rows[0])
    rng = jax.random.PRNGKey(0)
    for loss in (task.train_loss, task.eval_loss):
        total, count = loss(params, rows, rng)
        assert float(count) > 0 and np.isfinite(float(total))


def test_a_bpe_vocabulary_is_trained_on_the_training_split_only():
    """A word only the validation split holds is never one token; the model's vocabulary is
    the tokenizer's."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    config = Config().replace(tokenizer="bpe", vocab_size=277, d_model=16, layers=1, heads=2,
                              d_ff=32, max_len=16, seq_len=8, batch_size=2, steps=1,
                              val_fraction=0.2)
    text = "the dismal science " * 80 + "zyzzyva " * 30
    task = tasks.kind_of(config).build(config, Corpus.of_text(text), mesh, say=lambda *a: None)
    tokenizer = char_task.tokenizer_from_dict(task.meta["tokenizer"])
    assert task.config.model.vocab_size == tokenizer.vocab_size == 277
    assert len(tokenizer.encode("zyzzyva")) == 7 and len(tokenizer.encode(" dismal")) == 1
    assert tasks.kind_of(task.config).unit(task.config) == "token"


def test_vocab_size_is_refused_for_characters_and_bpe_for_other_kinds():
    config = Config().replace(vocab_size=500)
    with pytest.raises(UserError, match="--vocab-size 500 applies to --tokenizer bpe; the "
                       "corpus's characters give 7 tokens"):
        char_task.tokenizer_of(config, Corpus.of_text("abc"), say=lambda *a: None)
    with pytest.raises(ValueError, match="tokenizer='bpe' applies to models trained from scratch"):
        Config().replace(tokenizer="bpe", init=GPT2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_compiled_init_serves_the_series_model_and_keeps_its_dtype(dtype):
    with jax.enable_x64(dtype == "float64"):
        config = series_task.model_config(Config().replace(
            columns="a,b", covariates="c", d_model=16, layers=1, heads=2, d_ff=32, dtype=dtype))
        params = init_params(config.model, jax.random.PRNGKey(0), series_features=3)
        assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype(dtype)}
        assert params["embed"]["kernel"].shape == (3, 16)
        assert params["head"]["kernel"].shape == (16, 2)
        # the same numbers as the series model's own (uncompiled) init, in float32
        unrolled = dataclasses.replace(config.model, scan_layers=False)
        own = SeriesTransformer(unrolled).init(jax.random.PRNGKey(0), np.zeros((1, 1, 3),
                                                                             np.float32))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(own["params"])):
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                       rtol=1e-6, atol=1e-7)
