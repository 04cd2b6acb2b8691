"""A training run: start or resume in a run directory, train with progress, evaluate, save.

    RUN_DIR/checkpoints/     orbax steps (see checkpoint.py)
    RUN_DIR/metrics.jsonl    one JSON object per log point
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from transformer_jax import data, training
from transformer_jax.checkpoint import RunCheckpoints, UnreadableCheckpoint, check_own
from transformer_jax.config import Config
from transformer_jax.errors import RunStopped, UserError
from transformer_jax.model import Transformer, count_params, init_params, param_shapes
from transformer_jax.tokenizer import DEFAULT_SPECIALS, CharTokenizer, free_specials

# Fields that fix what a checkpoint's parameters and data order mean: they must not change on
# resume. Everything else (learning rate, step count, intervals, dropout) may.
FIXED_ON_RESUME = ("vocab_size", "d_model", "layers", "heads", "d_ff", "activation", "norm",
                   "positions", "max_len", "tie_embeddings", "layer_norm_eps", "head_size",
                   "scan_layers", "batching", "seq_len", "batch_size", "streams",
                   "val_fraction", "split_docs", "min_len", "init", "finetune", "columns",
                   "covariates", "time_column", "head", "optimizer", "seed")
# What differs when another key of the metadata differs.
_META_NAMES = {"tokenizer": "a corpus with another vocabulary",
               "base": "another pretrained model", "tokens": "a corpus with other tokens"}


@dataclass(frozen=True)
class Task:
    """What a run trains, everything but the loop: built by `char_task`, `transfer.task`, ...

    `loss(train)` is the loss function in training or evaluation mode; `init_params()` returns
    fresh trained parameters; `val_rows` is every validation row as (N, B,
    S, ...) batches; `meta` (JSON) identifies the model and data and is saved with every
    checkpoint.
    """

    config: Config
    loss: Callable[[bool], training.LossFn]
    init_params: Callable[[], Any]
    batches: data.Batches
    val_rows: Any
    meta: dict
    unit: str = "char"


def _flat(config: Config) -> dict[str, Any]:
    return {**asdict(config.model), **asdict(config.train)}


def check_resumable(saved: dict, wanted: dict, where: str) -> None:
    """Raise UserError naming the first setting (or metadata entry) in which checkpoint
    metadata `saved` differs from `wanted`'s."""
    a, b = _flat(Config.from_dict(saved["config"])), _flat(Config.from_dict(wanted["config"]))
    for name in FIXED_ON_RESUME:
        if a[name] != b[name]:
            raise UserError(f"{where} was trained with {name}={a[name]!r}, not {b[name]!r}; "
                            "use the same setting, another --run-dir, or --fresh")
    for key in wanted.keys() - {"config"}:
        if saved.get(key) != wanted[key]:
            raise UserError(f"{where} was trained on {_META_NAMES.get(key, 'another ' + key)}; "
                            "use the same --data, another --run-dir, or --fresh")


def load_for_sampling(run_dir: str | Path, step: int | None = None
                      ) -> tuple[Config, Any, Any, int]:
    """(config, tokenizer, params, step) of checkpoint `step` (default: the newest) in
    `run_dir`, ready for `sampling.complete` (a transfer-learning run's head is mapped back to
    the whole vocabulary), or, for a series run, (config, scaler, params, step) for
    `forecast.forecast`.
    """
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
            return (*_load(ckpt, step), step)
        except UnreadableCheckpoint as e:
            older = [s for s in steps if s < step]
            if not older:
                raise
            raise UnreadableCheckpoint(f"{e}; use an older checkpoint with --step {older[0]}"
                                       ) from None
    finally:
        ckpt.close()


