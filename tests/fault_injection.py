"""Fault injection for train.py: hard kills at chosen moments, a disk that fills up mid-run, a
second trainer started on the same run directory.

    python tests/fault_injection.py --write-table docs/faults.md

Each scenario starts `train.py` on a tiny model in a subprocess, watches the run directory until
the run reaches the scenario's moment, injects the fault (SIGKILL, or a file-size limit that
makes every larger write fail as a full disk would), and then reruns the same command. It
records what the first run left (complete steps, orbax's temporary directories, any step that
cannot be read back), the step the rerun resumed from, and whether the final parameters equal
those of an uninterrupted run with the same seed. `tests/test_faults.py` runs the same
scenarios and asserts on them; `--write-table` writes their outcomes as docs/faults.md.
"""

from __future__ import annotations

import argparse
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: import the checkout, not an installed copy

# 30 steps one at a time, a checkpoint every 5, all kept, on one CPU device; dropout on, so
# resuming must also restore the random key stream.
TINY = ["--preset", "fast", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64",
        "--seq-len", "32", "--max-len", "32", "--batch-size", "4", "--steps", "30",
        "--save-every", "5", "--eval-every", "5", "--steps-per-call", "1", "--cpu-devices", "1",
        "--keep", "100", "--dropout", "0.1"]
CORPUS = ("Now is the winter of our discontent made glorious summer by this sun of York; and "
          "all the clouds that lour'd upon our house in the deep bosom of the ocean buried.\n"
          "To be, or not to be, that is the question: whether 'tis nobler in the mind to "
          "suffer the slings and arrows of outrageous fortune.\n") * 12
# Larger than every metrics or metadata file of a TINY run, smaller than its array files.
FULL_DISK_BYTES = 32 * 1024
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def command(data: Path, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "train.py", *TINY, *args, "--data", str(data),
            "--run-dir", str(run_dir)]


# --- where a run is, seen from outside ----------------------------------------------------------


def step_dirs(run_dir: Path) -> list[int]:
    """Steps whose directory is visible under checkpoints/, complete or not."""
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def temporary_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(f"*{TMP_SUFFIX}*"))


def unreadable_steps(run_dir: Path) -> list[int]:
    """Visible steps whose metadata or parameters cannot be read back (half-written ones)."""
    from transformer_jax.checkpoint import RunCheckpoints
    from transformer_jax.config import Config
    from transformer_jax.errors import UserError
    from transformer_jax.model import param_shapes

    if not step_dirs(run_dir):
        return []
    bad = []
    ckpt = RunCheckpoints(run_dir, read_only=True)
    try:
        for step in step_dirs(run_dir):
            try:
                config = Config.from_dict(ckpt.meta(step)["config"])
                ckpt.restore_params(step, param_shapes(config.model))
            except UserError:
                bad.append(step)
    finally:
        ckpt.close()
    return bad


def final_params(run_dir: Path) -> tuple[int, list]:
    """(step, parameter leaves as numpy arrays) of the newest checkpoint."""
    import jax
    import numpy as np

    from transformer_jax.run import load_for_sampling

    trained = load_for_sampling(run_dir)
    params, step = trained.params, trained.step
    return step, [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


# --- scenarios ------------------------------------------------------------------------------------


def kill(proc: subprocess.Popen, cmd: list[str]) -> None:
    proc.send_signal(signal.SIGKILL)


def second_trainer(proc: subprocess.Popen, cmd: list[str]) -> str:
    """Start the same command again while `proc` trains: what it printed, as a table cell.
    `proc` is paused meanwhile (SIGSTOP, then SIGCONT), so that it cannot finish first."""
    proc.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGCONT)
    last = (second.stderr.strip().splitlines() or [""])[-1]
    return f"exit {second.returncode}: `{_shorten(last)}`"


def fill_disk(proc: subprocess.Popen, cmd: list[str]) -> None:
    """From now on every write that takes a file past FULL_DISK_BYTES fails (EFBIG), in the C++
    threads of orbax's array store as in Python: a disk that is full for large files. Python
    ignores SIGXFSZ, so the write fails instead of killing the process."""
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (FULL_DISK_BYTES, resource.RLIM_INFINITY))


