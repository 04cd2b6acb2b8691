"""Loss-curve picture of a run: `python -m transformer_jax.plot RUN_DIR` writes RUN_DIR/loss.png.

Reads RUN_DIR/metrics.jsonl (one JSON object per log point). Needs matplotlib, an optional
extra (`pip install 'transformer-jax[plot]'`); without it, `plot_run` raises UserError with
that hint instead of failing on import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformer_jax.errors import UserError


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


def plot_run(run_dir: str | Path) -> Path:
    """Draw train and validation loss against steps into RUN_DIR/loss.png; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the loss curve needs matplotlib: pip install 'transformer-jax[plot]'"
                        ) from None
    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train (mean over the logged steps)", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (held-out text)", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(f"loss: {Path(run_dir).resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


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
