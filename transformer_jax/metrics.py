"""A run's metric records, and the best validation loss among them.

    RUN_DIR/metrics.jsonl    one JSON object per log point: {"step", "train_loss", "lr", ...}
    RUN_DIR/tensorboard/     the same numbers as TensorBoard event files (--tensorboard)

A resumed run redoes the steps after its checkpoint: their records are dropped from
metrics.jsonl, and hidden in TensorBoard by the next event file's purge step, so that no step
appears twice. Only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer_jax import parallel
from transformer_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# TensorBoard groups tags by what comes before the first "/"; other keys keep their name.
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_bpc": "bits/val"}


class MetricsLog:
    """Where a run's records go: appended to RUN_DIR/metrics.jsonl as they come and, with
    `tensorboard`, written as TensorBoard scalars at the record's step.

    The event file is opened at the first record, so a run with nothing to do leaves none.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.board_dir = Path(run_dir) / TENSORBOARD_DIR
        self._summary_writer = _summary_writer_class() if tensorboard else None
        self._lead = parallel.is_lead()
        self._board = None
        self._resumed = 0

    def clear(self) -> None:
        """Forget every record (a --fresh start): metrics.jsonl and this program's event files."""
        if not self._lead:
            return
        self.path.unlink(missing_ok=True)
        for events in self.board_dir.glob("events.out.tfevents.*"):
            events.unlink()

    def resume(self, step: int) -> None:
        """Continue after `step`: forget the records of later steps (a run that stopped after its
        newest checkpoint left them, and they will be redone)."""
        self._resumed = step
        if self._lead:
            drop_after(self.path, step)

    def write(self, record: dict[str, Any]) -> None:
        """Record `record` ({"step": ..., numbers...}) in metrics.jsonl, and its numbers in
        TensorBoard, where one write is flushed at once as metrics.jsonl's line is."""
        if not self._lead:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._summary_writer is None:
            return
        board = self._board or self._open_board()
        for key, value in record.items():
            if key != "step" and _is_number(value):
                board.add_scalar(TAGS.get(key, key), value, record["step"])
        board.flush()

    def _open_board(self):
        # purge_step: TensorBoard hides the events of every earlier file from this step on.
        # The suffix keeps two files of the same second apart, in the order they were started.
        self._board = self._summary_writer(
            str(self.board_dir), purge_step=self._resumed + 1,
            filename_suffix=f".from-{self._resumed:010d}")
        return self._board

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, or UserError naming the extra that installs it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs tensorboardX: pip install "
                        "'transformer-jax[tensorboard]' (or pip install tensorboardX)") from None
    return SummaryWriter


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def drop_after(path: Path, step: int) -> None:
    """Forget the records of steps after `step` in the JSON lines file `path`, so none repeats."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False  # a line cut short by a killed process

    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(filter(kept, lines)))


@dataclass(frozen=True)
class Best:
    """The lowest validation loss of a run so far (`step` None before any), and `stale`: how
    many evaluations since did not improve on it (what --early-stop counts).

    Saved in every checkpoint's metadata (`to_meta`), so that a resumed run counts on.
    """

    step: int | None = None
    val_loss: float = math.inf
    stale: int = 0

    def update(self, step: int, val_loss: float, min_delta: float = 0.0) -> Best:
        """After an evaluation at `step`: a new best if `val_loss` is below the best by more than
        `min_delta`, else one more stale evaluation (a NaN loss never improves)."""
        if val_loss < self.val_loss - min_delta:
            return Best(step, val_loss)
        return dataclasses.replace(self, stale=self.stale + 1)

    def patience_spent(self, early_stop: int) -> bool:
        """Whether --early-stop `early_stop` (0: never) ends the run now."""
        return early_stop > 0 and self.stale >= early_stop

    def to_meta(self) -> dict[str, Any]:
        """JSON for checkpoint metadata: {"step", "val_loss", "stale"} (null before any)."""
        loss = self.val_loss if self.step is not None else None
        return {"step": self.step, "val_loss": loss, "stale": self.stale}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Best:
        """The best recorded in checkpoint metadata `meta` (its "best"), or none yet."""
        saved = meta.get("best") or {}
        if saved.get("step") is None:
            return cls(stale=int(saved.get("stale", 0)))
        return cls(int(saved["step"]), float(saved["val_loss"]), int(saved.get("stale", 0)))
