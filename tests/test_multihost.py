"""Multi-host training through jax.distributed, proven with two local processes.

Two `train.py` processes on 127.0.0.1 (CPU backend, gloo collectives), each with 2 local
devices, train a tiny float64 model; a single process with 4 devices trains the same global
batches. Their parameters must agree to 1e-10, and the 2-process checkpoint must restore in a
1-process run. Every wait is bounded: a hung process is killed and the test fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240
TINY = ["--preset", "fast", "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32",
        "--seq-len", "16", "--max-len", "16", "--batch-size", "8", "--dtype", "float64",
        "--steps", "4", "--steps-per-call", "2", "--eval-every", "2", "--save-every", "2",
        "--warmup-steps", "0", "--decay-steps", "0"]
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife.\n") * 20

COMPARE = """
import json, sys
import jax, numpy as np
from transformer_jax import run
a, b = (run.load_for_sampling(d) for d in sys.argv[1:3])
diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
           for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(a.params)})
print(json.dumps({"diff": diff, "steps": [a.step, b.step], "dtypes": dtypes}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**out, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}


def train(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *TINY, *map(str, args)], cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Wait for every process (bounded), killing them all if one hangs."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a training process hung")
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("multihost")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    port = free_port()
    two = [train("--data", corpus, "--run-dir", tmp / "two", "--cpu-devices", 2,
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i)
           for i in range(2)]
    one = [train("--data", corpus, "--run-dir", tmp / "one", "--cpu-devices", 4)]
    results = finish(two + one)
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    compare = subprocess.run([sys.executable, "-c", COMPARE, tmp / "two", tmp / "one"], cwd=REPO,
                             env={**env(), "JAX_NUM_CPU_DEVICES": "1"}, capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert compare.returncode == 0, compare.stderr[-3000:]
    return {"tmp": tmp, "results": results,
            "compare": json.loads(compare.stdout.strip().splitlines()[-1])}


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    compare = runs["compare"]
    assert compare["dtypes"] == ["float64"]
    assert compare["steps"] == [4, 4]
    assert compare["diff"] < 1e-10, compare


def test_the_two_process_checkpoint_restores_in_one_process(runs):
    # The comparison above loaded it in a single process; its final step is complete.
    assert (runs["tmp"] / "two" / "checkpoints" / "4").is_dir()


def test_only_process_zero_reports_and_writes_metrics(runs):
    (_, lead_out, _), (_, other_out, _) = runs["results"][:2]
    assert "devices:" in lead_out and "checkpoint:" in lead_out
    assert "4 x cpu" in lead_out  # the global mesh: 2 processes x 2 devices
    # gloo's own connection notes aside ("[Gloo] Rank 1 is connected to 3 peer ranks. ..."),
    # which C++ threads write to the same stdout, in pieces that CI has seen split over lines
    ours = [line for line in other_out.splitlines() if line.strip()
            and "[Gloo]" not in line and "peer ranks" not in line]
    assert ours == []
    lines = (runs["tmp"] / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


def test_distributed_flags_go_together(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--coordinator", "127.0.0.1:1234",
                           "--run-dir", tmp_path], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --coordinator")


def test_a_second_multi_process_run_on_a_directory_in_use_is_refused_in_every_process(
        tmp_path):
    from transformer_jax.lock import RunLock

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = RunLock(run_dir).acquire()  # the run already training there
    try:
        port = free_port()
        results = finish([train("--data", corpus, "--run-dir", run_dir, "--cpu-devices", 2,
                                "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                                "--process-id", i) for i in range(2)])
    finally:
        held.release()
    (lead, _, lead_err), (other, _, other_err) = results
    assert lead == other == 2
    assert f"error: run directory {run_dir} is in use by a training run (process {os.getpid()}" \
        in lead_err
    assert f"error: run directory {run_dir} is in use by another training run" in other_err
    assert not (run_dir / "checkpoints").exists()
