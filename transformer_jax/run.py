"""A training run: start or resume in a run directory, train with progress, evaluate, save.

    RUN_DIR/checkpoints/     orbax steps (see checkpoint.py)
    RUN_DIR/metrics.jsonl    one JSON object per log point (see metrics.py)
    RUN_DIR/tensorboard/     the same, as TensorBoard event files (--tensorboard)

The loop never names a kind of run: `tasks.kind_of` builds what it trains.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from transformer_jax import data, parallel, tasks, timing, tokens, training
from transformer_jax.checkpoint import RunCheckpoints, UnreadableCheckpoint, check_own
from transformer_jax.config import FIXED_ON_RESUME, Config
from transformer_jax.errors import RunStopped, UserError
from transformer_jax.lock import RunLock
from transformer_jax.metrics import Best, MetricsLog
from transformer_jax.model import count_params
from transformer_jax.tasks import Task, Trained
from transformer_jax.tokens import Corpus

# What differs when another key of the metadata differs.
_META_NAMES = {"tokenizer": "a corpus with another vocabulary",
               "base": "another pretrained model", "tokens": "a corpus with other tokens"}


def load_for_sampling(run_dir: str | Path, step: int | str | None = None) -> Trained:
    """The model of checkpoint `step` (default: the newest; "best": the best kept by
    --keep-best) in `run_dir`, ready for `sampling.complete` (`.tokenizer`) or
    `forecast.forecast` (`.scaler`); see `tasks.load`."""
    return tasks.load(run_dir, step)


def train(config: Config, text: str | Corpus, run_dir: str | Path, *, fresh: bool = False,
          devices=None, quiet: bool = False, resume_command: str = "the same command",
          resume_from: str = "latest", corpus: str | Path | None = None) -> dict:
    """Train on `text` in `run_dir`, resuming from its newest checkpoint: a model from
    scratch, or, when `config.train.init` names a GPT-2, transfer learning from it, or, when
    `config.train.columns` names columns, a series model of `text` read as CSV.

    `text` is a string, or a `Corpus` read from a file in pieces (`Corpus.scan`: a corpus larger
    than memory). Its file, or `corpus`, the file or directory a string was read from, is
    recorded in every checkpoint (with the text's sha256), so that `evaluate` finds the run's
    validation split again. See `fit` for resuming, stopping and the result.
    """
    if config.train.total_steps() <= 0:
        raise UserError("the run has no steps; give --steps N (or --epochs N for stream batching)")
    mesh = parallel.data_mesh(devices)
    text = text if isinstance(text, Corpus) else Corpus.of_text(text)
    task = tasks.kind_of(config).build(config, text, mesh, say=_printer(quiet), quiet=quiet)
    timing.mark("task built: tokenizer, training and validation rows, model")
    path = text.path or corpus
    about = {"corpus": {**text.record(), "path": str(Path(path).absolute())}} if path else {}
    return fit(task, run_dir, mesh, fresh=fresh, quiet=quiet, resume_command=resume_command,
               resume_from=resume_from, about=about)


def fit(task: Task, run_dir: str | Path, mesh, *, fresh: bool = False, quiet: bool = False,
        resume_command: str = "the same command", resume_from: str = "latest",
        about: dict | None = None) -> dict:
    """Train `task` in `run_dir` on the devices of `mesh`, resuming from its newest checkpoint.

    `resume_from="last-good"` skips unreadable newest checkpoints (see `_resume`).
    SIGINT or SIGTERM ends the run after the current compiled chunk of steps with a complete
    checkpoint (RunStopped, exit code 130 or 143); a second SIGINT ends the process at once,
    leaving the last complete checkpoint. Returns the final metrics {"step", "val_loss", ...};
    a run that follows its best validation loss (--keep-best, --early-stop) adds "best_step",
    "best_loss" and "stopped_early" (True when --early-stop ended it, with a checkpoint).

    `about` (JSON) is saved with every checkpoint besides `task.meta`, but, unlike it, not
    checked on resume (where the corpus was read from, say).

    Under `jax.distributed` every process runs this with the same arguments and a run directory
    they share; each places only its own devices' rows of every batch, and only process 0
    prints and writes metrics (orbax coordinates the checkpoint writes).
    """
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    lock = _lock(run_dir)
    try:
        return _fit(task, run_dir, mesh, fresh, quiet or not parallel.is_lead(), resume_command,
                    resume_from, about or {})
    finally:
        lock.release()


def _lock(run_dir: Path) -> RunLock:
    """The run directory's lock, taken by process 0 for every process of the run; UserError in
    every process when it is held by another run."""
    lock, error = RunLock(run_dir), ""
    if parallel.is_lead():
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    if parallel.max_over_processes(int(bool(error))):
        raise UserError(error or f"run directory {run_dir} is in use by another training run; "
                        "wait for it to end, or choose another --run-dir")
    return lock


def _fit(task: Task, run_dir: Path, mesh, fresh: bool, quiet: bool, resume_command: str,
         resume_from: str, about: dict) -> dict:
    """`fit` in a run directory that this run holds."""
    say, tcfg = _printer(quiet), task.config.train
    log = MetricsLog(run_dir, tensorboard=tcfg.tensorboard)
    ckpt, state, start, best = _open(task, run_dir, mesh, fresh, resume_from, log, say)
    done = _nothing_to_do(run_dir, tcfg, start, best)
    if done:
        say(done)
        ckpt.close()
        return {"step": start, **_best_result(tcfg, best)}
    say(json.dumps(task.config.to_dict()))
    say(f"trained parameters: {count_params(state.params):,}  devices: {mesh.devices.size} x "
        f"{mesh.devices.flat[0].platform}  {task.kind.unit(task.config)}s/step: "
        f"{task.batches.tokens_per_step:,}")
    timing.mark(f"state {'restored' if start else 'initialised'}")
    loop = _Loop.compile(task, mesh, log, start)
    timing.mark("data placed on the devices")
    say(loop.feed.describe())
    bar = tqdm(total=tcfg.total_steps(), initial=start, disable=quiet, unit="step",
               dynamic_ncols=True, file=sys.stdout)
    note = (lambda *a: None) if quiet else bar.write  # bar.write ignores `disable`
    stop, step, last, early = _StopRequests(), start, {}, False
    try:
        while step < tcfg.total_steps():
            state, last, reached = loop.chunk(state, step, ckpt, note, bar)
            step = last["step"]
            stop.agree()
            best, improved = _follow_best(best, last, tcfg)
            early = best.patience_spent(tcfg.early_stop)
            if _due(step, tcfg.save_every, tcfg) or reached or stop.signal or early or improved:
                ckpt.save(step, state, {**about, **task.meta, "data_position": step,
                                        **_best_meta(tcfg, best)},
                          best_loss=best.val_loss if improved else None)
            if reached:
                note(f"validation loss {last['val_loss']:.4f} reached the target "
                     f"{tcfg.target_loss}")
                break
            if early:
                note(f"early stop at step {step}: {_best_line(task, best)}")
                break
            if stop.signal:
                ckpt.wait()
                raise RunStopped(f"interrupted at step {step}, resume with {resume_command}",
                                 exit_code=128 + stop.signal)
    finally:
        _close(stop, bar, ckpt, log)
    say(f"checkpoint: {run_dir / 'checkpoints' / str(step)}")
    if tcfg.keep_best and not early and best.step is not None:
        say(_best_line(task, best))
    return {**last, **_best_result(tcfg, best)}


def _nothing_to_do(run_dir: Path, tcfg, start: int, best: Best) -> str:
    """Why a run resumed at `start` has nothing to do, or "" if it has."""
    if start >= tcfg.total_steps():
        return (f"nothing to do: run directory {run_dir} is already at step {start} of "
                f"{tcfg.total_steps()}; give a larger --steps to continue")
    if best.patience_spent(tcfg.early_stop):
        return (f"nothing to do: run directory {run_dir} stopped early at step {start}: "
                f"{best.stale} evaluations without an improvement since its best, step "
                f"{best.step} (--early-stop {tcfg.early_stop}); give a larger --early-stop, or "
                "--early-stop 0, to continue")
    return ""


def _follow_best(best: Best, record: dict, tcfg) -> tuple[Best, bool]:
    """The best after the chunk that ended in `record`, and whether its step is to be saved
    as a new best (--keep-best)."""
    if not tcfg.tracks_best or "val_loss" not in record:
        return best, False
    best = best.update(record["step"], record["val_loss"], tcfg.min_delta)
    return best, tcfg.keep_best and best.step == record["step"]


def _best_meta(tcfg, best: Best) -> dict:
    """The checkpoint metadata entry of the best, when the run follows it."""
    return {"best": best.to_meta()} if tcfg.tracks_best else {}


def _best_result(tcfg, best: Best) -> dict:
    """What `fit` returns about the best, when the run follows it."""
    if not tcfg.tracks_best:
        return {}
    return {"best_step": best.step, "best_loss": best.val_loss,
            "stopped_early": best.patience_spent(tcfg.early_stop)}


def _best_line(task: Task, best: Best) -> str:
    """A line about the best validation loss (and the stale evaluations that ended the run)."""
    tcfg = task.config.train
    where = f" ({task.kind.reader} it with --step best)" if tcfg.keep_best else ""
    stale = (f"no improvement of at least {tcfg.min_delta} in {best.stale} evaluations; "
             if best.patience_spent(tcfg.early_stop) else "")
    return f"{stale}best: step {best.step}, val loss {best.val_loss:.4f}{where}"


def _printer(quiet: bool) -> Callable[..., None]:
    return (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))


def _due(step: int, every: int, tcfg) -> bool:
    """Whether `step` is a multiple of `every`, or the run's last."""
    return step % every == 0 or step == tcfg.total_steps()


def _open(task: Task, run_dir: Path, mesh, fresh: bool, resume_from: str, log: MetricsLog, say
          ) -> tuple[RunCheckpoints, training.TrainState, int, Best]:
    """The run directory's checkpoints (emptied first when `fresh`, with the metrics of `log`),
    and the state to continue from with its step and the best so far: the newest
    checkpoint's, or a new one at step 0. `log` forgets the records after that step."""
    tcfg, lead = task.config.train, parallel.is_lead()
    initial = task.init_params()  # compiled and cheap; its shapes are also the restore target's
    replicated = parallel.replicated(mesh)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(lambda p: training.init_state(p, tcfg), initial))
    if fresh and run_dir.exists() and lead:
        check_own(run_dir)  # never delete another program's files
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        log.clear()
    parallel.sync("fresh")
    ckpt = RunCheckpoints(run_dir, keep=tcfg.keep, keep_best=tcfg.keep_best)
    try:
        state, start, meta = _resume(ckpt, task.meta, abstract, run_dir, resume_from, say)
    except UserError:
        ckpt.close()
        raise
    log.resume(start)
    if not start:
        return ckpt, training.fresh_state(initial, tcfg, mesh), 0, Best()
    say(f"resuming from step {start}")
    return ckpt, state, start, Best.from_meta(meta)


