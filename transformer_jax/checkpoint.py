"""Run directories: orbax checkpoints of the train state beside JSON metadata.

    RUN_DIR/checkpoints/<step>/state/   params, optimizer state, step, rng (orbax, async, atomic)
    RUN_DIR/checkpoints/<step>/meta/    config, data position, tokenizer or scaler... (JSON)
    RUN_DIR/checkpoints/<step>/metrics/ {"step", "val_loss"}: only in a kept best (--keep-best)

Each step directory is self-contained: its metadata alone rebuilds the model and tokenizer that
sampling needs. Orbax writes a step under a temporary name and renames it when complete, so a
killed save never leaves a half-written step visible; a failed write (permission denied, disk
full) is a UserError naming the step's path, and never removes an older step.

With `keep_best`, the newest step saved as a best (`save(..., best_loss=)`) is kept besides the
last `keep`, by orbax's own preservation policies: LatestN(keep), or BestN(n=1) over the steps
saved with metrics, ranked by step. The caller decides what a best is (`metrics.Best`, with its
--min-delta), so every step saved as one is better than the earlier ones; ranking them by step
rather than by loss keeps the step the metadata names as the best even when the count started
over (a run resumed once without --keep-best, whose older best may have had a lower loss).

Orbax is imported, and its manager made, only once a step is there to read or one is saved: a
new run reaches its first step without them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from transformer_jax.errors import UserError

FORMAT = "transformer-jax/1"
_LISTING_TRIES = 5
# What may sit in RUN_DIR/checkpoints: steps, orbax's unfinished ones, steps set aside.
_OWN_ENTRY = re.compile(r"\d+|\d+\.orbax-checkpoint-tmp.*|unreadable-\d+|\..*")


def check_own(run_dir: str | Path) -> None:
    """Refuse a RUN_DIR/checkpoints that is a file or holds another program's files."""
    path = Path(run_dir) / "checkpoints"
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a checkpoint directory; choose another "
                        "--run-dir")
    foreign = sorted(p.name for p in path.glob("*") if not _OWN_ENTRY.fullmatch(p.name))
    if foreign:
        raise UserError(f"{path} holds files that transformer-jax did not write "
                        f"({', '.join(foreign[:3])}); choose another --run-dir")


class UnreadableCheckpoint(UserError):
    """A step whose files are missing or corrupt (as opposed to a readable foreign one)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class RunCheckpoints:
    """The checkpoints of one run directory (wraps an orbax CheckpointManager)."""

    def __init__(self, run_dir: str | Path, keep: int = 3, *, keep_best: bool = False,
                 read_only: bool = False):
        self.dir = Path(run_dir).absolute() / "checkpoints"  # orbax needs absolute paths
        self._last_saved: int | None = None  # the step whose background write may still fail
        self._keep, self._keep_best, self._read_only = keep, keep_best, read_only
        if not read_only:
            check_own(run_dir)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {self.dir} ({e.strerror}); fix the permissions "
                                "or choose another --run-dir") from None

    @functools.cached_property
    def _manager(self):
        import orbax.checkpoint as ocp

        _quiet_orbax()
        # Creating the step directory in save() itself makes an unwritable directory fail
        # there; created in the background, it left orbax's threads waiting minutes at exit.
        # best_fn makes orbax write each step's metrics, which BestN reads back after a restart.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_preservation(self._keep, self._keep_best),
            best_fn=_saved_at if self._keep_best else None,  # best_mode "max": newest
            create=not self._read_only, read_only=self._read_only, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_array_handlers()),
                    "meta": ocp.JsonCheckpointHandler()}
        for attempt in range(_LISTING_TRIES):
            try:
                return ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)
            except FileNotFoundError:  # a trainer removed an old step while orbax listed them
                if attempt == _LISTING_TRIES - 1:
                    raise

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[0] if steps else None

    def steps(self) -> list[int]:
        """Every complete step, newest first."""
        if not self._opened() and not any(p.name.isdigit() for p in _entries(self.dir)):
            return []  # nothing saved yet: no need for orbax
        return sorted(self._manager.all_steps(), reverse=True)

    def _opened(self) -> bool:
        return "_manager" in self.__dict__

    def set_aside(self, step: int) -> Path:
        """Move an unreadable step out of the way (kept for inspection, never loaded again)."""
        target = self.dir / f"unreadable-{step}"
        (self.dir / str(step)).rename(target)
        self._manager.reload()
        return target

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of `step`: "format", "config" and "data_position", what its
        kind of run needs besides (see `tasks`): "tokenizer" (a character model), "base" and
        "tokens" (GPT-2 transfer), "series" (a series model's standardisation), and "best"
        when the run follows its best validation loss (see `metrics.Best`)."""
        import orbax.checkpoint as ocp

        meta = self._restore(step, "meta", ocp.args.JsonRestore(), lambda e: (
            f"checkpoint step {step} in {self.dir}: metadata unreadable ({type(e).__name__})"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"checkpoint step {step} in {self.dir} is not a transformer-jax "
                            "checkpoint")
        return meta

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The train state of `step`, shaped and sharded like `abstract_state`.

        Call it after checking the step's metadata against the model: a failure then means
        missing or corrupt files.
        """
        return self._restore_state(step, abstract_state, False, lambda e: (
            f"checkpoint step {step} in {self.dir}: state unreadable or does not match this "
            f"model ({type(e).__name__}: {_first_line(e)})"))

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of `step` (what sampling needs), shaped like `abstract_params`."""
        return self._restore_state(step, {"params": abstract_params}, True, lambda e: (
            f"checkpoint step {step} in {self.dir} is unreadable or does not match its "
            f"config ({type(e).__name__}: {_first_line(e)})"))["params"]

    def _restore_state(self, step: int, abstract: Any, partial: bool, describe) -> Any:
        """The state of `step` (with `partial`, only the parts `abstract` names), shaped like
        `abstract`: orbax reads what is stored whatever the target's shape, so the shapes
        are checked here."""
        import jax
        import orbax.checkpoint as ocp

        args = ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=partial)

        def check(restored):
            for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                         jax.tree.leaves(abstract)):
                if got.shape != want.shape:
                    raise ValueError(f"{jax.tree_util.keystr(path)} is {got.shape} in the "
                                     f"checkpoint, {want.shape} in the model")
            return restored

        return self._restore(step, "state", args, describe, check)

    def _restore(self, step: int, item: str, args, describe, check=lambda restored: restored
                 ) -> Any:
        """`item` of `step` restored with orbax's `args` and passed through `check`; any
        failure an UnreadableCheckpoint whose message is `describe(exception)`."""
        import orbax.checkpoint as ocp

        try:
            return check(self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item])
        except Exception as e:  # orbax raises many types for a missing or corrupt file
            _ignore_abandoned_coroutines()
            raise UnreadableCheckpoint(describe(e), step=step) from None

    def save(self, step: int, state: Any, meta: dict[str, Any], *,
             best_loss: float | None = None) -> None:
        """Start writing `step` in the background; `wait()` until it is complete. With
        `best_loss`, its validation loss, the step is the run's best so far: with `keep_best`
        it is kept until a newer best is saved, however many steps follow.

        Raises UserError if this step, or the previous one, cannot be written.
        """
        import orbax.checkpoint as ocp

        self.wait()
        metrics = None if best_loss is None else {"step": step, "val_loss": best_loss}
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                meta=ocp.args.JsonSave({"format": FORMAT, **meta})), metrics=metrics,
                force=True)
        except (OSError, ValueError) as e:  # tensorstore reports I/O errors as ValueError
            raise self._write_error(step, e) from None
        self._last_saved = step

    def wait(self) -> None:
        """Block until the last save is complete; UserError if it could not be written."""
        if not self._opened():
            return
        try:
            self._manager.wait_until_finished()
        except (OSError, ValueError) as e:
            raise self._write_error(self._last_saved, e) from None

    def _write_error(self, step: int | None, e: Exception) -> UserError:
        _ignore_abandoned_coroutines()
        self._manager.reload()  # orbax forgot the steps the failed save was to replace
        latest = self.latest_step()
        kept = f"step {latest} is kept" if latest is not None else "no step is saved yet"
        return UserError(f"cannot write checkpoint {self.dir / str(step)} ({_os_reason(e)}); "
                         f"{kept}; free some space or fix the permissions and rerun, or choose "
                         "another --run-dir")

    def close(self) -> None:
        if self._opened():
            self._manager.close()


