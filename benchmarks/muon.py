"""What stacking Muon's matrices by shape and splitting them over the devices is worth:
train.py's compiled chunk of the `fast` preset with optax's Muon (one matrix at a time, on
every device), with transformer_jax.muon unsplit, and split over the data mesh (what train.py
runs), interleaved calls in one run.

    python benchmarks/muon.py --data ../shared/data/tinyshakespeare.txt [--batch-size 12 32]

optax's Muon is the one tests/test_muon.py checks the library's against.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[12, 32],
                   help="rows per step, one measurement each")
    p.add_argument("--steps", type=int, default=50, help="steps per compiled chunk")
    p.add_argument("--repeats", type=int, default=6, help="timed calls of each; the median")
    args = p.parse_args()
    common.use_cpu_cores()
    import jax
    import numpy as np
    from test_muon import optax_muon

    from transformer_jax import parallel, tasks, training
    from transformer_jax.config import preset
    from transformer_jax.errors import UserError
    from transformer_jax.tokens import Corpus

    try:
        corpus = Corpus.scan(args.data)
    except UserError as e:
        p.error(str(e))  # one line and exit code 2
    mesh = parallel.data_mesh()
    figures = {}
    for batch_size in args.batch_size:
        config = preset("fast").replace(steps_per_call=args.steps, batch_size=batch_size)
        task = tasks.char.build(config, corpus, mesh, say=lambda *a: None)
        tcfg, batches = task.config.train, task.batches
        source = parallel.place(np.asarray(batches.source), parallel.replicated(mesh))
        starts = parallel.place(batches.starts(0, args.steps), parallel.split_batches(mesh))
        variants = {"optax": optax_muon(tcfg), "stacked": training.optimizer(tcfg),
                    "split": training.optimizer(tcfg, mesh)}
        chunks = {name: training.compile_train_chunk(mesh, task.train_loss, tx, batches.row_len)
                  for name, tx in variants.items()}
        states = {name: training.fresh_state(task.init_params(), tcfg, mesh) for name in chunks}
        times: dict[str, list[float]] = {name: [] for name in chunks}
        for repeat in range(args.repeats + 1):  # the first call of each compiles
            for name, chunk in chunks.items():
                start = time.perf_counter()
                states[name], metrics = chunk(states[name], source, starts, None)
                jax.block_until_ready(metrics)
                if repeat:
                    times[name].append((time.perf_counter() - start) / args.steps)
        ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        print(f"batch {batch_size}: " + ", ".join(f"{name} {v:.2f} ms/step"
                                                  for name, v in ms.items()), flush=True)
        figures[f"split_over_optax_b{batch_size}"] = ms["split"] / ms["optax"]
        figures[f"stacked_over_optax_b{batch_size}"] = ms["stacked"] / ms["optax"]
    common.report(**figures)


if __name__ == "__main__":
    main()
