"""Faults during training: hard kills (also in the middle of an asynchronous checkpoint save), a
disk that fills up, a checkpoint directory that turns read-only, damaged checkpoints.

What must hold (README, "Reliability"): a fault loses at most the work since the newest complete
checkpoint; no step directory is ever visible half-written; rerunning the same command resumes
from the newest complete step and ends with the parameters of an uninterrupted run, bit for bit;
a failed write or an unreadable checkpoint is one `error:` line naming the path, exit code 2,
and no older step is removed. The kill and full-disk scenarios live in tests/fault_injection.py,
which also writes docs/faults.md from them.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import fault_injection as fi
import jax
import pytest

from transformer_jax import cli, parallel, run
from transformer_jax.config import preset
from transformer_jax.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(fi.CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus) -> tuple[int, list]:
    return fi.reference_run(corpus, tmp_path_factory.mktemp("runs") / "uninterrupted")


@pytest.mark.parametrize("scenario", fi.SCENARIOS, ids=lambda s: s.name)
def test_a_fault_loses_only_the_work_since_the_newest_complete_checkpoint(
        scenario, tmp_path, corpus, uninterrupted):
    if scenario.inject is fi.fill_disk and not hasattr(resource, "prlimit"):
        pytest.skip("needs Linux's prlimit to fill the disk of a running process")
    o = fi.run_scenario(scenario, corpus, tmp_path / "run", uninterrupted)
    assert o.exit_code == scenario.expected_exit, o.stderr
    if scenario.mid_save:
        assert o.temporary, "the fault missed the save it was meant to interrupt"
    assert o.unreadable == [], "a half-written step is visible"
    assert o.resumed_from == (max(o.complete) if o.complete else None)
    assert o.rerun_exit == 0
    assert o.temporary_after_rerun == [] and o.unreadable_after_rerun == []
    assert o.params_equal, f"final parameters differ by up to {o.max_abs_diff}"
    if scenario.inject is fi.second_trainer:
        assert o.seen == ("exit 2: `error: run directory …/run is in use by a training run "
                          "(process N on HOST)`"), o.seen
        assert o.complete[-1] == 30  # the first run went on to its end, undisturbed
    if scenario.inject is fi.fill_disk:
        lines = o.stderr.strip().splitlines()
        assert len(lines) == 1, o.stderr
        newest = max(o.complete)
        assert lines[0].startswith(f"error: cannot write checkpoint {tmp_path / 'run'}"), lines
        assert f"(File too large); step {newest} is kept" in lines[0]
        assert o.complete == [newest]  # --keep 1: the failed save removed nothing


# --- a kill during a run that stops early -------------------------------------------------------

# Validated on a sentence it never trains on: the validation loss falls, then rises, and
# --early-stop 3 ends the 100 steps early (at step 50, best 35, for this seed).
OVERFIT = ("To be, or not to be, that is the question. " * 54
           + "Whether tis nobler in the mind to suffer. " * 6)
EARLY = fi.Scenario("kill-early-stop", "SIGKILL", "just after the checkpoint of step 40, a "
                    "stale evaluation after the best", lambda run_dir: 40 in fi.step_dirs(run_dir),
                    args=("--steps", "100", "--keep-best", "--early-stop", "3", "--keep", "1"))


def _best(run_dir: Path) -> tuple[int, dict]:
    """(newest step, its metadata's best)."""
    from transformer_jax.checkpoint import RunCheckpoints

    ckpt = RunCheckpoints(run_dir, read_only=True)
    try:
        return ckpt.latest_step(), ckpt.meta(ckpt.latest_step())["best"]
    finally:
        ckpt.close()


def test_a_killed_run_resumes_its_early_stop_count_and_stops_where_an_uninterrupted_one_did(
        tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(OVERFIT, encoding="utf-8")
    reference = fi.reference_run(data, tmp_path / "uninterrupted", *EARLY.args)
    stop, best = _best(tmp_path / "uninterrupted")
    assert best["step"] < 40 < stop < 100 and best["stale"] == 3, (stop, best)
    o = fi.run_scenario(EARLY, data, tmp_path / "run", reference)
    assert o.exit_code == -9 and o.resumed_from == max(o.complete) >= 40, o
    assert best["step"] in o.complete  # the best outlived the pruning of later steps
    assert o.rerun_exit == 0 and o.params_equal, o.max_abs_diff
    assert _best(tmp_path / "run") == (stop, best)
    assert fi.step_dirs(tmp_path / "run") == fi.step_dirs(tmp_path / "uninterrupted") == [
        best["step"], stop]


# --- a read-only checkpoint directory, in this process -------------------------------------------

TINY = ["--preset", "fast", "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32",
        "--seq-len", "16", "--max-len", "16", "--batch-size", "4", "--save-every", "5",
        "--eval-every", "5", "--steps-per-call", "5", "--keep", "1"]


def _read_only(ckpt_dir: Path, monkeypatch) -> None:
    """Make `ckpt_dir` refuse new entries: chmod for real, or for root, whom permissions do not
    stop, os.mkdir patched to fail there with EACCES (orbax creates each step's directory with
    it before writing anything)."""
    if os.geteuid() != 0:
        ckpt_dir.chmod(0o555)
        return
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == ckpt_dir:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


def test_a_read_only_checkpoint_directory_is_one_error_line_and_keeps_the_last_step(
        tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(parallel, "use_cpu_devices", lambda n: None)  # set once per process
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir.absolute() / "checkpoints"
    args = [*TINY, "--data", str(corpus), "--run-dir", str(run_dir)]
    cli.train_main([*args, "--steps", "10"])
    with monkeypatch.context() as patch:
        _read_only(ckpt_dir, patch)
        try:
            with pytest.raises(SystemExit) as stop:
                cli.train_main([*args, "--steps", "20"])
        finally:
            ckpt_dir.chmod(0o755)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.strip().splitlines() == [
        f"error: cannot write checkpoint {ckpt_dir / '15'} (Permission denied); step 10 is "
        "kept; free some space or fix the permissions and rerun, or choose another --run-dir"]
    assert fi.step_dirs(run_dir) == [10] and fi.unreadable_steps(run_dir) == []

    cli.train_main([*args, "--steps", "20"])  # writable again: resumes
    assert "resuming from step 10" in capsys.readouterr().out
    assert fi.step_dirs(run_dir) == [20]


# --- damaged checkpoints ------------------------------------------------------------------------


def _array_files(step_dir: Path) -> list[Path]:
    """The files of orbax's array store that hold the arrays' bytes."""
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


# Damage tests/test_run.py and tests/test_checkpoint.py do not already make.
DAMAGE = {
    "truncated-array-files": lambda step: [_truncate(f) for f in _array_files(step)],
    "empty-array-files": lambda step: [f.write_bytes(b"") for f in _array_files(step)],
    "missing-array-manifest": lambda step: (step / "state" / "manifest.ocdbt").unlink(),
    "missing-state": lambda step: shutil.rmtree(step / "state"),
    "truncated-metadata": lambda step: _truncate(step / "meta" / "metadata"),
}
# train.py's defaults (the `default` preset) but tiny, so the command line can resume it.
SMALL = preset("default").replace(d_model=16, layers=1, heads=2, d_ff=32, seq_len=16,
                                  max_len=16, batch_size=4, steps=10, steps_per_call=5,
                                  save_every=5, eval_every=5)
TEXT = fi.CORPUS


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with complete steps 5 and 10."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run.train(SMALL, TEXT, run_dir, quiet=True, devices=jax.devices()[:1])
    return run_dir


def _damaged(trained: Path, tmp_path: Path, damage: str) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    DAMAGE[damage](run_dir / "checkpoints" / "10")
    return run_dir


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_step_is_named_and_never_loaded(trained, tmp_path, damage, caplog):
    """One line each time, and nothing said of the reads orbax abandoned: no warning of
    never-awaited coroutines nor asyncio's errors of never-retrieved futures, which Python
    prints to stderr whenever they are collected, adding lines to the error."""
    run_dir = _damaged(trained, tmp_path, damage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"step 10 .*unreadable.*--resume-from last-good") \
                as e:
            run.train(SMALL.replace(steps=15), TEXT, run_dir, quiet=True,
                      devices=jax.devices()[:1])
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match=r"step 10 .*unreadable.*--step 5$") as e:
            run.load_for_sampling(run_dir)
        assert "\n" not in str(e.value)
        del e  # its traceback holds the abandoned coroutines
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert fi.step_dirs(run_dir) == [5, 10]  # nothing removed unasked


@pytest.mark.parametrize("damage", ["truncated-array-files", "empty-array-files",
                                    "missing-array-manifest"])
def test_resuming_from_a_damaged_step_prints_one_line(trained, tmp_path, corpus, damage):
    """The whole process's stderr: the tracebacks of orbax's abandoned reads must not show."""
    run_dir = _damaged(trained, tmp_path, damage)
    flags = ["--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32", "--seq-len",
             "16", "--max-len", "16", "--batch-size", "4", "--steps", "15", "--cpu-devices", "1"]
    proc = subprocess.run([sys.executable, "train.py", *flags, "--data", str(corpus),
                           "--run-dir", str(run_dir)], cwd=fi.REPO, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: checkpoint step 10 ") and "unreadable" in lines[0]