def _load(ckpt: RunCheckpoints, step: int) -> tuple[Config, Any, Any]:
    """load_for_sampling's (config, tokenizer or scaler, params) for `step` of `ckpt`."""
    meta = ckpt.meta(step)
    config = Config.from_dict(meta["config"])
    restore = lambda shapes: ckpt.restore_params(step, shapes)
    if config.train.columns is not None:
        from transformer_jax import forecast

        return forecast.for_sampling(config, meta, restore)
    if config.train.init != "scratch":
        from transformer_jax import transfer

        return transfer.for_sampling(config, meta, restore)
    tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
    return config, tokenizer, restore(param_shapes(config.model))


def char_task(config: Config, text: str, n_dev: int, *, tokenizer: CharTokenizer | None = None,
              say=print) -> Task:
    """The lecture's first experiment: a character model trained from scratch on `text`.

    `config.model.vocab_size` is set from the tokenizer (built from `text` unless given).
    """
    if tokenizer is None:
        specials = free_specials(text)
        if specials != DEFAULT_SPECIALS:
            say(f"the corpus uses some of the default special symbols {DEFAULT_SPECIALS}; "
                f"start, end, unknown and pad are {specials} instead")
        tokenizer = CharTokenizer.from_text(text, specials)
    config = config.replace(vocab_size=tokenizer.vocab_size)
    cfg, tcfg = config.model, config.train
    if tcfg.tokens_per_sequence - 1 > cfg.max_len:
        raise UserError(f"--seq-len {tcfg.seq_len} gives {tcfg.tokens_per_sequence - 1} input "
                        f"tokens per row, more than --max-len {cfg.max_len}; raise --max-len")
    batches, val_rows = datasets(tokenizer, text, tcfg, n_dev)
    model = Transformer(cfg)
    return Task(config, lambda train: training.lm_loss(model, tokenizer.pad_id, train=train),
                lambda: init_params(cfg, jax.random.PRNGKey(tcfg.seed)), batches, val_rows,
                {"config": config.to_dict(), "tokenizer": tokenizer.to_dict()})


def datasets(tokenizer, text: str, tcfg, n_dev: int) -> tuple[data.Batches, np.ndarray]:
    """Training batches, and every validation row as (N, B, S) batches for n_dev devices."""
    train_text, val_text = data.split_text(text, tcfg.val_fraction)
    batches = data.train_batches(tokenizer, train_text, tcfg,
                                 row_multiple=n_dev * tcfg.micro_batches)
    eval_batch = data.eval_batch_size(tcfg, n_dev)
    val_rows = data.pad_rows(data.eval_rows(tokenizer, val_text, tcfg), eval_batch,
                             tokenizer.pad_id)
    return batches, val_rows.reshape(-1, eval_batch, batches.row_len)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget the records of steps after `step` (redone after a resume), so none repeats."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False  # a line cut short by a killed process

    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(filter(kept, lines)))


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: Config, text: str, run_dir: str | Path, *, tokenizer: CharTokenizer | None = None,
          fresh: bool = False, devices=None, quiet: bool = False,
          resume_command: str = "the same command", resume_from: str = "latest") -> dict:
    """Train on `text` in `run_dir`, resuming from its newest checkpoint: a character model
    from scratch, or, when `config.train.init` names a GPT-2, transfer learning from it, or,
    when `config.train.columns` names columns, a series model of `text` read as CSV.

    See `fit` for resuming, stopping and the result.
    """
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if config.train.total_steps() <= 0:
        raise UserError("the run has no steps; give --steps N (or --epochs N for stream batching)")
    mesh = training.data_mesh(devices)
    if config.train.columns is not None:
        from transformer_jax import forecast

        task = forecast.task(config, text, mesh, say=say)
    elif config.train.init == "scratch":
        task = char_task(config, text, mesh.devices.size, tokenizer=tokenizer, say=say)
    else:
        from transformer_jax import transfer

        task = transfer.task(config, text, mesh, say=say, quiet=quiet)
    return fit(task, run_dir, mesh, fresh=fresh, quiet=quiet, resume_command=resume_command,
               resume_from=resume_from)