@dataclass(frozen=True)
class _Loop:
    """The compiled steps and evaluation of a task, with its data placed on the devices."""

    task: Task
    train_chunk: Callable
    evaluate_fn: Callable
    schedule: Callable
    feed: _Feed
    val: _Validation
    frozen: Any
    log: MetricsLog
    started: float  # time.perf_counter() when the loop began
    start: int  # the step it began at

    @classmethod
    def compile(cls, task: Task, mesh, log: MetricsLog, start: int) -> _Loop:
        tcfg, batches = task.config.train, task.batches
        tx = training.optimizer(tcfg, mesh)
        return cls(task, training.compile_train_chunk(mesh, task.train_loss, tx, batches.row_len,
                                                      tcfg.micro_batches),
                   training.compile_evaluate(mesh, task.eval_loss),
                   jax.jit(training.learning_rate(tcfg)),  # one compiled call, not ten eager ops
                   _Feed(batches, mesh), _Validation(task.val_rows, tcfg, mesh),
                   parallel.place(task.frozen, parallel.replicated(mesh)), log,
                   time.perf_counter(), start)

    def chunk(self, state, step: int, ckpt: RunCheckpoints, note, bar
              ) -> tuple[training.TrainState, dict, bool]:
        """Run the steps up to the next log point after `step`, evaluate when due, record the
        metrics: (new state, the record, whether the target loss is reached)."""
        tcfg, batches = self.task.config.train, self.task.batches
        n = _chunk_steps(tcfg, step)
        tick = time.perf_counter()
        state, out = self.train_chunk(state, *self.feed(step, n), self.frozen)
        self.feed.prefetch(step + n, _chunk_steps(tcfg, step + n))  # while the chunk runs
        losses = _finite_losses(out, step, tcfg.on_nan, ckpt, note)
        first = step == self.start
        step += n
        if first or step == self._first_evaluation():
            how = "compiled (or loaded from the compilation cache) and run" if first else "run"
            timing.mark(f"steps {step - n + 1}-{step} {how}")
        tok_s = n * batches.tokens_per_step / (time.perf_counter() - tick)
        bar.update(n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:,.0f}")
        record = {"step": step, "train_loss": float(losses.mean()), "tokens_per_s": tok_s,
                  "lr": float(self.schedule(step - 1)),
                  "wall_time": time.perf_counter() - self.started}
        reached = False
        if _due(step, tcfg.eval_every, tcfg):
            reached = self.evaluate(state, step, record, note)
            if step == self._first_evaluation():
                timing.mark("first evaluation")
        self.log.write(record)
        return state, record, reached

    def _first_evaluation(self) -> int:
        """The step of this loop's first evaluation."""
        every, total = self.task.config.train.eval_every, self.task.config.train.total_steps()
        return min((self.start // every + 1) * every, total)

    def evaluate(self, state, step: int, record: dict, note) -> bool:
        """Add the validation loss (and bits per unit) to `record`, on the whole split at the
        end, when the target seems reached (True if it is) and when the run follows its best,
        else on `eval_batches`."""
        tcfg, kind = self.task.config.train, self.task.kind
        target, last = tcfg.target_loss, step == tcfg.total_steps()
        ev = training.evaluate(self.evaluate_fn, state.params, self.val.groups(whole=last),
                               self.frozen)
        reached = False
        if target is not None and ev["loss"] <= target and not last:
            ev = training.evaluate(self.evaluate_fn, state.params,  # confirm on the whole split
                                   self.val.groups(whole=True), self.frozen)
            reached = ev["loss"] <= target
        record["val_loss"] = ev["loss"]
        bits = ""
        if kind.cross_entropy:
            record["val_bpc"] = ev["bpc"]
            bits = f" ({ev['bpc']:.3f} bits/{kind.unit(self.task.config)})"
        note(f"step {step}: train loss {record['train_loss']:.4f}, val loss {ev['loss']:.4f}"
             f"{bits}")
        return reached


def _chunk_steps(tcfg, step: int) -> int:
    """Steps of the compiled chunk that starts after `step`: up to the next log point, or
    evaluation, or checkpoint (0 at the end)."""
    return min(tcfg.steps_per_call, tcfg.total_steps() - step,
               tcfg.eval_every - step % tcfg.eval_every, tcfg.save_every - step % tcfg.save_every)


class _Validation:
    """The validation batches in groups of one shape (`training.eval_groups`): `eval_batches`
    of them when evaluations during training take only those, else all of them, at most
    `data.ON_DEVICE_BYTES // 8` bytes a group. Placed on the devices once, unless there are
    more than `data.ON_DEVICE_BYTES` of them: then each group is placed as it is evaluated."""

    def __init__(self, rows_NxBxS, tcfg, mesh):
        n = len(jax.tree.leaves(rows_NxBxS)[0])
        size = sum(a.nbytes for a in jax.tree.leaves(rows_NxBxS))
        self.some = tcfg.eval_batches and not tcfg.tracks_best  # a best compares whole splits
        group = min(tcfg.eval_batches if self.some else n, n,
                    max(1, data.ON_DEVICE_BYTES // 8 * n // max(size, 1)))
        self._place = lambda tree: parallel.place(tree, parallel.split_batches(mesh))
        self.on_host = size > data.ON_DEVICE_BYTES
        self._groups = [(g if self.on_host else self._place(g), valid)
                        for g, valid in training.eval_groups(rows_NxBxS, group)]

    def groups(self, whole: bool):
        """The groups to evaluate: all of them if `whole`, else those of `eval_batches`."""
        chosen = self._groups if whole or not self.some else self._groups[:1]
        if not self.on_host:
            return chosen
        return ((self._place(g), valid) for g, valid in chosen)  # placed one by one as used


class _Feed:
    """Each chunk's training rows for the compiled steps: (source, starts) on the devices.

    A training set of up to `data.ON_DEVICE_BYTES` is placed on every device once and the
    chunk gathers its rows there; a larger one (a token file's map) stays on the host: a
    chunk's rows are gathered from it here, while the chunk before runs, and handed over as a
    source of their own.
    """

    def __init__(self, batches: data.Batches, mesh):
        self.batches, self.mesh = batches, mesh
        self.on_host = data.stays_on_host(batches.source)
        self.source = None if self.on_host else parallel.place(batches.source,
                                                               parallel.replicated(mesh))
        self.ahead = None  # (step, n, what __call__ returns) of the next chunk

    def describe(self) -> str:
        size = sum(a.nbytes for a in jax.tree.leaves(self.batches.source)) / 1e6
        return (f"training rows gathered on the host from {size:,.0f} MB of tokens, a chunk "
                "ahead" if self.on_host else
                f"training rows gathered on the devices from {size:,.1f} MB placed there")

    def __call__(self, step: int, n: int) -> tuple[Any, Any]:
        if self.ahead is not None and self.ahead[:2] == (step, n):
            return self.ahead[2]
        return self._place(step, n)

    def prefetch(self, step: int, n: int) -> None:
        """Gather and hand over the rows of the chunk of `n` steps after `step` now."""
        self.ahead = (step, n, self._place(step, n)) if self.on_host and n else None

    def _place(self, step: int, n: int) -> tuple[Any, Any]:
        starts, source = self.batches.starts(step, n), self.source
        if self.on_host:
            row_len = self.batches.row_len
            source = parallel.place(tokens.rows(self.batches.source, starts, row_len).reshape(-1),
                                    parallel.replicated(self.mesh))
            starts = (np.arange(starts.size, dtype=np.int32) * row_len).reshape(starts.shape)
        return source, parallel.place(starts, parallel.split_batches(self.mesh))


def _finite_losses(out: dict, step: int, on_nan: str, ckpt: RunCheckpoints, note) -> np.ndarray:
    """The chunk's losses of the steps after `step` whose update was kept; a non-finite step
    stops the run (`on_nan` "stop") or is reported as skipped."""
    losses, finite = np.asarray(out["loss"]), np.asarray(out["finite"])
    if finite.all():
        return losses
    bad = [step + 1 + int(i) for i in np.flatnonzero(~finite)]
    if on_nan == "stop":
        raise RunStopped(f"the loss or gradient is not finite at step {bad[0]}; stopped without "
                         f"saving (last good checkpoint: step {ckpt.latest_step()}); lower --lr, "
                         "or give --on-nan skip", exit_code=1)
    note(f"skipped the update of step(s) {', '.join(map(str, bad))}: non-finite loss or "
         "gradient")
    return losses[finite] if finite.any() else losses


def _close(stop, bar, ckpt: RunCheckpoints, log: MetricsLog) -> None:
    """Restore the signal handlers, close the progress bar, finish writing and close."""
    stop.restore()
    bar.close()
    log.close()
    try:
        ckpt.wait()
    finally:
        ckpt.close()


def check_resumable(saved: dict, wanted: dict, where: str) -> None:
    """Raise UserError naming the first setting (or metadata entry) in which checkpoint
    metadata `saved` differs from `wanted`'s."""
    a, b = (_settings(Config.from_dict(meta["config"])) for meta in (saved, wanted))
    for name in FIXED_ON_RESUME:
        if a[name] != b[name]:
            raise UserError(f"{where} was trained with {name}={a[name]!r}, not {b[name]!r}; "
                            "use the same setting, another --run-dir, or --fresh")
    for key in wanted.keys() - {"config"}:
        if saved.get(key) != wanted[key]:
            raise UserError(f"{where} was trained on {_META_NAMES.get(key, 'another ' + key)}; "
                            "use the same --data, another --run-dir, or --fresh")


def _resume(ckpt: RunCheckpoints, meta: dict, abstract, run_dir: Path, resume_from: str, say):
    """(restored state, its step, its metadata) from the newest checkpoint, or (None, 0, {})
    when there is none.

    An unreadable newest step is an error, unless `resume_from` is "last-good": then each
    unreadable step is set aside, with a message, and the newest readable one is used. A
    readable step of another model or corpus is always an error.
    """
    for step in ckpt.steps():
        try:
            saved = ckpt.meta(step)
            check_resumable(saved, meta, f"run directory {run_dir}")
            return ckpt.restore(step, abstract), step, saved
        except UnreadableCheckpoint as e:
            if resume_from != "last-good":
                raise UserError(f"{e}; give --resume-from last-good to fall back to the newest "
                                "readable step, or --fresh") from None
            say(f"{e}: set aside as {ckpt.set_aside(step)}")
    return None, 0, {}


def _settings(config: Config) -> dict[str, Any]:
    """Every field of `config` by its flat name."""
    return {**asdict(config.model), **asdict(config.train)}


class _StopRequests:
    """Records the first SIGINT/SIGTERM instead of dying mid-step; a second SIGINT exits at once.

    Orbax renames a step directory only once it is complete, so exiting at once never leaves a
    half-written checkpoint behind, only an ignored temporary one.
    """

    def __init__(self):
        self.signal = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal and signum == signal.SIGINT:
            print("\ninterrupted again: exiting now; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this chunk of steps "
              "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

    def agree(self) -> None:
        """Across processes: stop when any process was asked to (a collective; one process
        stopping alone would leave the others waiting in the next step)."""
        self.signal = parallel.max_over_processes(self.signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_writable(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run directory {run_dir} is not writable ({e.strerror}); "
                        "choose another --run-dir") from None
