"""Autoregressive sampling with a key/value cache, in one compiled call.

The prompt is processed in one forward pass (prefill); each new token is then one cached step.
When the text outgrows the context window the window slides: absolute positions cannot move
inside a cache, so a full cache is refilled from the last half-window of text (one prefill per
half-window of new tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer_jax.model import Transformer, init_cache


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array,
                  top_k: int = 0, top_p: jax.Array = 1.0) -> jax.Array:
    """Next token ids (B,) from logits: greedy at temperature 0, else softmax(logits / T)
    restricted to the `top_k` largest (0: all) and the smallest set of probability >= `top_p`."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    logits_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # Keep each token whose predecessors' mass is still below top_p (the first always).
    keep_BxV = (mass_before_BxV < top_p) | (jnp.arange(sorted_BxV.shape[-1]) == 0)
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    sampled_B = jax.random.categorical(rng, logits_BxV, axis=-1)
    return jnp.where(temperature == 0, greedy_B, sampled_B)


def check_arguments(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    num_samples: int, vocab_size: int | None = None) -> None:
    """Raise ValueError naming the first sampling argument out of range (`vocab_size` None:
    no upper bound on top_k)."""
    rules = (
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 0, "must not be negative"),
        ("temperature", temperature, temperature >= 0, "must not be negative"),
        ("top_k", top_k, 0 <= top_k <= (vocab_size or top_k),
         "must be between 0 (all) and the vocabulary size"),
        ("top_p", top_p, 0 < top_p <= 1, "must be in (0, 1]"),
        ("num_samples", num_samples, num_samples >= 1, "must be at least 1"),
    )
    for name, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name}={value} {rule}")


def _with_index(cache: dict, index) -> dict:
    """`cache` with its write position (the trunk's "index" variable) set to `index`."""
    return {**cache, "trunk": {**cache["trunk"], "index": jnp.asarray(index, jnp.int32)}}


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k"))
def _generate(params, context_BxW, length, rng, temperature, top_p, *, model: nn.Module,
              max_new_tokens: int, top_k: int):
    """New tokens (B, max_new_tokens) after the first `length` tokens of `context_BxW`."""
    cfg = model.config
    B, W = context_BxW.shape
    half = max(W // 2, 1)
    step = lambda cache, ids: model.apply({"params": params, "cache": cache}, ids,
                                          decode=True, mutable=["cache"])

    def prefill(ids_BxT, n):
        """Fresh cache holding the first n of ids; logits after token n."""
        logits, vars_ = step(init_cache(cfg, B), ids_BxT)
        return _with_index(vars_["cache"], n), logits[:, n - 1]

    cache, logits_BxV = prefill(context_BxW, length)
    text_BxL = jnp.concatenate([context_BxW, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)

    def body(carry, i):
        cache, logits_BxV, text_BxL, rng = carry
        rng, key = jax.random.split(rng)
        token_B = sample_logits(logits_BxV, key, temperature, top_k, top_p).astype(jnp.int32)
        pos = length + i
        text_BxL = jax.lax.dynamic_update_slice(text_BxL, token_B[:, None], (0, pos))

        def slide(_):
            return prefill(jax.lax.dynamic_slice(text_BxL, (0, pos + 1 - half), (B, half)), half)

        def advance(_):
            logits, vars_ = step(cache, token_B[:, None])
            return vars_["cache"], logits[:, 0]

        cache, logits_BxV = jax.lax.cond(cache["trunk"]["index"] >= W, slide, advance, None)
        return (cache, logits_BxV, text_BxL, rng), token_B

    _, tokens_NxB = jax.lax.scan(body, (cache, logits_BxV, text_BxL, rng),
                                 jnp.arange(max_new_tokens))
    return tokens_NxB.T


def generate(model: nn.Module, params, prompt_ids, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1) -> np.ndarray:
    """Continue `prompt_ids` (a non-empty sequence of ids) `num_samples` times.

    The last `max_len` tokens at most are kept as context (a longer prompt keeps its last
    half-window, as the sliding window does).

    Returns:
      int32 array (num_samples, max_new_tokens) of new token ids.
    """
    W = model.config.max_len
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    if prompt.ndim != 1 or len(prompt) == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D sequence of token ids")
    check_arguments(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, num_samples=num_samples, vocab_size=model.config.vocab_size)
    if len(prompt) > W:
        prompt = prompt[-max(W // 2, 1):]
    context = np.zeros((num_samples, W), np.int32)
    context[:, :len(prompt)] = prompt
    if max_new_tokens == 0:
        return np.zeros((num_samples, 0), np.int32)
    tokens = _generate(params, jnp.asarray(context), jnp.int32(len(prompt)), rng,
                       jnp.float32(temperature), jnp.float32(top_p), model=model,
                       max_new_tokens=max_new_tokens, top_k=top_k)
    return np.asarray(tokens)


def complete(config, tokenizer, params, prompt: str, *, max_new_tokens: int, seed: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1, warn=None) -> list[str]:
    """Text samples: the prompt followed by its continuation, as the lecture's `sample`.

    An empty prompt starts from the start symbol, and so does every prompt of a model trained
    with start symbols (stream batching). Characters the model never saw map to the unknown
    id, after a call to `warn` naming them.
    """
    unseen = tokenizer.unknown_chars(prompt)
    if unseen and warn is not None:
        warn(f"the model never saw {', '.join(map(repr, unseen))}; "
             "they are read as the unknown symbol")
    add_start = config.train.batching == "stream" or not prompt
    ids = tokenizer.encode(prompt, add_start=add_start)
    new = generate(Transformer(config.model), params, ids, max_new_tokens=max_new_tokens,
                   rng=jax.random.PRNGKey(seed), temperature=temperature, top_k=top_k,
                   top_p=top_p, num_samples=num_samples)
    return [prompt + tokenizer.decode(row, skip_specials=True) for row in new]
