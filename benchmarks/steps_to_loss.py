"""How many steps variants of a preset's recipe (`fast` by default) need to reach a validation
loss: the search behind the `fast` preset. Each variant trains in this process (2 host
devices, as train.py) and is evaluated on the whole validation split every --eval-every steps.

    python benchmarks/steps_to_loss.py --data ../shared/data/tinyshakespeare.txt \\
        "optimizer=muon" "optimizer=adamw lr=6e-3 steps=1400 decay_steps=1400"

A variant is space-separated `field=value` changes to the preset (values as in a config file:
numbers, or strings without quotes). One line per variant, then the usual last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse(variant: str) -> dict:
    """'a=1 b=x' -> {"a": 1, "b": "x"} (JSON values where they parse, else strings)."""
    changes = {}
    for item in variant.split():
        name, _, value = item.partition("=")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
    return changes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    p.add_argument("--target", type=float, default=1.886, help="validation loss to reach")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--preset", default="fast", help="the preset the variants change")
    p.add_argument("variants", nargs="+", help="changes to the fast preset, e.g. 'lr=1e-2'")
    args = p.parse_args()
    common.use_cpu_cores()
    from transformer_jax import run
    from transformer_jax.config import preset
    from transformer_jax.data import read_text

    text = read_text(args.data)
    figures = {}
    for i, variant in enumerate(args.variants):
        config = preset(args.preset).replace(eval_batches=0, eval_every=args.eval_every,
                                        **parse(variant))
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            run.train(config, text, run_dir, quiet=True)
            seconds = time.perf_counter() - start
            records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").open()]
        losses = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        reached = next((step for step, loss in losses if loss <= args.target), None)
        print(f"{variant or '(preset)'}: reached at step {reached}; "
              + ", ".join(f"{s}: {v:.4f}" for s, v in losses[-4:])
              + f"; {seconds:.1f} s in process", flush=True)
        figures[f"reached_{i}"] = reached if reached is not None else "no"
        figures[f"final_{i}"] = round(losses[-1][1], 4)
    common.report(**figures)


if __name__ == "__main__":
    main()
