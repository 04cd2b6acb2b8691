"""What `--scan-layers` saves and costs: the compile time and step time of train.py's compiled
training chunk (forward, backward and AdamW in a `lax.scan` of steps) at several depths, with
the blocks unrolled and scanned, all in one run.

    python benchmarks/scan_layers.py [--depths 4 12 24] [--d-model 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(layers: int, scan: bool, args) -> tuple[float, float]:
    """(compile seconds, seconds per step) of a `steps_per_call`-step chunk on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from transformer_jax import parallel, training
    from transformer_jax.config import preset
    from transformer_jax.model import Transformer, init_params

    config = preset("default").replace(
        vocab_size=65, layers=layers, d_model=args.d_model, heads=4, d_ff=4 * args.d_model,
        max_len=args.seq_len, seq_len=args.seq_len, batch_size=args.batch_size,
        scan_layers=scan, steps_per_call=args.steps_per_call)
    cfg, tcfg = config.model, config.train
    mesh = parallel.data_mesh(jax.devices()[:1])
    chunk = training.compile_train_chunk(mesh, training.lm_loss(Transformer(cfg), pad_id=64),
                                         training.optimizer(tcfg, mesh), tcfg.seq_len + 1)
    state = training.init_state(init_params(cfg, jax.random.PRNGKey(0)), tcfg)
    source = jnp.asarray(np.random.default_rng(0).integers(0, 64, 100_000), jnp.int32)
    starts = jnp.asarray(np.random.default_rng(1).integers(
        0, 100_000 - tcfg.seq_len - 1, (tcfg.steps_per_call, tcfg.batch_size)), jnp.int32)
    t = time.perf_counter()
    compiled = chunk.lower(state, source, starts, None).compile()
    compile_s = time.perf_counter() - t

    def call():
        nonlocal state
        state, out = compiled(state, source, starts, None)
        jax.block_until_ready(out)

    return compile_s, common.best_seconds(call, 2) / tcfg.steps_per_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 24], help="layer counts")
    p.add_argument("--d-model", type=int, default=128, help="model width (4 heads)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--steps-per-call", type=int, default=5, help="steps in one compiled call")
    args = p.parse_args()
    figures = {}
    for layers in args.depths:
        (c0, s0), (c1, s1) = (measure(layers, scan, args) for scan in (False, True))
        print(f"{layers:3d} layers: compile {c0:6.2f} s unrolled, {c1:6.2f} s scanned; "
              f"step {s0 * 1000:7.1f} ms unrolled, {s1 * 1000:7.1f} ms scanned", flush=True)
        figures[f"compile_speedup_L{layers}"] = c0 / c1
        figures[f"step_time_ratio_L{layers}"] = s1 / s0
    common.report(**figures)


if __name__ == "__main__":
    main()
