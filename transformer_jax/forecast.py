"""Inference with a series model: one-step predictions against the baselines on the validation
part, and multi-step forecasts with the key/value cache (sample paths for a Gaussian head).

Shapes: B batch, T positions, F = K + C features, O outputs (K, or 2K for a Gaussian head),
H horizon.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer_jax import data, parallel, series, training
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.model import SeriesTransformer, empty_cache, half_window, series_inputs
from transformer_jax.series import Scaler, Series
from transformer_jax.tasks import Trained
from transformer_jax.tasks.series import read, shape, validation_rows

_Z95 = 1.6449  # the standard normal's 95% quantile: mean +- _Z95 sd is the central 90%


def one_step(config: Config, params, z_NxF: np.ndarray, ends: np.ndarray, chunk: int = 256
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Standardised one-step forecasts of the rows `ends` (M,) from the seq_len rows before
    each: means (M, K), and standard deviations (M, K) for a Gaussian head (else None)."""
    k, S = shape(config)[0], config.train.seq_len
    apply = jax.jit(lambda p, rows: SeriesTransformer(config.model).apply(
        {"params": p}, series_inputs(rows, k))[:, -1])
    rows = lambda i: series.histories(z_NxF, ends[i:i + chunk], S).astype(np.float32)
    out = np.concatenate([np.asarray(apply(params, rows(i)))
                          for i in range(0, len(ends), chunk)])
    if config.train.head == "point":
        return out, None
    return out[:, :k], np.exp(0.5 * out[:, k:])


def validate(trained: Trained, text: str, *, where: str = "the CSV data") -> dict:
    """The one-step-ahead errors over the validation part (the last val_fraction rows) of CSV
    `text` (`where` names it in errors), in the data's units: RMSE and MAE of the model, of the
    random walk and of the least-squares AR(p) fitted on the rows before; for a Gaussian head
    also how often the central 90% interval holds the value; and `loss`, the validation loss as
    training computes it (standardised units)."""
    config, scaler, params = trained.config, trained.scaler, trained.params
    table = read(config, text, where)
    k, p = table.targets, config.train.ar_order
    n_train = series.train_rows(len(table), config.train.val_fraction)
    if not 0 < n_train < len(table):
        raise UserError(f"{where} has {len(table)} rows: too few to hold a validation part "
                        f"(the last {config.train.val_fraction:.0%}) after some history")
    ends = np.arange(n_train, len(table))
    y_NxK, actual = table.values[:, :k], table.values[ends, :k]
    z_NxF = scaler.apply(table.values)
    mean, sd = one_step(config, params, z_NxF, ends)
    predictions = {"model": scaler.invert(mean), "random walk": series.random_walk(y_NxK, ends),
                   f"AR({p})": series.autoregression(y_NxK, n_train, p, ends)}
    names = table.names[:k]
    per_series = lambda error: {label: dict(zip(names, error(pred, actual).tolist()))
                                for label, pred in predictions.items()}
    report = {"step": trained.step, "from": table.time[n_train], "to": table.time[-1],
              "points": len(ends), "loss": _validation_loss(config, params, z_NxF, ends, k),
              "rmse": per_series(series.rmse), "mae": per_series(series.mae)}
    if sd is not None:
        inside = np.abs(actual - scaler.invert(mean)) <= _Z95 * sd * scaler.std[:k]
        report["coverage_90"] = dict(zip(names, inside.mean(axis=0).tolist()))
    return report


def _validation_loss(config: Config, params, z_NxF: np.ndarray, ends: np.ndarray, k: int
                     ) -> float:
    """The training's validation loss of the times `ends`: its rows and loss function."""
    mesh = parallel.data_mesh()
    rows = validation_rows(z_NxF.astype(np.float32), ends, config.train.seq_len,
                           data.eval_batch_size(config.train, mesh.devices.size))
    loss = training.series_loss(SeriesTransformer(config.model), k, config.train.head,
                                train=False)
    return training.evaluate(training.compile_evaluate(mesh, loss), params,
                             training.eval_groups(rows))["loss"]


