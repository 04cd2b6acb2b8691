"""Every kind of run, and the one dispatch from a config to its kind (see `base`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformer_jax.checkpoint import RunCheckpoints, UnreadableCheckpoint
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.metrics import Best
from transformer_jax.tasks import char, series, transfer
from transformer_jax.tasks.base import Task, TaskKind, Trained

_READ_TRIES = 5
KINDS = {kind.name: kind for kind in (char.KIND, transfer.KIND, series.KIND)}


def kind_of(config: Config) -> TaskKind:
    """The kind of run `config` describes."""
    return KINDS[config.kind]


def load(run_dir: str | Path, step: int | str | None = None) -> Trained:
    """The model of checkpoint `step` (default: the newest; "best": the best kept by
    --keep-best, as the newest checkpoint records it) in `run_dir`, ready for inference (a
    transfer-learning run's head mapped back to the whole vocabulary).

    A trainer may remove the newest step while it is read (it saved `--keep` newer ones
    meanwhile): the newest is then read again, from a fresh listing."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run directory {run_dir} holds no checkpoint; train one with "
                        f"`python train.py --run-dir {run_dir}`")
    for attempt in range(_READ_TRIES):
        ckpt = RunCheckpoints(run_dir, read_only=True)
        try:
            return _load(ckpt, run_dir, step)
        except UnreadableCheckpoint as e:
            if step is not None or e.step is None or (ckpt.dir / str(e.step)).exists() \
                    or attempt == _READ_TRIES - 1:
                raise
        finally:
            ckpt.close()


def _load(ckpt: RunCheckpoints, run_dir: Path, step: int | str | None) -> Trained:
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"run directory {run_dir} holds no complete checkpoint; train first")
    if step == "best":
        step = _best_step(ckpt, run_dir, steps)
    if step is not None and step not in steps:
        raise UserError(f"run directory {run_dir} has no checkpoint of step {step}; give "
                        f"--step one of {', '.join(map(str, sorted(steps)))}")
    chosen = steps[0] if step is None else step
    try:
        meta = ckpt.meta(chosen)
        config = Config.from_dict(meta["config"])
        trained = kind_of(config).load(config, meta,
                                       lambda shapes: ckpt.restore_params(chosen, shapes), chosen)
        return dataclasses.replace(trained, corpus=meta.get("corpus"))
    except UnreadableCheckpoint as e:
        older = [s for s in steps if s < chosen]
        if not older:
            raise
        raise UnreadableCheckpoint(f"{e}; use an older checkpoint with --step {older[0]}",
                                   step=chosen) from None


def _best_step(ckpt: RunCheckpoints, run_dir: Path, steps: list[int]) -> int:
    """The kept best step that the newest of `steps` records; UserError if there is none."""
    best = Best.from_meta(ckpt.meta(steps[0]))
    if best.step is None or best.step not in steps:
        why = "" if best.step is None else f" (its best, step {best.step}, was not kept)"
        raise UserError(f"run directory {run_dir} has no kept best checkpoint{why}; train it "
                        f"with --keep-best (steps: {', '.join(map(str, sorted(steps)))})")
    return best.step


__all__ = ["KINDS", "Task", "TaskKind", "Trained", "kind_of", "load"]
