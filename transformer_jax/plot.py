"""Pictures of runs: the loss curve (`python -m transformer_jax.plot RUN_DIR` writes
RUN_DIR/loss.png from RUN_DIR/metrics.jsonl, one JSON object per log point) and a forecast.

Needs matplotlib, an optional extra (`pip install 'transformer-jax[plot]'`); without it,
`plot_run` and `plot_forecast` raise UserError with that hint instead of failing on import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformer_jax.errors import UserError

CROSS_ENTROPY = "cross-entropy (nats per token)"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's log points, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; train a run there first")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}, line {number}: not JSON") from None
    return records


def _figure(what: str, **kw):
    """A matplotlib Figure for drawing into a file (no pyplot, no display, no global state),
    or UserError with the install hint for `what`."""
    try:
        import matplotlib.figure
    except ImportError:
        raise UserError(f"{what} needs matplotlib: pip install 'transformer-jax[plot]'"
                        ) from None
    return matplotlib.figure.Figure(**kw)


def plot_run(run_dir: str | Path, ylabel: str = CROSS_ENTROPY) -> Path:
    """Draw train and validation loss against steps into RUN_DIR/loss.png; return its path."""
    fig = _figure("the loss curve", figsize=(7, 4.2), dpi=120)
    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train (mean over the logged steps)", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (held-out part)", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"loss: {Path(run_dir).resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out)
    return out


def plot_forecast(result, path: str | Path) -> Path:
    """Draw a `forecast.Forecast` into `path`: one panel per series with its recent history,
    the median forecast, its interval (Gaussian head) and the actual values where the data has
    them. Returns `path`."""
    fig = _figure("the forecast picture", dpi=120)
    k = len(result.names)
    fig.set_size_inches(8, 2.6 * k + 0.6)
    L, H = len(result.history), len(result.median)
    past, ahead = range(-L + 1, 1), range(1, H + 1)
    axes = fig.subplots(k, 1, sharex=True, squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        last = [result.history[-1, j]]  # the lines after the origin start from its value
        ax.plot(past, result.history[:, j], color="black", lw=1.2, label="history")
        if len(result.actual):
            ax.plot(range(len(result.actual) + 1), last + list(result.actual[:, j]),
                    color="black", lw=1.2, ls="--", label="actual")
        if result.low is not None:
            ax.fill_between(ahead, result.low[:, j], result.high[:, j], color="tab:blue",
                            alpha=0.25, label=f"{result.interval:.0%} interval")
        ax.plot(range(H + 1), last + list(result.median[:, j]), color="tab:blue", lw=1.6,
                label="forecast (median)" if result.low is not None else "forecast")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_ylabel(result.names[j])
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize="small")
    labels = dict(zip(past, result.history_time)) | dict(zip(ahead, result.time))
    ticks = list(range(-L + 1, H + 1, max(1, (L + H) // 6)))
    axes[-1, 0].set_xticks(ticks, [labels[t] for t in ticks], rotation=20, fontsize="small")
    axes[0, 0].set_title(f"forecast of {H} steps from {result.history_time[-1]}")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m transformer_jax.plot RUN_DIR  (writes RUN_DIR/loss.png)",
              file=sys.stderr)
        sys.exit(2)
    try:
        print(plot_run(args[0]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
