"""Every kind of run, and the one dispatch from a config to its kind (see `base`)."""

from __future__ import annotations

from pathlib import Path

from transformer_jax.checkpoint import RunCheckpoints, UnreadableCheckpoint
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.tasks import char, series, transfer
from transformer_jax.tasks.base import Task, TaskKind, Trained

KINDS = {kind.name: kind for kind in (char.KIND, transfer.KIND, series.KIND)}


def kind_of(config: Config) -> TaskKind:
    """The kind of run `config` describes."""
    return KINDS[config.kind]


def load(run_dir: str | Path, step: int | None = None) -> Trained:
    """The model of checkpoint `step` (default: the newest) in `run_dir`, ready for inference
    (a transfer-learning run's head mapped back to the whole vocabulary)."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run directory {run_dir} holds no checkpoint; train one with "
                        f"`python train.py --run-dir {run_dir}`")
    ckpt = RunCheckpoints(run_dir, read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise UserError(f"run directory {run_dir} holds no complete checkpoint; train first")
        if step is None:
            step = steps[0]
        elif step not in steps:
            raise UserError(f"run directory {run_dir} has no checkpoint of step {step}; give "
                            f"--step one of {', '.join(map(str, sorted(steps)))}")
        try:
            meta = ckpt.meta(step)
            config = Config.from_dict(meta["config"])
            return kind_of(config).load(config, meta,
                                        lambda shapes: ckpt.restore_params(step, shapes), step)
        except UnreadableCheckpoint as e:
            older = [s for s in steps if s < step]
            if not older:
                raise
            raise UnreadableCheckpoint(f"{e}; use an older checkpoint with --step {older[0]}"
                                       ) from None
    finally:
        ckpt.close()


__all__ = ["KINDS", "Task", "TaskKind", "Trained", "kind_of", "load"]