def fit(task: Task, run_dir: str | Path, mesh, *, fresh: bool = False, quiet: bool = False,
        resume_command: str = "the same command", resume_from: str = "latest") -> dict:
    """Train `task` in `run_dir` on the devices of `mesh`, resuming from its newest checkpoint.

    `resume_from="last-good"` skips unreadable newest checkpoints (see `_resume`).
    SIGINT or SIGTERM ends the run after the current compiled chunk of steps with a complete
    checkpoint (RunStopped, exit code 130 or 143); a second SIGINT ends the process at once,
    leaving the last complete checkpoint. Returns the final metrics {"step", "val_loss", ...}.

    Under `jax.distributed` every process runs this with the same arguments and a run directory
    they share; each places only its own devices' rows of every batch, and only process 0
    prints and writes metrics (orbax coordinates the checkpoint writes).
    """
    lead = jax.process_index() == 0
    quiet = quiet or not lead
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    run_dir, config, batches = Path(run_dir), task.config, task.batches
    tcfg = config.train
    total_steps = tcfg.total_steps()
    tx = training.optimizer(tcfg)
    replicated = NamedSharding(mesh, P())
    initial = task.init_params()  # compiled and cheap; its shapes are also the restore target's
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(lambda p: training.init_state(p, tcfg), initial))

    if fresh and run_dir.exists() and lead:
        check_own(run_dir)  # never delete another program's files
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    _sync("fresh")
    _check_writable(run_dir)
    ckpt = RunCheckpoints(run_dir, keep=tcfg.keep)
    try:
        state, start = _resume(ckpt, task.meta, abstract, run_dir, resume_from, say)
    except UserError:
        ckpt.close()
        raise
    if start:
        say(f"resuming from step {start}")
        if lead:
            _drop_metrics_after(run_dir / "metrics.jsonl", start)
    else:
        state = fresh_state(initial, tcfg, mesh)
    if start >= total_steps:
        say(f"nothing to do: run directory {run_dir} is already at step {start} "
            f"of {total_steps}; give a larger --steps to continue")
        ckpt.close()
        return {"step": start}

    say(json.dumps(config.to_dict()))
    say(f"trained parameters: {count_params(state.params):,}  devices: {mesh.devices.size} x "
        f"{mesh.devices.flat[0].platform}  {task.unit}s/step: {batches.tokens_per_step:,}")
    chunk_fn = training.compile_train_chunk(mesh, task.loss(True), tx, batches.row_len,
                                            tcfg.micro_batches)
    eval_fn = training.compile_evaluate(mesh, task.loss(False))
    source = place(batches.source, replicated)
    val_all = place(task.val_rows, NamedSharding(mesh, P(None, "data")))
    starts_sharding = NamedSharding(mesh, P(None, "data"))
    val_some = (jax.tree.map(lambda v: v[:tcfg.eval_batches], val_all) if tcfg.eval_batches
                else val_all)
    schedule = jax.jit(training.learning_rate(tcfg))  # one compiled call, not ten eager ops
    metrics_path = run_dir / "metrics.jsonl"

    target = tcfg.target_loss
    step, t0, last = start, time.perf_counter(), {}
    bar = tqdm(total=total_steps, initial=start, disable=quiet, unit="step", dynamic_ncols=True,
               file=sys.stdout)
    note = (lambda *a: None) if quiet else bar.write  # bar.write ignores `disable`
    stop = _StopRequests()
    try:
        while step < total_steps:
            n = min(tcfg.steps_per_call, total_steps - step,
                    tcfg.eval_every - step % tcfg.eval_every,
                    tcfg.save_every - step % tcfg.save_every)
            tick = time.perf_counter()
            state, out = chunk_fn(state, source,
                                  place(batches.starts(step, n), starts_sharding))
            losses, finite = np.asarray(out["loss"]), np.asarray(out["finite"])
            if not finite.all():
                bad = [step + 1 + int(i) for i in np.flatnonzero(~finite)]
                if tcfg.on_nan == "stop":
                    raise RunStopped(
                        f"the loss or gradient is not finite at step {bad[0]}; stopped without "
                        f"saving (last good checkpoint: step {ckpt.latest_step()}); lower --lr, "
                        "or give --on-nan skip", exit_code=1)
                note(f"skipped the update of step(s) {', '.join(map(str, bad))}: "
                          "non-finite loss or gradient")
                losses = losses[finite] if finite.any() else losses
            step += n
            tok_s = n * batches.tokens_per_step / (time.perf_counter() - tick)
            bar.update(n)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:,.0f}")
            last = {"step": step, "train_loss": float(losses.mean()), "tokens_per_s": tok_s,
                    "lr": float(schedule(step - 1)), "wall_time": time.perf_counter() - t0}
            reached = False
            if step % tcfg.eval_every == 0 or step == total_steps:
                ev = training.evaluate(eval_fn, state.params,
                                       val_all if step == total_steps else val_some)
                if target is not None and ev["loss"] <= target and step < total_steps:
                    ev = training.evaluate(eval_fn, state.params, val_all)  # confirm on all
                    reached = ev["loss"] <= target
                last["val_loss"] = ev["loss"]
                bits = ""
                if task.unit != "value":  # cross-entropy: also in bits per token
                    last["val_bpc"] = ev["bpc"]
                    bits = f" ({ev['bpc']:.3f} bits/{task.unit})"
                note(f"step {step}: train loss {last['train_loss']:.4f}, "
                     f"val loss {ev['loss']:.4f}{bits}")
            if lead:
                _log(metrics_path, last)
            stop.agree()
            if step % tcfg.save_every == 0 or step == total_steps or reached or stop.signal:
                ckpt.save(step, state, {**task.meta, "data_position": step})
            if reached:
                note(f"validation loss {last['val_loss']:.4f} reached the target {target}")
                break
            if stop.signal:
                ckpt.wait()
                raise RunStopped(f"interrupted at step {step}, resume with {resume_command}",
                                 exit_code=128 + stop.signal)
    finally:
        stop.restore()
        bar.close()
        try:
            ckpt.wait()
        finally:
            ckpt.close()
    say(f"checkpoint: {run_dir / 'checkpoints' / str(step)}")
    return last