def _array_handlers():
    """orbax's handlers for the state's arrays, for this manager alone (not orbax's global
    registry, which a user's own checkpoints share). On CPUs the replicas of an array share one
    memory, so it is written whole: orbax's default there splits each replicated array between
    its devices first, with eager slicing programs: a `fast` run's last save took 0.33-0.41 s
    that way, 0.16-0.20 s this way (benchmarks/RESULTS.md). Elsewhere orbax decides."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    cpu = jax.default_backend() == "cpu"
    return th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(use_replica_parallel=False if cpu else None)),
        (np.ndarray, th.NumpyHandler()), (int, th.ScalarHandler()), (float, th.ScalarHandler()),
        (np.number, th.ScalarHandler()))


def _entries(path: Path) -> list[Path]:
    """What `path` holds (nothing if it is not a directory)."""
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _preservation(keep: int, keep_best: bool):
    """The last `keep` steps, and with `keep_best` the newest step saved with metrics."""
    import orbax.checkpoint as ocp

    latest = ocp.checkpoint_managers.LatestN(keep)
    if not keep_best:
        return latest
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, ocp.checkpoint_managers.BestN(
        get_metric_fn=_saved_at, n=1, keep_checkpoints_without_metrics=False)])


def _saved_at(metrics: dict[str, Any]) -> int:
    """What ranks the steps saved as a best: the newest is the best (see the module's notes)."""
    return metrics["step"]


def _quiet_orbax() -> None:
    """Silence what orbax prints besides the failures RunCheckpoints raises as one line: its
    warnings and logged tracebacks, and the unraisable errors of its abandoned coroutines after
    a failed read or write (tensorstore's late callbacks into a closed event loop included)."""
    for name in ("absl", "asyncio"):  # a filter is added once, however often this runs
        logging.getLogger(name).addFilter(_drop_orbax_records)
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax", False):
        return

    def hook(unraisable) -> None:
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if not (any("orbax" in frame.filename for frame in frames)
                or str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_orbax = True
    sys.unraisablehook = hook


def _ignore_abandoned_coroutines() -> None:
    """After a failed read or write: orbax leaves coroutines that are never awaited, and
    Python warns of each whenever it is collected, often at exit, which would add lines to
    the one-line error. Other code's never-awaited coroutines still warn until then."""
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)


def _drop_orbax_records(record: logging.LogRecord) -> bool:
    """False for a warning or error logged by orbax, or about its files or coroutines (and
    tensorstore's, which it reads and writes with)."""
    text = f"{record.pathname} {record.getMessage()}"
    return not (record.levelno >= logging.WARNING and ("orbax" in text or "tensorstore" in text))


def _os_reason(e: Exception) -> str:
    """The operating system's words for a failed write (tensorstore's errors carry its code)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    return os.strerror(int(code.group(1))) if code else _first_line(e)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""

