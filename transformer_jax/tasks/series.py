"""A series model: the causal trunk over real-valued CSV columns, trained to predict the next time.

At position t the model reads the standardised values of the K forecast series at time t and of
the C known covariates at time t + 1, and predicts the series at time t + 1: a point (trained
with mean squared error) or a Gaussian (a mean and a log-variance per series, trained with its
negative log-likelihood). A training row is S + 1 consecutive times of the training part;
inputs come from all of them, targets are the last S. Shapes: F = K + C features.
"""

from __future__ import annotations

import jax
import numpy as np

from transformer_jax import data, series, training
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.model import SeriesTransformer, init_params, param_shapes
from transformer_jax.series import Scaler, Series, column_names
from transformer_jax.tasks.base import Task, TaskKind, Trained
from transformer_jax.tokens import Corpus

# What the training loss of each head is, for the loss curve.
LOSS_LABELS = {"point": "mean squared error (standardised units)",
               "gaussian": "Gaussian negative log-likelihood (nats per value)"}


def shape(config: Config) -> tuple[int, int]:
    """(K forecast series, F input features) of a series run."""
    k = len(column_names(config.train.columns))
    return k, k + len(column_names(config.train.covariates))


def model_config(config: Config) -> Config:
    """`config` with the model's prediction layer set for its head: untied, K or 2K outputs."""
    k, _ = shape(config)
    outputs = k if config.train.head == "point" else 2 * k
    return config.replace(vocab_size=0, tie_embeddings=False, head_size=outputs)


def read(config: Config, text: str, where: str = "the CSV data") -> Series:
    """The run's columns of CSV `text` (`where` names it in errors)."""
    tcfg = config.train
    return series.parse_csv(text, column_names(tcfg.columns), column_names(tcfg.covariates),
                            tcfg.time_column, where)


def _check_sizes(config: Config, n: int, n_train: int, n_dev: int) -> None:
    tcfg = config.train
    S, p = tcfg.seq_len, tcfg.ar_order
    if S > config.model.max_len:
        raise UserError(f"--seq-len {S} exceeds --max-len {config.model.max_len}; raise "
                        "--max-len")
    if n_train < max(S + 1, 2 * p + 1) or n_train == n:
        raise UserError(f"{n} rows give {n_train} for training and {n - n_train} for "
                        f"validation: --seq-len {S} and --ar-order {p} need at least "
                        f"{max(S + 1, 2 * p + 1)} and 1; lower them, change --val-fraction or "
                        "give more rows")
    data.check_batch_size(tcfg, n_dev * tcfg.micro_batches)


def validation_rows(z_NxF: np.ndarray, ends: np.ndarray, length: int, batch: int) -> dict:
    """Rows scoring each time of `ends` once, one step ahead from the `length` times before it
    (which may lie in the training part): {"x": (N, batch, length + 1, F), "w": (N, batch,
    length + 1)}, padded with rows of weight 0."""
    x = series.histories(z_NxF, ends, length).astype(np.float32)
    w = np.zeros(x.shape[:2], np.float32)
    w[:, -1] = 1.0
    batched = lambda a: data.pad_rows(a, batch, 0).reshape(-1, batch, *a.shape[1:])
    return {"x": batched(x), "w": batched(w)}


def build(config: Config, corpus: Corpus, mesh, *, say=print, quiet: bool = False) -> Task:
    """A series model of the columns of the CSV `corpus` named by `config.train.columns`.

    The first rows (1 - val_fraction) are the training part, whose statistics standardise every
    column and are saved with each checkpoint; the validation loss is the one-step-ahead loss
    over every row of the rest.
    """
    tcfg = config.train
    table = read(config, corpus.read())
    n, n_train = len(table), series.train_rows(len(table), tcfg.val_fraction)
    _check_sizes(config, n, n_train, mesh.devices.size)
    scaler = Scaler.fit(table.values[:n_train], table.names)
    z_NxF = scaler.apply(table.values).astype(np.float32)
    say(f"series: {', '.join(table.names[:table.targets])} ({n} rows: {table.time[0]} to "
        f"{table.time[n_train - 1]} for training, {table.time[n_train]} to {table.time[-1]} "
        "for validation)")
    batches = data.Batches({"x": z_NxF[:n_train], "w": np.ones(n_train, np.float32)},
                           tcfg.seq_len + 1, tcfg.batch_size, "random", tcfg.seed)
    val = validation_rows(z_NxF, np.arange(n_train, n), tcfg.seq_len,
                          data.eval_batch_size(tcfg, mesh.devices.size))
    config = model_config(config)
    model = SeriesTransformer(config.model)
    loss = lambda train: training.series_loss(model, table.targets, tcfg.head, train=train)
    features = shape(config)[1]
    return Task(KIND, config, loss(True), loss(False),
                lambda: init_params(config.model, jax.random.PRNGKey(tcfg.seed),
                                    series_features=features),
                batches, val, {"config": config.to_dict(), "series": scaler.to_dict()})


def load(config: Config, meta: dict, restore, step: int) -> Trained:
    shapes = param_shapes(config.model, series_features=shape(config)[1])
    return Trained(KIND, config, restore(shapes), step, scaler=Scaler.from_dict(meta["series"]))


KIND = TaskKind("series", unit=lambda config: "value", reader="forecast", cross_entropy=False,
                loss_label=lambda config: LOSS_LABELS[config.train.head], build=build,
                load=load)
