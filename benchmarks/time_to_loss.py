"""Whole-process wall time for the `fast` preset to reach a validation loss.

    python benchmarks/time_to_loss.py --data ../shared/data/tinyshakespeare.txt --target 1.886

Each repeat runs `train.py --preset fast --target-loss T` in a fresh process with its own seed
and times the process from launch to exit (imports, compilation and evaluation included). The
reported loss is the run's last evaluation over the whole validation split (every
non-overlapping window of its last 10%).

The repeats share a persistent compilation cache that starts empty: the first run compiles
(`seconds_cold`), later ones load the compiled programs as a user's reruns do.

With PyTorch installed, the same run also times nanoGPT's baby CPU recipe
(`torch_reference.py train`: its shape, optimizer, schedule and 2,000 iterations, judged on
the whole validation split as ours is) as a whole process, once, before our repeats, and
prints `reference_seconds`, `reference_val_loss` and `speedup` (reference seconds over our
median). Target: speedup >= 8 with every seed at or under 1.886.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_run(data: str, target: float, seed: int, extra: list[str], cache: str
            ) -> tuple[float, int, float]:
    """(seconds, steps, val_loss) of one whole training process."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, str(ROOT / "train.py"), "--preset", "fast", "--data", data,
               "--run-dir", run_dir, "--seed", str(seed), "--target-loss", str(target), *extra]
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"train.py failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").open()]
    last = [r for r in records if "val_loss" in r][-1]
    return seconds, last["step"], last["val_loss"]


def reference_run(data: str) -> tuple[float, float]:
    """(seconds, whole-split val loss) of nanoGPT's baby recipe, whole process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("torch_reference.py")),
                           "train", "--data", data], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"torch_reference.py failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, json.loads(proc.stdout.splitlines()[-1])["val_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    p.add_argument("--target", type=float, default=1.886, help="validation loss to reach")
    p.add_argument("--repeats", type=int, default=1, help="runs with seeds 0..n-1; median")
    p.add_argument("--no-reference", action="store_true",
                   help="skip nanoGPT's recipe even where PyTorch is installed")
    p.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = p.parse_args()
    reference = {}
    if not args.no_reference and importlib.util.find_spec("torch") is not None:
        ref_seconds, ref_val = reference_run(args.data)
        print(f"nanoGPT baby recipe (PyTorch): {ref_seconds:.2f} s, val loss {ref_val:.4f}",
              flush=True)
        reference = {"reference_seconds": round(ref_seconds, 2),
                     "reference_val_loss": round(ref_val, 4)}
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        for seed in range(args.repeats):
            seconds, steps, val = one_run(args.data, args.target, seed, args.extra, cache)
            print(f"seed {seed}: {seconds:.2f} s, {steps} steps, val loss {val:.4f}"
                  f"{' (compiling: empty cache)' if seed == 0 else ''}", flush=True)
            runs.append((seconds, steps, val))
    seconds, steps, val = sorted(runs)[len(runs) // 2]  # the median run by time
    if reference:
        reference["speedup"] = round(reference["reference_seconds"] / seconds, 2)
    common.report(seconds=round(seconds, 2), steps=steps, val_loss=round(val, 4),
                  reached=all(v <= args.target for _, _, v in runs),
                  max_seconds=round(max(r[0] for r in runs), 2),
                  seconds_cold=round(runs[0][0], 2), **reference)


if __name__ == "__main__":
    main()
