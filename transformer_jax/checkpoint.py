"""Run directories: orbax checkpoints of the train state beside JSON metadata.

    RUN_DIR/checkpoints/<step>/state/   params, optimizer state, step, rng (orbax, async, atomic)
    RUN_DIR/checkpoints/<step>/meta/    config, tokenizer, data position (JSON)

Each step directory is self-contained: its metadata alone rebuilds the model and tokenizer that
sampling needs. Orbax writes a step under a temporary name and renames it when complete, so a
killed save never leaves a half-written step visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from transformer_jax.errors import UserError

FORMAT = "transformer-jax/1"


class UnreadableCheckpoint(UserError):
    """A step whose files are missing or corrupt (as opposed to a readable foreign one)."""


class RunCheckpoints:
    """The checkpoints of one run directory (wraps an orbax CheckpointManager)."""

    def __init__(self, run_dir: str | Path, keep: int = 3, *, read_only: bool = False):
        self.dir = Path(run_dir).absolute() / "checkpoints"  # orbax needs absolute paths
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=not read_only, read_only=read_only, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.dir, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every complete step, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def set_aside(self, step: int) -> Path:
        """Move an unreadable step out of the way (kept for inspection, never loaded again)."""
        target = self.dir / f"unreadable-{step}"
        (self.dir / str(step)).rename(target)
        self._manager.reload()
        return target

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of `step`: {"format", "config", "tokenizer", "data_position"}."""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a missing or corrupt file
            raise UnreadableCheckpoint(f"checkpoint step {step} in {self.dir}: metadata "
                                       f"unreadable ({type(e).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"checkpoint step {step} in {self.dir} is not a transformer-jax "
                            "checkpoint")
        return meta

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The train state of `step`, shaped and sharded like `abstract_state`.

        Call it after checking the step's metadata against the model: a failure then means
        missing or corrupt files.
        """
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:
            raise UnreadableCheckpoint(
                f"checkpoint step {step} in {self.dir}: state unreadable or does not match this "
                f"model ({type(e).__name__}: {_first_line(e)})") from None

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of `step` (what sampling needs), shaped like `abstract_params`."""
        item = {"params": abstract_params}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True)))
        except Exception as e:
            raise UserError(f"checkpoint step {step} in {self.dir} does not match its config "
                            f"({type(e).__name__}: {_first_line(e)})") from None
        return restored["state"]["params"]

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing `step` in the background; `wait()` until it is complete."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"format": FORMAT, **meta})), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""

