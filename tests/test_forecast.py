"""The series model: causality, its training task, what it learns, cached forecasts, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import cli, forecast, parallel, plot, run, series
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.model import SeriesTransformer, param_shapes, series_inputs
from transformer_jax.tasks import series as series_task
from transformer_jax.tokens import Corpus

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=16, layers=2, heads=2, d_ff=32, max_len=8, seq_len=8)


def small_config(**changes) -> Config:
    return series_task.model_config(Config().replace(**{**SMALL, "columns": "a,b", **changes}))


def noisy_params(config: Config, seed: int = 0, scale: float = 0.3):
    """Random parameters of the model's shapes (no compiled init), every one far from zero so
    that every output depends visibly on the inputs."""
    shapes = param_shapes(config.model, series_features=series_task.shape(config)[1])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32),
                        shapes)


def csv_text(values: np.ndarray, names: str = "a,b") -> str:
    return names + "\n" + "".join(",".join(f"{v:.9f}" for v in row) + "\n" for row in values)


def test_inputs_pair_each_time_with_the_covariates_of_the_next():
    rows = jnp.arange(12.0).reshape(1, 4, 3)  # times 0..3; series 2, then 1 covariate
    np.testing.assert_array_equal(series_inputs(rows, 2)[0],
                                  [[0, 1, 5], [3, 4, 8], [6, 7, 11]])


@pytest.mark.parametrize("head", ["point", "gaussian"])
def test_the_series_model_is_causal(head):
    config = small_config(covariates="c", head=head)
    apply = jax.jit(SeriesTransformer(config.model).apply)
    params = noisy_params(config)
    x = np.random.default_rng(1).normal(size=(2, 8, 3)).astype(np.float32)
    changed = x.copy()
    changed[:, 5:] += 1.0
    out, out_changed = (np.asarray(apply({"params": params}, v)) for v in (x, changed))
    assert out.shape == (2, 8, config.model.head_size)
    np.testing.assert_allclose(out_changed[:, :5], out[:, :5], atol=1e-6)
    assert np.abs(out_changed[:, 5:] - out[:, 5:]).min() > 1e-4


def test_the_task_splits_by_time_and_standardises_with_the_training_part_only():
    values = np.column_stack([np.arange(50.0), np.sin(np.arange(50.0))])
    values[40:] += 1000.0  # a validation part far from the training one
    config = Config().replace(**SMALL, columns="a,b", batch_size=4, val_fraction=0.2)
    task = series_task.build(config, Corpus.of_text(csv_text(values)),
                             parallel.data_mesh(jax.devices()[:1]), say=lambda *a: 0)
    stats = task.meta["series"]
    np.testing.assert_allclose(stats["mean"], values[:40].mean(axis=0))
    np.testing.assert_allclose(stats["std"], values[:40].std(axis=0))
    assert len(task.batches.source["x"]) == 40  # training windows never reach the 10 others
    np.testing.assert_allclose(task.batches.source["x"],
                               (values[:40] - stats["mean"]) / stats["std"], rtol=1e-6)
    x, w = (task.val_rows[key].reshape(-1, *task.val_rows[key].shape[2:]) for key in "xw")
    scored = w[:, -1] == 1
    assert scored.sum() == 10 and not w[:, :-1].any() and not w[~scored].any()
    np.testing.assert_allclose(x[scored, -1], (values[40:] - stats["mean"]) / stats["std"],
                               rtol=1e-6)  # each validation row scored once, in time order
    assert task.config.model.head_size == 2 and task.kind.unit(task.config) == "value"


def _reference_paths(config, params, history, future, rng, samples):
    """Sample paths by recomputing the whole context at every step, without a cache, keeping
    the context the cached loop keeps: refilled with the last half-window when it is full."""
    apply = jax.jit(SeriesTransformer(config.model).apply)
    k, F = series_task.shape(config)
    L, H, W = len(history), len(future), config.train.seq_len
    path = np.zeros((samples, L + H + 1, F), np.float32)
    path[:, :L], path[:, L:L + H, k:] = history, future
    start, out = 0, []
    for t in range(L, L + H):
        o = np.asarray(apply({"params": params},
                             series_inputs(jnp.asarray(path[:, start:t + 1]), k)))[:, -1]
        rng, key = jax.random.split(rng)
        y = o[:, :k]
        if config.train.head == "gaussian":
            y = y + np.exp(0.5 * o[:, k:]) * np.asarray(jax.random.normal(key, y.shape))
        path[:, t, :k] = y
        out.append(y)
        if t - start >= W:
            start = t + 1 - W // 2
    return np.stack(out, axis=1)


@pytest.mark.parametrize("head, covariates, scan", [("point", "c", False),
                                                    ("gaussian", None, False),
                                                    ("point", "c", True)])
def test_cached_forecast_matches_a_full_recompute(head, covariates, scan):
    config = small_config(head=head, covariates=covariates, seq_len=4, max_len=4,
                          scan_layers=scan)
    k, F = series_task.shape(config)
    params = noisy_params(config, seed=2)
    rng = np.random.default_rng(3)
    history = rng.normal(size=(3, F)).astype(np.float32)
    future = rng.normal(size=(9, F - k)).astype(np.float32)  # the 4-time window slides 3 times
    got = forecast.simulate(config, params, history, future, samples=3,
                            rng=jax.random.PRNGKey(4))
    want = _reference_paths(config, params, history, future, jax.random.PRNGKey(4), 3)
    assert got.shape == (3, 9, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(np.diff(got, axis=1)).min() > 0  # every step moved: nothing is stuck


def _train(tmp_path, values: np.ndarray, steps: int, lr: float, **changes):
    """Train on `values` as CSV columns a, b through run.train; (text, run directory)."""
    text, run_dir = csv_text(values), tmp_path / "run"
    config = Config().replace(**{**SMALL, "columns": "a,b", "batch_size": 16, "steps": steps,
                                 "lr": lr, "warmup_steps": 20, "decay_steps": steps,
                                 "min_lr": lr / 10, "eval_every": steps, "save_every": steps,
                                 "val_fraction": 0.2, **changes})
    run.train(config, text, run_dir, quiet=True)
    return text, run_dir


def test_the_model_learns_a_noiseless_ar2_to_near_zero_error(tmp_path):
    t = np.arange(600)
    # Two sinusoids: y_t = 2 cos(w) y_t-1 - y_t-2 exactly (amplitude 1, standard deviation 0.71).
    values = np.column_stack([np.sin(0.3 * t), np.cos(0.7 * t + 1.0)])
    text, run_dir = _train(tmp_path, values, steps=400, lr=1e-2, d_model=32, heads=4, d_ff=64,
                           max_len=16, seq_len=16, positions="sinusoidal", ar_order=2)
    report = forecast.validate(run.load_for_sampling(run_dir), text)
    rmse = report["rmse"]
    for name in "ab":
        assert rmse["model"][name] < 0.06, rmse  # explains more than 99% of the variance
        assert rmse["model"][name] < 0.3 * rmse["random walk"][name], rmse
        assert rmse["AR(2)"][name] < 1e-6, rmse  # the baseline's own check: AR(2) is exact
    assert report["mae"]["model"]["a"] <= rmse["model"]["a"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert report["loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-5)


def test_the_gaussian_heads_variance_tracks_the_true_noise_level(tmp_path):
    rng, sigma = np.random.default_rng(0), np.array([0.1, 0.5])
    values = np.zeros((1000, 2))
    for i in range(1, 1000):
        values[i] = 0.8 * values[i - 1] + sigma * rng.normal(size=2)
    text, run_dir = _train(tmp_path, values, steps=300, lr=1e-2, head="gaussian", layers=1,
                           batch_size=32)
    trained = run.load_for_sampling(run_dir)
    config, scaler, params = trained.config, trained.scaler, trained.params
    n_train = series.train_rows(1000, 0.2)
    _, sd = forecast.one_step(config, params, scaler.apply(values), np.arange(n_train, 1000))
    predicted = np.median(sd * scaler.std[:2], axis=0)
    np.testing.assert_allclose(predicted, sigma, rtol=0.25)


def test_known_covariates_are_needed_for_every_forecast_time():
    config = small_config(covariates="c")
    values = np.random.default_rng(0).normal(size=(20, 3))
    table = forecast.read(config, csv_text(values, "a,b,c"))
    scaler = series.Scaler.fit(values, table.names)
    with pytest.raises(UserError, match="has 4 rows after 15, not --horizon 5"):
        forecast.forecast(config, scaler, noisy_params(config), table, origin=15, horizon=5)


def test_without_matplotlib_the_forecast_picture_is_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"forecast picture needs matplotlib.*\[plot\]"):
        plot.plot_forecast(None, tmp_path / "forecast.png")


# --- the command lines end to end ------------------------------------------------------------

TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32", "--max-len", "8",
        "--seq-len", "8", "--batch-size", "4", "--cpu-devices", "2", "--steps", "20",
        "--eval-every", "10", "--save-every", "20", "--ar-order", "2", "--val-fraction", "0.2"]


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def macro_like(tmp_path_factory) -> Path:
    t = np.arange(80)
    path = tmp_path_factory.mktemp("data") / "q.csv"
    rows = "".join(f"{2000 + i // 4}-{3 * (i % 4) + 1:02d}-01,{np.sin(0.4 * i):.6f},"
                   f"{0.1 * np.cos(0.9 * i):.6f},{i % 4}\n" for i in t)
    path.write_text("date,infl,dunemp,q\n" + rows)
    return path


def test_train_and_forecast_command_lines(macro_like, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = run_script("train.py", *TINY, "--data", macro_like, "--columns", "infl,dunemp",
                      "--covariates", "q", "--time-column", "date", "--head", "gaussian",
                      "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr
    for needle in ("in the data's units", "RMSE", "MAE", "random walk", "AR(2)", "90% cover",
                   "forecast with: python forecast.py"):
        assert needle in proc.stdout, proc.stdout
    proc = run_script("forecast.py", "--run-dir", run_dir, "--data", macro_like, "--horizon",
                      "4", "--origin", "2017-01-01", "--samples", "50")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "infl [5%, 95%]" in lines[0] and lines[1].startswith("2017-04-01")
    assert lines[4].startswith("2018-01-01") and (run_dir / "forecast.png").is_file()
    for main, args, needle in [
            (cli.forecast_main, ["--data", str(macro_like)], "covariates q are needed"),
            (cli.sample_main, [], "holds a series model; forecast with")]:
        with pytest.raises(SystemExit) as exit_:
            main(["--run-dir", str(run_dir), *args])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["--columns", "infl,gdp"], "has no column 'gdp'"),
    ([], "is a CSV file: give --columns"),
    (["--columns", "infl", "--seq-len", "70", "--max-len", "70"],
     "80 rows give 64 for training and 16 for validation"),
])
def test_train_command_line_refuses_bad_series_input_in_one_line(macro_like, tmp_path, args,
                                                                 needle):
    proc = run_script("train.py", *TINY, "--data", macro_like, "--run-dir", tmp_path, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