def saving(step: int) -> Callable[[Path], bool]:
    """True once orbax is writing the arrays of `step` into its temporary directory."""
    return lambda run_dir: any(
        (run_dir / "checkpoints").glob(f"{step}{TMP_SUFFIX}*/state*/**/d/*"))


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str
    when: str
    reached: Callable[[Path], bool]  # polled on the run directory; then `inject` the fault
    inject: Callable[[subprocess.Popen, list[str]], str | None] = kill  # -> what it saw
    expected_exit: int = -signal.SIGKILL
    mid_save: bool = False  # the fault must land while orbax writes a step
    args: tuple[str, ...] = ()  # more flags, for both runs


SCENARIOS = [
    Scenario("kill-at-start", "SIGKILL", "at start-up, before the first step",
             lambda run_dir: (run_dir / "checkpoints").is_dir()),
    Scenario("kill-saving-first", "SIGKILL", "while the first checkpoint (step 5) is written",
             saving(5), mid_save=True),
    Scenario("kill-after-save", "SIGKILL", "just after the checkpoint of step 10 is complete",
             lambda run_dir: 10 in step_dirs(run_dir)),
    Scenario("kill-saving", "SIGKILL", "while the checkpoint of step 20 is written", saving(20),
             mid_save=True),
    Scenario("disk-full", f"full disk (writes past {FULL_DISK_BYTES // 1024} KiB fail), "
             "`--keep 1`", "once the checkpoint of step 10 is complete",
             lambda run_dir: 10 in step_dirs(run_dir), fill_disk, expected_exit=2,
             args=("--keep", "1")),
    Scenario("second-trainer", "a second `train.py` on the same run directory",
             "once the checkpoint of step 10 is complete",
             lambda run_dir: 10 in step_dirs(run_dir), second_trainer, expected_exit=0),
]


@dataclass
class Outcome:
    scenario: Scenario
    exit_code: int  # of the run that met the fault
    stderr: str  # of the run that met the fault
    complete: list[int]  # steps visible after the fault, every one readable unless `unreadable`
    unreadable: list[int]  # visible steps that cannot be read back: must stay empty
    temporary: list[str]  # orbax temporary directories left by the fault (never loaded)
    resumed_from: int | None  # from the rerun's "resuming from step N"; None: started afresh
    rerun_exit: int
    temporary_after_rerun: list[str]
    unreadable_after_rerun: list[int]
    params_equal: bool  # bit for bit, against the uninterrupted run
    max_abs_diff: float
    seen: str | None = None  # what the fault itself reported (the second trainer's line)


def run_scenario(scenario: Scenario, data: Path, run_dir: Path, reference: tuple[int, list],
                 timeout: float = 120) -> Outcome:
    """Inject `scenario`'s fault into a run of `command(data, run_dir)`, rerun it, compare
    its final parameters with `reference` (`final_params` of an uninterrupted run)."""
    import numpy as np

    cmd = command(data, run_dir, *scenario.args)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    try:
        while not scenario.reached(run_dir):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{scenario.name}: the run ended or stalled before the moment "
                                   f"of its fault ({scenario.when})")
            time.sleep(0.002)
        seen = scenario.inject(proc, cmd)
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    complete, temporary = step_dirs(run_dir), temporary_dirs(run_dir)
    unreadable = unreadable_steps(run_dir)

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    resumed = re.search(r"resuming from step (\d+)", rerun.stdout)
    step, params = final_params(run_dir) if rerun.returncode == 0 else (0, [])
    ref_step, ref_params = reference
    equal = step == ref_step and len(params) == len(ref_params) and all(
        a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(params, ref_params))
    diff = max((float(np.max(np.abs(a - b))) for a, b in zip(params, ref_params)
                if a.shape == b.shape), default=float("inf"))
    return Outcome(scenario, proc.returncode, err,
                   [s for s in complete if s not in unreadable], unreadable, temporary,
                   int(resumed.group(1)) if resumed else None, rerun.returncode,
                   temporary_dirs(run_dir), unreadable_steps(run_dir), equal, diff, seen)


