"""What the training step's design choices are worth, measured against the alternatives in one
run: train.py's compiled chunk (many steps per call in `lax.scan`, batches gathered on device
from start positions, the old state donated) against the same chunk without donation, against
batches gathered on the host and copied in for every chunk, and against one call per step with
host batches (the usual Python training loop).

    python benchmarks/step_options.py --data ../shared/data/tinyshakespeare.txt [--preset fast]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    p.add_argument("--preset", default="fast", help="model and batch shape")
    p.add_argument("--steps", type=int, default=50, help="steps per compiled chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the best counts")
    args = p.parse_args()
    common.use_cpu_cores()
    import jax
    import numpy as np

    from transformer_jax import parallel, tasks, training
    from transformer_jax.config import preset
    from transformer_jax.errors import UserError
    from transformer_jax.tokens import Corpus

    try:
        corpus = Corpus.scan(args.data)
    except UserError as e:
        p.error(str(e))  # one line and exit code 2
    mesh = parallel.data_mesh()
    task = tasks.char.build(preset(args.preset).replace(steps_per_call=args.steps), corpus, mesh,
                            say=lambda *a: None)
    tcfg, batches = task.config.train, task.batches
    replicated, split_batches = parallel.replicated(mesh), parallel.split_batches(mesh)
    tx = training.optimizer(tcfg, mesh)
    loss = task.train_loss
    donated = training.compile_train_chunk(mesh, loss, tx, batches.row_len)
    kept = jax.jit(donated.__wrapped__,
                   in_shardings=(replicated, replicated, split_batches, replicated),
                   out_shardings=(replicated, replicated))
    step = lambda state, rows: training.train_step(state, rows, loss_fn=loss, tx=tx)
    host_chunk = jax.jit(lambda state, rows: jax.lax.scan(step, state, rows),
                         in_shardings=(replicated, split_batches),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    host_step = jax.jit(step, in_shardings=(replicated, parallel.split_rows(mesh)),
                        out_shardings=(replicated, replicated), donate_argnums=0)

    source_np = np.asarray(batches.source)
    source = parallel.place(source_np, replicated)
    starts_np = batches.starts(0, args.steps)  # (K, B)
    starts = parallel.place(starts_np, split_batches)
    host_rows = lambda: source_np[starts_np[..., None] + np.arange(batches.row_len)]  # (K, B, S)
    fresh = lambda: training.fresh_state(task.init_params(), tcfg, mesh)

    def timed(name, call):
        state = fresh()

        def once():
            nonlocal state
            state, out = call(state)
            jax.block_until_ready(out)

        seconds = common.best_seconds(once, args.repeats) / args.steps
        print(f"{name}: {seconds * 1e3:.2f} ms/step", flush=True)
        return seconds

    def one_per_step(state):
        rows = host_rows()
        for k in range(args.steps):
            state, out = host_step(state, rows[k])
        return state, out

    ours = timed("chunk, device gather, donated (train.py)",
                 lambda s: donated(s, source, starts, None))
    no_donation = timed("chunk without donation", lambda s: kept(s, source, starts, None))
    host = timed("chunk of host-gathered batches", lambda s: host_chunk(s, host_rows()))
    loop = timed("one call per step, host batches", one_per_step)

    def peak(fn, *args):
        m = fn.lower(*args).compile().memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)

    state = fresh()
    with_donation, without = (peak(donated, state, source, starts, None),
                              peak(kept, state, source, starts, None))
    print(f"peak memory of a chunk (XLA's analysis): {with_donation / 2**20:.1f} MiB donated, "
          f"{without / 2**20:.1f} MiB not", flush=True)
    common.report(no_donation_time_ratio=no_donation / ours, host_batches_time_ratio=host / ours,
                  step_per_call_time_ratio=loop / ours,
                  no_donation_memory_ratio=without / with_donation)


if __name__ == "__main__":
    main()
