"""Numeric series from CSV text: reading, the split by time, standardisation, windows, and the
two classical one-step baselines a series model is compared with (random walk, least-squares AR).

Shapes: N rows (times), F columns (the K forecast series, then the covariates), M predicted
times, S window length.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np

from transformer_jax.errors import UserError


def column_names(text: str | None) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'); None -> ()."""
    return () if text is None else tuple(name.strip() for name in text.split(","))


@dataclass(frozen=True)
class Series:
    """A table of numeric columns in time order.

    `values` is float64 (N, F): the `targets` forecast columns first, then the covariates;
    `names` their F names; `time` the N row labels (the time column, else row numbers).
    """

    values: np.ndarray
    names: tuple[str, ...]
    targets: int
    time: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.values)

    def row(self, label: str) -> int:
        """The index of the row labelled `label` (a time label, or a row number)."""
        if label in self.time:
            return self.time.index(label)
        raise UserError(f"no row is labelled {label!r}; the data runs from {self.time[0]} to "
                        f"{self.time[-1]}")


def parse_csv(text: str, columns: tuple[str, ...], covariates: tuple[str, ...] = (),
              time_column: str | None = None, where: str = "the CSV data") -> Series:
    """The named columns of CSV `text` (a header row, then one row per time).

    Raises UserError naming the line and column of a missing, non-numeric or non-finite value,
    a missing column, or time labels out of order.
    """
    reader = csv.reader(io.StringIO(text))
    header = [name.strip() for name in next(reader, [])]
    wanted = columns + covariates + ((time_column,) if time_column else ())
    missing = [name for name in wanted if name not in header]
    if missing:
        raise UserError(f"{where} has no column {missing[0]!r}; its header names "
                        f"{', '.join(map(repr, header)) or 'nothing'}")
    index = [header.index(name) for name in columns + covariates]
    values, time = [], []
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue
        line = reader.line_num
        if len(fields) != len(header):
            raise UserError(f"{where}, line {line}: {len(fields)} fields, the header has "
                            f"{len(header)}")
        values.append([_number(fields[i], header[i], line, where) for i in index])
        time.append(fields[header.index(time_column)].strip() if time_column
                    else str(len(time)))
    if not values:
        raise UserError(f"{where} has no data rows")
    if time_column:
        _check_order(time, time_column, where)
    return Series(np.array(values, np.float64), columns + covariates, len(columns), tuple(time))


def _number(text: str, column: str, line: int, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        hint = "a missing value" if not text.strip() else f"{text.strip()!r}, not a number"
        raise UserError(f"{where}, line {line}, column {column!r}: {hint}; fill or drop "
                        "the row") from None
    if not math.isfinite(value):
        raise UserError(f"{where}, line {line}, column {column!r}: {text.strip()!r} is not a "
                        "finite number; fill or drop the row")
    return value


def _check_order(time: list[str], column: str, where: str) -> None:
    """Raise UserError unless labels that read as numbers or ISO dates strictly increase
    (other labels are taken in file order)."""
    for parse in (float, np.datetime64):
        try:
            keys = [parse(t) for t in time]
        except ValueError:
            continue
        bad = next((i for i in range(1, len(keys)) if not keys[i - 1] < keys[i]), None)
        if bad is not None:
            raise UserError(f"{where}: time column {column!r} does not increase at "
                            f"{time[bad - 1]!r}, {time[bad]!r}; sort the rows by time")
        return


def train_rows(n: int, val_fraction: float) -> int:
    """Rows of the training part: all but the last `val_fraction` (the split never shuffles)."""
    return n - int(n * val_fraction)


@dataclass(frozen=True)
class Scaler:
    """Per-column standardisation (x - mean) / std, with statistics of the training part."""

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    @classmethod
    def fit(cls, values_NxF: np.ndarray, names: tuple[str, ...]) -> Scaler:
        std = values_NxF.std(axis=0)
        if (std == 0).any():
            raise UserError(f"column {names[int(np.argmin(std))]!r} is constant in the "
                            "training part; leave it out")
        return cls(values_NxF.mean(axis=0), std)

    def apply(self, values_NxF: np.ndarray) -> np.ndarray:
        return (values_NxF - self.mean) / self.std

    def invert(self, z_xK: np.ndarray) -> np.ndarray:
        """Standardised values of the first K columns (..., K) back in the data's units."""
        K = z_xK.shape[-1]
        return z_xK * self.std[:K] + self.mean[:K]

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Scaler:
        return cls(np.array(d["mean"]), np.array(d["std"]))


def histories(values_NxF: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """The rows values[t - length : t + 1] for each t of `ends` (M,): (M, length + 1, F)."""
    return values_NxF[np.asarray(ends)[:, None] + np.arange(-length, 1)]


def random_walk(y_NxK: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Last-value forecasts of the rows `ends`: y[t - 1], (M, K)."""
    return y_NxK[np.asarray(ends) - 1]


def autoregression(y_NxK: np.ndarray, n_train: int, p: int, ends: np.ndarray) -> np.ndarray:
    """One-step forecasts of the rows `ends` (M, K) by an AR(p) with intercept per series,
    y_t = a + b_1 y_{t-1} + ... + b_p y_{t-p}, fitted by least squares on the first n_train
    rows and applied to the actual predecessors of each predicted row."""
    lags = lambda y_N, t: np.column_stack([np.ones(len(t))] + [y_N[t - i] for i in
                                                               range(1, p + 1)])
    fit_t, ends = np.arange(p, n_train), np.asarray(ends)
    out = []
    for y_N in y_NxK.T:
        coef, *_ = np.linalg.lstsq(lags(y_N, fit_t), y_N[fit_t], rcond=None)
        out.append(lags(y_N, ends) @ coef)
    return np.stack(out, axis=1)


def rmse(pred_MxK: np.ndarray, actual_MxK: np.ndarray) -> np.ndarray:
    """Root mean squared error per series: (K,)."""
    return np.sqrt(np.mean((pred_MxK - actual_MxK) ** 2, axis=0))


def mae(pred_MxK: np.ndarray, actual_MxK: np.ndarray) -> np.ndarray:
    """Mean absolute error per series: (K,)."""
    return np.mean(np.abs(pred_MxK - actual_MxK), axis=0)
