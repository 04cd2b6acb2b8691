"""transformer_jax.config: every fact about a setting is declared once, on its field, and the
lists the rest of the code uses are derived from those declarations."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from transformer_jax import cli, config as config_lib
from transformer_jax.config import Config, TrainConfig, TransformerConfig
from transformer_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


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
            "finetune", "head", "tokenizer"} == set(with_choices)
    for name in with_choices:
        choices = config_lib.FIELDS[name].metadata["choices"]
        assert tuple(actions[name].choices) == choices
        with pytest.raises(ValueError, match=f"{name}='nope' must be one of"):
            Config().replace(**{name: "nope"})


@pytest.mark.parametrize("name,value", [("covariates", "c"), ("time_column", "t")])
def test_a_series_setting_without_columns_is_refused_by_name(name, value):
    assert config_lib.FIELDS[name].metadata["series"]
    with pytest.raises(ValueError, match=f"{name}=.* needs columns"):
        Config().replace(**{name: value})
    assert Config().replace(columns="a", **{name: value}).kind == "series"


def test_the_series_fields_are_the_ones_declared_so():
    series = {n for n, f in config_lib.FIELDS.items() if f.metadata["series"]}
    assert series == {"covariates", "time_column", "head", "ar_order"}
    Config().replace(head="gaussian", ar_order=2)  # ignored without columns, as they were


def test_only_the_flagless_fields_have_no_flag():
    flagless = {n for n, f in config_lib.FIELDS.items() if not f.metadata["flag"]}
    assert flagless == {"head_size", "head_bias", "attn_scale_by_layer"}


def test_every_field_declares_every_fact():
    for cls in (TransformerConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert set(f.metadata) == {"help", "fixed", "choices", "pretrained", "series",
                                       "flag"}, f.name


# --- config files: anything a user may write gives a config or one error line ----------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
# Mostly real field names, with values near the edges of their ranges as well as anything.
FIELD_VALUES = st.dictionaries(
    st.sampled_from(sorted(config_lib.FIELDS)) | st.text(max_size=8),
    JSON_VALUES | st.sampled_from([0, 1, -1, 2, 0.5, 1.5, 3.5, 2**31, -(2**31), 1e308,
                                   float("nan"), float("inf"), "", "a,b", "random", "gpt2"]),
    max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(FIELD_VALUES, JSON_VALUES))
def test_any_json_config_file_gives_a_config_or_one_user_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(data))
    for preset in ("default", "series"):
        args = cli.train_parser().parse_args(["--config", str(path), "--preset", preset])
        try:
            config = cli.resolve_config(args)
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith("--config ")
        else:
            assert isinstance(config, Config)
            assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("text,field", [
    ('{"lr": NaN}', "lr"), ('{"lr": Infinity}', "lr"), ('{"layers": 3.5}', "layers"),
    ('{"dropout": -Infinity}', "dropout"), ('{"steps": 1e400}', "steps"),
    ('{"seed": 99999999999999999999}', "seed"), ('{"seed": -1}', "seed"),
    ('{"batch_size": 2.0}', "batch_size")])
def test_a_config_file_number_no_setting_takes_is_refused_by_name(tmp_path, text, field):
    path = tmp_path / "config.json"
    path.write_text(text)
    out = subprocess.run([sys.executable, "train.py", "--config", str(path), "--steps", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --config {path}:")
    assert field in lines[0]


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--muon-lr", "inf"),
                                        ("--target-loss", "-inf"), ("--seed", "-3")])
def test_a_flag_number_no_setting_takes_is_refused_by_name(flag, value):
    args = cli.train_parser().parse_args([f"{flag}={value}"])
    with pytest.raises(UserError, match=f"^{flag}: .*{flag[2:].replace('-', '_')}="):
        cli.resolve_config(args)


# --- --keep-best, --early-stop, --min-delta, --tensorboard ---------------------------------------


def test_the_best_and_tensorboard_settings_are_flags_that_a_resume_may_change():
    fixed = set(config_lib.FIXED_ON_RESUME)
    names = {"keep_best", "early_stop", "min_delta", "tensorboard"}
    assert not names & fixed
    args = cli.train_parser().parse_args(["--keep-best", "--early-stop", "3", "--min-delta",
                                          "0.01", "--tensorboard"])
    tcfg = cli.resolve_config(args).train
    assert (tcfg.keep_best, tcfg.early_stop, tcfg.min_delta, tcfg.tensorboard) == (
        True, 3, 0.01, True)
    assert tcfg.tracks_best and TrainConfig(early_stop=1).tracks_best
    assert not TrainConfig().tracks_best
    assert not TrainConfig(min_delta=0.5).tracks_best  # min_delta alone changes nothing


@pytest.mark.parametrize("flag,value,message", [
    ("--early-stop", "-1", "early_stop=-1 must not be negative"),
    ("--min-delta", "-0.1", "min_delta=-0.1 must not be negative")])
def test_a_negative_early_stop_or_min_delta_is_refused_by_its_flag(flag, value, message):
    args = cli.train_parser().parse_args([flag, value])
    with pytest.raises(UserError) as e:
        cli.resolve_config(args)
    assert str(e.value) == f"{flag}: {message}"


def test_a_negative_early_stop_is_one_error_line_from_train_py():
    out = subprocess.run([sys.executable, "train.py", "--early-stop", "-1", "--steps", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["error: --early-stop: early_stop=-1 must not be negative"]
