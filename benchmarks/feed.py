"""Training rows gathered on the devices from a corpus placed there, or on the host from its
token file a chunk ahead: steps per second of each, in alternating rounds of one process.

    python benchmarks/feed.py --data ../shared/data/tinyshakespeare.txt --rounds 3

Each round trains the `--preset` (default `fast`) for `--steps` steps into a new run directory
both ways (`data.ON_DEVICE_BYTES` set to 0 sends the rows through the host), after a first
untimed run of each that compiles; the time is the training loop's between its first and its
last log point before the end (`wall_time` in metrics.jsonl: no compilation, no evaluation).
Prints each round's ratio and `host_to_device` (the median: above 1, the host is
slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the corpus (a text file)")
    p.add_argument("--preset", default="fast", help="the preset trained")
    p.add_argument("--steps", type=int, default=300, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both ways")
    args = p.parse_args()
    common.use_cpu_cores()
    from transformer_jax import data, run
    from transformer_jax.config import preset
    from transformer_jax.errors import UserError
    from transformer_jax.tokens import Corpus

    try:
        corpus = Corpus.scan(args.data)
    except UserError as e:
        p.error(str(e))
    config = preset(args.preset).replace(steps=args.steps, eval_every=args.steps,
                                         save_every=args.steps, eval_batches=1)
    limit, ratios = data.ON_DEVICE_BYTES, []
    with tempfile.TemporaryDirectory() as tmp:

        def seconds(way: str, name: str) -> float:
            """Seconds per step."""
            data.ON_DEVICE_BYTES = 0 if way == "host" else limit
            run_dir = Path(tmp) / f"{way}-{name}"
            run.train(config, corpus, run_dir, quiet=True)
            first, *_, last, _ = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            return (last["wall_time"] - first["wall_time"]) / (last["step"] - first["step"])

        for way in ("device", "host"):
            seconds(way, "warm-up")
        for r in range(args.rounds):
            device, host = seconds("device", str(r)), seconds("host", str(r))
            ratios.append(host / device)
            print(f"round {r}: device {1 / device:.2f} steps/s, host {1 / host:.2f} steps/s, "
                  f"host/device time {ratios[-1]:.3f}",
                  flush=True)
    common.report(host_to_device=statistics.median(ratios), rounds=args.rounds)


if __name__ == "__main__":
    main()
