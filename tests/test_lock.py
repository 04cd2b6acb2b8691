"""transformer_jax.lock: one trainer per run directory; readers never wait for it.

References: a second `train.py` on a directory in use (refused, naming the holder), the same
after the holder is killed with SIGKILL (starts at once), and a reader sampling the newest step
again and again while a run saves into the directory (every read complete).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fault_injection import CORPUS, REPO, command, step_dirs

from transformer_jax import cli
from transformer_jax.errors import UserError
from transformer_jax.lock import LOCK_NAME, RunLock


def test_a_held_lock_is_refused_with_its_holder_and_free_once_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match=f"run directory {tmp_path} is in use by a training run "
                       rf"\(process {os.getpid()} on {socket.gethostname()}\)"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def _started(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    """Wait until `proc` holds the run directory's lock (its name is in the lock file)."""
    deadline = time.monotonic() + timeout
    lock = run_dir / LOCK_NAME
    while not (lock.exists() and lock.read_text().startswith(f"{proc.pid} ")):
        assert proc.poll() is None and time.monotonic() < deadline, "the trainer never started"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_one_after_kill_9_starts_at_once(tmp_path):
    """The holder trains far longer than the test waits, so it is still running when the
    second trainer asks for the directory, however fast the machine."""
    data, run_dir = tmp_path / "corpus.txt", tmp_path / "run"
    data.write_text(CORPUS)
    cmd = command(data, run_dir, "--steps", "100000")
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    third = None
    try:
        _started(first, run_dir)
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"error: run directory {run_dir} is in use by a training run (process {first.pid} "
            f"on {socket.gethostname()}); wait for it to end, or choose another --run-dir"]
        first.kill()  # SIGKILL: no handler runs, the lock file stays, the lock goes
        first.wait(timeout=60)
        assert (run_dir / LOCK_NAME).exists()
        third = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        _started(third, run_dir)
    finally:
        for proc in (first, third):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=60)


@pytest.mark.slow
def test_a_reader_samples_the_newest_step_while_a_run_saves_into_it(tmp_path, capsys):
    """The run goes on (and saves every 5 steps) until the reader has read the newest step at
    two different steps, then is stopped: no race between the two speeds."""
    data, run_dir = tmp_path / "corpus.txt", tmp_path / "run"
    data.write_text(CORPUS)
    trainer = subprocess.Popen(command(data, run_dir, "--keep", "2", "--steps", "100000"),
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reads = set()
    try:
        deadline = time.monotonic() + 300
        while len(reads) < 2:
            assert trainer.poll() is None, trainer.stderr.read()
            assert time.monotonic() < deadline, "the reader never saw the run move on"
            if not step_dirs(run_dir):
                time.sleep(0.05)
                continue
            before = max(step_dirs(run_dir))
            cli.sample_main(["--run-dir", str(run_dir), "--max-new-tokens", "5"])
            out = capsys.readouterr().out
            assert out.endswith("\n")  # a sample printed (a failed read exits 2)
            reads.add(before)
    finally:
        trainer.kill()
        trainer.wait(timeout=60)
