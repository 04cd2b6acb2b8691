"""transformer_jax.config: every fact about a setting is declared once, on its field, and the
lists the rest of the code uses are derived from those declarations."""

from __future__ import annotations

import dataclasses

import pytest

from transformer_jax import cli, config as config_lib
from transformer_jax.config import Config, TrainConfig, TransformerConfig


def test_the_lists_of_fields_are_derived_from_their_declarations():
    fixed = {n for n, f in config_lib.FIELDS.items() if f.metadata["fixed"]}
    assert set(config_lib.FIXED_ON_RESUME) == fixed
    assert {"d_model", "seq_len", "init", "columns", "optimizer", "seed"} <= fixed
    assert not {"lr", "steps", "dropout", "dtype", "remat", "eval_every"} & fixed
    assert set(config_lib.PRETRAINED_MODEL_FIELDS) == {"dropout", "dtype", "remat", "scan_layers"}


def test_every_field_with_choices_is_checked_and_offered_by_its_flag():
    actions = {a.dest: a for a in cli.train_parser()._actions}
    with_choices = [n for n, f in config_lib.FIELDS.items() if f.metadata["choices"]]
    assert {"activation", "norm", "positions", "dtype", "batching", "optimizer", "on_nan",
            "finetune", "head"} == set(with_choices)
    for name in with_choices:
        choices = config_lib.FIELDS[name].metadata["choices"]
        assert tuple(actions[name].choices) == choices
        with pytest.raises(ValueError, match=f"{name}='nope' must be one of"):
            Config().replace(**{name: "nope"})


@pytest.mark.parametrize("name,value", [("covariates", "c"), ("time_column", "t"),
                                        ("head", "gaussian"), ("ar_order", 2)])
def test_a_series_setting_without_columns_is_refused_by_name(name, value):
    assert config_lib.FIELDS[name].metadata["series"]
    with pytest.raises(ValueError, match=f"{name}=.* needs columns"):
        Config().replace(**{name: value})
    assert Config().replace(columns="a", **{name: value}).kind == "series"


def test_only_the_flagless_fields_have_no_flag():
    flagless = {n for n, f in config_lib.FIELDS.items() if not f.metadata["flag"]}
    assert flagless == {"vocab_size", "head_size"}


def test_every_field_declares_every_fact():
    for cls in (TransformerConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert set(f.metadata) == {"help", "fixed", "choices", "pretrained", "series",
                                       "flag"}, f.name
