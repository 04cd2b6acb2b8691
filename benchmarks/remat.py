"""What `--remat` saves and costs: XLA's temporary memory and the time of one compiled gradient
of the same model with and without rematerialised blocks, in one run.

    python benchmarks/remat.py [--layers 8] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(remat: bool, layers: int, batch_size: int) -> tuple[float, float]:
    """(temporary MiB, seconds) of the gradient of the `default` preset's loss."""
    import jax
    import jax.numpy as jnp

    from transformer_jax import training
    from transformer_jax.config import preset
    from transformer_jax.model import Transformer, init_params

    cfg = preset("default").replace(vocab_size=65, remat=remat, layers=layers).model
    params = init_params(cfg, jax.random.PRNGKey(0))
    loss = training.lm_loss(Transformer(cfg), pad_id=64)
    rows = jnp.zeros((batch_size, cfg.max_len + 1), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, r: loss(p, r, jax.random.PRNGKey(0))[0]))
    compiled = grad.lower(params, rows).compile()
    seconds = common.best_seconds(lambda: jax.block_until_ready(compiled(params, rows)), 3)
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="blocks of the `default` model")
    p.add_argument("--batch-size", type=int, default=64, help="sequences of 256 tokens")
    args = p.parse_args()
    (mem, sec), (mem_r, sec_r) = (measure(r, args.layers, args.batch_size) for r in (False, True))
    print(f"without remat: {mem:,.0f} MiB temporary, {sec * 1000:,.0f} ms; "
          f"with: {mem_r:,.0f} MiB, {sec_r * 1000:,.0f} ms")
    common.report(memory_ratio=mem_r / mem, time_ratio=sec_r / sec, temp_mib=round(mem),
                  temp_mib_remat=round(mem_r))


if __name__ == "__main__":
    main()