def _resume(ckpt: RunCheckpoints, meta: dict, abstract, run_dir: Path, resume_from: str, say):
    """(restored state, its step) from the newest checkpoint, or (None, 0) when there is none.

    An unreadable newest step is an error, unless `resume_from` is "last-good": then each
    unreadable step is set aside, with a message, and the newest readable one is used. A
    readable step of another model or corpus is always an error.
    """
    for step in ckpt.steps():
        try:
            check_resumable(ckpt.meta(step), meta, f"run directory {run_dir}")
            return ckpt.restore(step, abstract), step
        except UnreadableCheckpoint as e:
            if resume_from != "last-good":
                raise UserError(f"{e}; give --resume-from last-good to fall back to the newest "
                                "readable step, or --fresh") from None
            say(f"{e}: set aside as {ckpt.set_aside(step)}")
    return None, 0


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
        if jax.process_count() > 1:
            self.signal = int(multihost_utils.process_allgather(np.int32(self.signal)).max())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fresh_state(params, tcfg, mesh) -> training.TrainState:
    """A new training state for `params` (host or device arrays), replicated over `mesh` as the
    compiled chunk takes it: laid out once, not re-laid out on every call."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(lambda p: training.init_state(p, tcfg), out_shardings=replicated)(
        place(params, replicated))


def place(tree, sharding: NamedSharding):
    """Host arrays, the same in every process, as global arrays laid out by `sharding`; each
    process copies only the shards of its own devices."""
    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(one, tree)


def _sync(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"transformer-jax {name}")


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
