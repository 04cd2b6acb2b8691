"""Sampling speed: key/value cache versus recomputing the whole context for every token.

    python benchmarks/sampling.py --data ../shared/data/tinyshakespeare.txt

Both decoders run the `default` preset's model (context 256, random weights: speed does not
depend on them) compiled as one call each, from a 1-token prompt to 1,000 new tokens, so the
window slides several times. Recompute is what the lecture and nanoGPT do: a full forward
pass over the last `max_len` tokens per new token.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


@functools.partial(jax.jit, static_argnames=("model", "n"))
def recompute(params, window_1xW, length, *, model, n):
    """Greedy tokens by full forward passes over a sliding window of the last W tokens."""
    W = window_1xW.shape[1]

    def body(carry, _):
        window, length = carry
        logits = model.apply({"params": params}, window)[0, length - 1]
        token = jnp.argmax(logits).astype(jnp.int32)
        full = length >= W
        window = jnp.where(full, jnp.roll(window, -1, axis=1), window)
        at = jnp.where(full, W - 1, length)
        window = jax.lax.dynamic_update_slice(window, token[None, None], (0, at))
        return (window, jnp.minimum(length + 1, W)), token

    return jax.lax.scan(body, (window_1xW, length), None, length=n)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (sets the vocabulary)")
    p.add_argument("--new-tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from transformer_jax import config as config_lib
    from transformer_jax.model import Transformer, init_params
    from transformer_jax.sampling import generate
    from transformer_jax.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(Path(args.data).read_text(encoding="utf-8"))
    cfg = config_lib.preset("default").replace(vocab_size=tok.vocab_size).model
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    n, prompt = args.new_tokens, [tok.start_id]

    best = lambda fn: common.best_seconds(fn, args.repeats)
    cached = best(lambda: generate(model, params, prompt, max_new_tokens=n, temperature=0.0,
                                   rng=jax.random.PRNGKey(0)))
    window = jnp.zeros((1, cfg.max_len), jnp.int32).at[0, 0].set(tok.start_id)
    full = best(lambda: recompute(params, window, jnp.int32(1), model=model,
                                  n=n).block_until_ready())
    print(f"default preset: context {cfg.max_len}, {n} new tokens, batch 1, greedy")
    common.report(cache_tokens_per_s=round(n / cached), recompute_tokens_per_s=round(n / full),
                  cache_speedup=full / cached)


if __name__ == "__main__":
    main()
