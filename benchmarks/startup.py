"""Start-up: seconds to the first training step and to the first new token, against importing JAX.

    python benchmarks/startup.py --data ../shared/data/tinyshakespeare.txt [--repeats 3]

Times whole processes from launch: `train.py --preset fast --steps 1 --verbose` until it logs
that its first step ran (a one-step run: its first compiled chunk is that step), and
`sample.py --verbose` on that run until it logs its first new tokens. Each is timed with an
empty compilation cache (`cold`: everything compiles) and with the cache the cold run left
(`warm`: what a user's later runs find), and divided by the time of `python -c "import jax"`
in the same run, the machine-independent figure: the aim is a warm train.py at its first
step within 2x the bare import (`train_warm_ratio` <= 2). The phases of the warm train.py are
printed as its --verbose lines. Each figure is the median of --repeats processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FIRST_STEP = "steps 1-1 compiled"  # train.py --verbose: the first chunk ran
SAMPLE_FIRST_TOKEN = "first new tokens"  # sample.py --verbose


def until_line(cmd: list[str], marker: str, cache: Path, timeout: float = 600
               ) -> tuple[float, list[str]]:
    """(seconds from launch until a line of standard error holds `marker`, the --verbose
    phase lines); the process then runs to its end (bounded by `timeout`)."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    seconds, phases = None, []
    try:
        for line in proc.stderr:
            if line.startswith("["):
                phases.append(line.rstrip())
            if seconds is None and marker in line:
                seconds = time.perf_counter() - t0
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    if proc.returncode != 0 or seconds is None:
        sys.exit(f"{' '.join(cmd[1:3])} failed ({proc.returncode}) or never logged {marker!r}")
    return seconds, phases


def import_jax_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import jax"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    p.add_argument("--repeats", type=int, default=3, help="processes per figure; the median")
    p.add_argument("--new-tokens", type=int, default=500, help="sample.py --max-new-tokens")
    args = p.parse_args()
    runs = {key: [] for key in ("import_jax", "train_cold", "train_warm", "sample_cold",
                                "sample_warm")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir, cache, warm_phases = tmp / "run", tmp / "xla", []
        train = [sys.executable, str(ROOT / "train.py"), "--preset", "fast", "--data",
                 args.data, "--run-dir", str(run_dir), "--steps", "1", "--fresh", "--verbose"]
        sample = [sys.executable, str(ROOT / "sample.py"), "--run-dir", str(run_dir),
                  "--max-new-tokens", str(args.new_tokens), "--verbose"]
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits all
            runs["import_jax"].append(import_jax_seconds())
            shutil.rmtree(cache, ignore_errors=True)
            runs["train_cold"].append(until_line(train, TRAIN_FIRST_STEP, cache)[0])
            seconds, warm_phases = until_line(train, TRAIN_FIRST_STEP, cache)
            runs["train_warm"].append(seconds)
            shutil.rmtree(cache, ignore_errors=True)
            runs["sample_cold"].append(until_line(sample, SAMPLE_FIRST_TOKEN, cache)[0])
            runs["sample_warm"].append(until_line(sample, SAMPLE_FIRST_TOKEN, cache)[0])
    median = {key: statistics.median(values) for key, values in runs.items()}
    print("phases of the last warm train.py --preset fast --steps 1:")
    print("\n".join(f"  {line}" for line in warm_phases))
    bare, timed = median.pop("import_jax"), median
    common.report(import_jax_seconds=round(bare, 2),
                  **{f"{key}_seconds": round(seconds, 2) for key, seconds in timed.items()},
                  **{f"{key}_ratio": round(seconds / bare, 2) for key, seconds in timed.items()},
                  train_warm_ratio_met=timed["train_warm"] / bare <= 2.0)


if __name__ == "__main__":
    main()