def validation_table(report: dict) -> str:
    """The report of `validate` as a few lines of text."""
    lines = [f"validation, {report['points']} one-step-ahead forecasts ({report['from']} to "
             f"{report['to']}), in the data's units:"]
    names = list(next(iter(report["rmse"].values())))
    width = max(map(len, report["rmse"])) + 8
    for error in ("rmse", "mae"):
        lines.append(f"{error.upper():<{width}}" + "".join(f"{n:>12}" for n in names))
        lines += [f"  {label:<{width - 2}}" + "".join(f"{v[n]:12.4f}" for n in names)
                  for label, v in report[error].items()]
    if "coverage_90" in report:
        lines.append(f"{'90% cover':<{width}}" + "".join(
            f"{report['coverage_90'][n]:12.0%}" for n in names))
    return "\n".join(lines)


def autoregress(model: nn.Module, params, buffer, length, rng, *, count: int, width: int,
                window: int, draw, inputs_at):
    """Extend a history by `count` values, one cached step each: (count, B, ...) draws.

    Args:
      buffer: (B, P, ...) array; positions [0, length) hold the prompt (of the first `width`,
        a static size, the rest ignored), and each new value is written at the next position.
      length: positions of prompt (an int32 scalar, may be traced).
      draw: (model output at the newest position (B, O), rng key) -> the next value (B, ...).
      inputs_at: (buffer, start, n) -> the model's inputs for positions [start, start + n).
      window: positions the cache holds; once full it is refilled from the last half-window
        (absolute positions cannot slide inside a cache), one prefill per half-window.
    """
    half = half_window(window)
    step = lambda cache, x: model.apply({"params": params, "cache": cache}, x, decode=True,
                                        mutable=["cache"])

    def prefill(buffer, start, n, used):
        """A fresh cache of positions [start, start + used) (inputs read: n >= used), and the
        output at the last of them."""
        x = inputs_at(buffer, start, n)
        out, vars_ = step(empty_cache(model, x[:, :1]), x)
        trunk = {**vars_["cache"]["trunk"],
                 "index": jnp.full(x.shape[:1], used, jnp.int32)}  # every row alike
        return {**vars_["cache"], "trunk": trunk}, out[:, used - 1]

    def body(carry, i):
        cache, out, buffer, rng = carry
        rng, key = jax.random.split(rng)
        value = draw(out, key)
        at = length + i
        buffer = jax.lax.dynamic_update_slice(
            buffer, value[:, None].astype(buffer.dtype), (0, at) + (0,) * (buffer.ndim - 2))

        def advance(_):
            out, vars_ = step(cache, inputs_at(buffer, at, 1))
            return vars_["cache"], out[:, -1]

        slide = lambda _: prefill(buffer, at + 1 - half, half, half)
        cache, out = jax.lax.cond(cache["trunk"]["index"][0] >= window, slide, advance, None)
        return (cache, out, buffer, rng), value

    cache, out = prefill(buffer, 0, width, length)
    return jax.lax.scan(body, (cache, out, buffer, rng), jnp.arange(count))[1]


@functools.partial(jax.jit, static_argnames=("model", "k", "length", "window", "gaussian"))
def _simulate(params, path_BxPxF, rng, *, model, k: int, length: int, window: int,
              gaussian: bool):
    """Fill path[:, length:, :k] but the last time, one time after the other: (B, H, K) draws
    (a cached step each, the first `length` times the history; see `autoregress`)."""
    def draw(out_BxO, key):
        y_BxK = out_BxO[:, :k]
        if gaussian:
            y_BxK = y_BxK + jnp.exp(0.5 * out_BxO[:, k:]) * jax.random.normal(key, y_BxK.shape)
        return y_BxK

    # The inputs of time t are the series at t and the covariates at t + 1.
    inputs_at = lambda path, start, n: series_inputs(
        jax.lax.dynamic_slice_in_dim(path, start, n + 1, axis=1), k)
    y_HxBxK = autoregress(model, params, path_BxPxF, length, rng,
                          count=path_BxPxF.shape[1] - length - 1, width=length, window=window,
                          draw=draw, inputs_at=inputs_at)
    return y_HxBxK.transpose(1, 0, 2)


