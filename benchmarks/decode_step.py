"""One decoding step of the `default` preset's model at 1, 4 and 16 rows: what batching gains.

    python benchmarks/decode_step.py [--max-len 256] [--steps 64]

Times `--steps` cached decoding steps in one compiled loop (random weights, one device) for
each batch size and prints milliseconds per step, tokens/s, and `ratio_16_to_1`: the tokens/s
of 16 rows over one row's, the ceiling of what a server's batching of 16 clients can gain.
Each step reads every row's whole key/value cache (4 layers x 2 x B x 256 x 128 float32: 16 MB
at B = 16), so on a CPU this is bound by memory bandwidth once the cache leaves the caches.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-len", type=int, default=256, help="cache length (the context)")
    p.add_argument("--steps", type=int, default=64, help="decoding steps per timed call")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from transformer_jax.config import preset
    from transformer_jax.model import Transformer, init_cache, init_params

    cfg = dataclasses.replace(preset("default").model, vocab_size=65, max_len=args.max_len)
    params, model = init_params(cfg, jax.random.key(0)), Transformer(cfg)

    @jax.jit
    def steps(params, cache, ids_Bx1):
        def body(_, carry):
            cache, ids_Bx1 = carry
            logits, vars_ = model.apply({"params": params, "cache": cache}, ids_Bx1,
                                        decode=True, mutable=["cache"])
            return vars_["cache"], jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
        return jax.lax.fori_loop(0, args.steps, body, (cache, ids_Bx1))

    rates = {}
    for rows in (1, 4, 16):
        cache, ids = init_cache(cfg, rows), jnp.zeros((rows, 1), jnp.int32)
        seconds = common.best_seconds(
            lambda cache=cache, ids=ids: jax.block_until_ready(steps(params, cache, ids)),
            args.repeats) / args.steps
        rates[rows] = rows / seconds
        print(f"{rows:2d} rows: {seconds * 1e3:.3f} ms/step, {rates[rows]:,.0f} tokens/s",
              flush=True)
    common.report(ratio_4_to_1=round(rates[4] / rates[1], 3),
                  ratio_16_to_1=round(rates[16] / rates[1], 3))


if __name__ == "__main__":
    main()
