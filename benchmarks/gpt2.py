"""GPT-2 sampling speed: prompt and new tokens/s with the key/value cache, and new tokens/s
recomputing the whole context for every token.

    python benchmarks/gpt2.py                              # the tiny test fixture
    python benchmarks/gpt2.py --model gpt2                 # a hub name or a local directory
    python benchmarks/gpt2.py --random-init gpt2-small     # GPT-2 124M's shape, random weights

Batch 1, greedy, random prompt ids (speed depends on neither weights nor text). By default the
prompt fills half the context window and the new tokens the other half, so the window never
slides. The cached decoder is the library's `generate`, one compiled call: its prefill runs
over the whole (padded) window; prompt tokens/s is the prompt length over the time of a call
that makes one new token, and new tokens/s comes from the extra time a call making all of them
takes. Recompute is the lecture's and nanoGPT's way: a full forward pass over the window per
new token (`benchmarks/sampling.py`'s `recompute`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from sampling import recompute  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gpt2-tiny"
# Shapes as their Hugging Face config.json states them.
RANDOM_INIT = {
    "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
                   "vocab_size": 50257},
}


def random_init_config(name: str):
    """The TransformerConfig of a GPT-2 shape named in RANDOM_INIT."""
    from transformer_jax.gpt2 import config_from_hf

    return config_from_hf(RANDOM_INIT[name], name)


def measure(model, params, *, prompt_tokens: int | None = None, new_tokens: int | None = None,
            repeats: int = 3) -> dict:
    """Sampling figures of `model`: prompt_tokens_per_s, cache_tokens_per_s (new tokens with
    the cache), recompute_tokens_per_s, cache_speedup; and the lengths used.

    Args:
      prompt_tokens: default half the context window.
      new_tokens: default the rest of the window (at least 2).
    """
    from transformer_jax.sampling import generate

    W = model.config.max_len
    P = prompt_tokens or max(W // 2, 1)
    n = new_tokens or max(W - P, 2)
    if not 0 < P < W:
        raise ValueError(f"prompt_tokens={P} must be in [1, {W}) (the context window)")
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, P, dtype=np.int32)
    best = lambda fn: common.best_seconds(fn, repeats)
    cached = lambda k: best(lambda: generate(model, params, prompt, max_new_tokens=k,
                                             temperature=0.0, rng=jax.random.PRNGKey(0)))
    first, all_ = cached(1), cached(n)
    window = jnp.zeros((1, W), jnp.int32).at[0, :P].set(jnp.asarray(prompt))
    full = best(lambda: recompute(params, window, jnp.int32(P), model=model,
                                  n=n).block_until_ready())
    return {"prompt_tokens": P, "new_tokens": n, "prompt_tokens_per_s": P / first,
            "cache_tokens_per_s": (n - 1) / max(all_ - first, 1e-9),
            "recompute_tokens_per_s": n / full, "cache_speedup": full / all_}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=str(FIXTURE),
                       help="GPT-2 directory or hub name (default: the tiny test fixture)")
    which.add_argument("--random-init", choices=sorted(RANDOM_INIT),
                       help="a GPT-2 shape with random weights instead of --model")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default: half the window")
    p.add_argument("--new-tokens", type=int, default=None, help="default: the rest of it")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from transformer_jax.model import Transformer, count_params, init_params

    if args.random_init:
        config = random_init_config(args.random_init)
        model, params = Transformer(config), init_params(config, jax.random.PRNGKey(0))
        name = f"{args.random_init} (random weights)"
    else:
        from transformer_jax.gpt2 import from_pretrained

        model, params, _ = from_pretrained(args.model)
        name = args.model
    figures = measure(model, params, prompt_tokens=args.prompt_tokens,
                      new_tokens=args.new_tokens, repeats=args.repeats)
    print(f"{name}: {count_params(params):,} parameters, context {model.config.max_len}, "
          f"{figures['prompt_tokens']}-token prompt, {figures['new_tokens']} new tokens, "
          f"batch 1, greedy, on {jax.devices()[0].device_kind}")
    common.report(**{k: round(v) if k.endswith("tokens_per_s") else v
                     for k, v in figures.items()})


if __name__ == "__main__":
    main()