def reference_run(data: Path, run_dir: Path, *args: str) -> tuple[int, list]:
    """`final_params` of the scenarios' command (with more flags `args`) run once without
    faults."""
    proc = subprocess.run(command(data, run_dir, *args), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"the uninterrupted run failed:\n{proc.stderr}")
    return final_params(run_dir)


# --- the table ------------------------------------------------------------------------------------


def table(outcomes: list[Outcome]) -> str:
    """docs/faults.md: what each scenario did and how the run came through."""
    rows = ["| fault | injected | first run ended | left behind | rerun | final parameters |",
            "|---|---|---|---|---|---|"]
    for o in outcomes:
        ended = (f"killed (signal {-o.exit_code})" if o.exit_code < 0 else "exit 0, complete"
                 if o.exit_code == 0 else
                 f"exit {o.exit_code}: `{_shorten(o.stderr.strip().splitlines()[-1])}`")
        if o.seen:
            ended += f"; the second trainer: {o.seen}"
        steps = "step" + "s" * (len(o.complete) > 1)
        left = ", ".join([f"{steps} {', '.join(map(str, o.complete))}" if o.complete
                          else "no complete step"]
                         + [f"`{t}`" for t in o.temporary]
                         + [f"unreadable step {s}" for s in o.unreadable])
        rerun = ", ".join(
            [f"resumed from step {o.resumed_from}" if o.resumed_from is not None
             else "started at step 0"]
            + ([f"exit {o.rerun_exit}"] if o.rerun_exit else [])
            + [f"left `{t}`" for t in o.temporary_after_rerun]
            + [f"left unreadable step {s}" for s in o.unreadable_after_rerun]
            + (["removed the temporary directory"]
               if o.temporary and not o.temporary_after_rerun else []))
        final = ("equal, bit for bit" if o.params_equal
                 else f"differ (max abs diff {o.max_abs_diff:.3g})")
        rows.append(f"| {o.scenario.fault} | {o.scenario.when} | {ended} | {left} | {rerun} | "
                    f"{final} |")
    return "\n".join([
        "# Faults tried, and how training came through them",
        "",
        "Written by `python tests/fault_injection.py --write-table docs/faults.md`; do not edit "
        "by hand. Each row starts `train.py` on a tiny model (`" + " ".join(TINY) + "`), "
        "injects the fault when the run reaches the moment given, then reruns the same "
        "command. *Left behind* lists the complete checkpoint steps (every one is read back), "
        "orbax's temporary directories (never loaded, removed by the next run) and any "
        "half-written step (there must be none). *Final parameters* compares the rerun's "
        "last checkpoint with an uninterrupted run of the same command.",
        "",
        *rows,
        "",
        "Other faults have their own tests: a read-only checkpoint directory "
        "(`tests/test_faults.py`), corrupt, truncated or foreign checkpoints "
        "(`tests/test_run.py`, `tests/test_checkpoint.py`, `tests/test_faults.py`, "
        "`tests/test_bad_input.py`), "
        "SIGINT/SIGTERM and non-finite losses (`tests/test_run.py`), bad corpora, configs, "
        "flags and run directories (`tests/test_cli.py`, `tests/test_bad_input.py`).",
        ""])


def _shorten(line: str) -> str:
    """An error line with its temporary path shortened to the part that matters."""
    line = re.sub(r"/\S*/(checkpoints/\d+)", r"…/\1", line).split("; free some space")[0]
    return re.sub(r"run directory /\S*/(\S+) is in use by a training run \(process \d+ on \S+\)",
                  r"run directory …/\1 is in use by a training run (process N on HOST)",
                  line).split("; wait for it")[0]


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write-table", metavar="PATH", help="write the outcomes as markdown here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "corpus.txt"
        data.write_text(CORPUS, encoding="utf-8")
        reference = reference_run(data, work / "uninterrupted")
        outcomes = []
        for scenario in SCENARIOS:
            o = run_scenario(scenario, data, work / scenario.name, reference)
            outcomes.append(o)
            print(f"{scenario.name}: exit {o.exit_code}, left steps {o.complete}, resumed from "
                  f"{o.resumed_from}, parameters equal: {o.params_equal}", flush=True)
    text = table(outcomes)
    if args.write_table:
        Path(args.write_table).write_text(text, encoding="utf-8")
    else:
        print(text)


if __name__ == "__main__":
    main()