def simulate(config: Config, params, history_LxF: np.ndarray, future_HxC: np.ndarray, *,
             samples: int, rng: jax.Array) -> np.ndarray:
    """Standardised sample paths (samples, H, K) after the history (at most seq_len times),
    given the covariates of the H forecast times (C may be 0): the mean fed back for a point
    head, a draw from the predicted Gaussian for a Gaussian head."""
    k, F = shape(config)
    L, H = len(history_LxF), len(future_HxC)
    if not 1 <= L <= config.train.seq_len:
        raise ValueError(f"the history has {L} times; give 1 to seq_len={config.train.seq_len}")
    path = np.zeros((samples, L + H + 1, F), np.float32)
    path[:, :L] = history_LxF
    path[:, L:L + H, k:] = future_HxC
    return np.asarray(_simulate(params, jnp.asarray(path), rng,
                                model=SeriesTransformer(config.model), k=k, length=L,
                                window=config.train.seq_len,
                                gaussian=config.train.head == "gaussian"))


@dataclass(frozen=True)
class Forecast:
    """A multi-step forecast of K series over H times, in the data's units.

    `median` (H, K); `low`, `high` (H, K) bound the central `interval` of the sample paths
    (None for a point head); `time` (H,) labels the forecast times ("LAST+h" past the data's
    end); `history` (L, K) is the data up to the forecast's origin, labelled `history_time`;
    `actual` (A, K), A <= H, the data's own values at the first A forecast times.
    """

    names: tuple[str, ...]
    time: tuple[str, ...]
    median: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    interval: float
    history_time: tuple[str, ...]
    history: np.ndarray
    actual: np.ndarray


def forecast(config: Config, scaler: Scaler, params, table: Series, *, origin: int,
             horizon: int, samples: int = 1000, interval: float = 0.9, seed: int = 0
             ) -> Forecast:
    """Forecast the `horizon` times after row `origin` of `table` from the seq_len rows up to
    it. A Gaussian head draws `samples` paths; a point head feeds its predictions back once.
    Known covariates must be in the table for every forecast time."""
    if not 0 <= origin < len(table):
        raise ValueError(f"origin={origin} is not a row of the table (0 to {len(table) - 1})")
    k, after = table.targets, slice(origin + 1, origin + 1 + horizon)
    n_after = len(table) - origin - 1
    if table.names[k:] and n_after < horizon:
        raise UserError(f"the covariates {', '.join(table.names[k:])} are needed at every "
                        f"forecast time: the data has {n_after} rows after {table.time[origin]}, "
                        f"not --horizon {horizon}")
    z_NxF = scaler.apply(table.values)
    future_HxC = np.zeros((horizon, len(table.names) - k))  # C = 0 without covariates
    future_HxC[:min(horizon, n_after)] = z_NxF[after, k:]
    start = max(0, origin + 1 - config.train.seq_len)
    gaussian = config.train.head == "gaussian"
    paths = scaler.invert(simulate(config, params, z_NxF[start:origin + 1], future_HxC,
                                   samples=samples if gaussian else 1,
                                   rng=jax.random.PRNGKey(seed)))
    low, median, high = np.quantile(paths, [(1 - interval) / 2, 0.5, (1 + interval) / 2], axis=0)
    time = table.time[after]
    time += tuple(f"{table.time[-1]}+{h}" for h in range(1, horizon - len(time) + 1))
    shown = slice(max(0, origin + 1 - max(3 * horizon, config.train.seq_len)), origin + 1)
    return Forecast(table.names[:k], time, median, low if gaussian else None,
                    high if gaussian else None, interval, table.time[shown],
                    table.values[shown, :k], table.values[after, :k])


def forecast_table(result: Forecast) -> str:
    """One line per forecast time: the median of each series and its interval."""
    bounds = f" [{(1 - result.interval) / 2:.0%}, {(1 + result.interval) / 2:.0%}]"
    lines = [f"{'time':<14}" + "".join(f"{n + (bounds if result.low is not None else ''):>26}"
                                       for n in result.names)]
    for h, label in enumerate(result.time):
        cells = [f"{result.median[h, j]:10.4f}" + (
            f" [{result.low[h, j]:.3f}, {result.high[h, j]:.3f}]" if result.low is not None
            else "") for j in range(len(result.names))]
        lines.append(f"{label:<14}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)
