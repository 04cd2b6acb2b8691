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

from transformer_jax.model import Transformer, empty_cache


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array,
                  top_k: int = 0, top_p: jax.Array | None = 1.0) -> jax.Array:
    """Next token ids (B,) from logits: greedy at temperature 0, else softmax(logits / T)
    restricted to the `top_k` largest (0: all) and the smallest set of probability >= `top_p`
    (None: no such restriction, as 1.0 but without sorting the vocabulary)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    logits_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p is not None:
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
        ("temperature", temperature, 0 <= temperature < float("inf"),
         "must be a finite number, not negative"),
        ("top_k", top_k, 0 <= top_k <= (vocab_size or top_k),
         "must be between 0 (all) and the vocabulary size"),
        ("top_p", top_p, 0 < top_p <= 1, "must be in (0, 1]"),
        ("num_samples", num_samples, num_samples >= 1, "must be at least 1"),
    )
    for name, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name}={value} {rule}")


def autoregress(model: nn.Module, params, buffer, length, rng, *, count: int, width: int,
                window: int, draw, inputs_at):
    """Extend a prompt by `count` values, one cached step each: (count, B, ...) draws.

    Serves any model over the trunk: token ids here, real-valued series in forecast.py.

    Args:
      buffer: (B, P, ...) array; positions [0, length) hold the prompt (of the first `width`,
        a static size, the rest ignored), and each new value is written at the next position.
      length: positions of prompt (an int32 scalar, may be traced).
      draw: (model output at the newest position (B, O), rng key) -> the next value (B, ...).
      inputs_at: (buffer, start, n) -> the model's inputs for positions [start, start + n).
      window: positions the cache holds; once full it is refilled from the last half-window
        (absolute positions cannot slide inside a cache), one prefill per half-window.
    """
    half = max(window // 2, 1)
    step = lambda cache, x: model.apply({"params": params, "cache": cache}, x, decode=True,
                                        mutable=["cache"])

    def prefill(buffer, start, n, used):
        """A fresh cache of positions [start, start + used) (inputs read: n >= used), and the
        output at the last of them."""
        x = inputs_at(buffer, start, n)
        out, vars_ = step(empty_cache(model, x[:, :1]), x)
        trunk = {**vars_["cache"]["trunk"], "index": jnp.asarray(used, jnp.int32)}
        return {**vars_["cache"], "trunk": trunk}, out[:, used - 1]

    def body(carry, i):
        cache, out, buffer, rng = carry
        rng, key = jax.random.split(rng)
        value = draw(out, key)
        at = length + i
        buffer = jax.lax.dynamic_update_slice(
            buffer, value[:, None].astype(buffer.dtype), (0, at) + (0,) * (buffer.ndim - 2))

        def advance(_):
            out, vars_ = step(cache, inputs_at(buffer, at, 1))
            return vars_["cache"], out[:, -1]

        slide = lambda _: prefill(buffer, at + 1 - half, half, half)
        cache, out = jax.lax.cond(cache["trunk"]["index"] >= window, slide, advance, None)
        return (cache, out, buffer, rng), value

    cache, out = prefill(buffer, 0, width, length)
    return jax.lax.scan(body, (cache, out, buffer, rng), jnp.arange(count))[1]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy",
                                             "nucleus"))
def _generate(params, context_BxW, length, rng, temperature, top_p, *, model: nn.Module,
              max_new_tokens: int, top_k: int, greedy: bool, nucleus: bool):
    """New tokens (B, max_new_tokens) after the first `length` tokens of `context_BxW`;
    `greedy` (temperature 0) and `nucleus` (top_p < 1) leave out what is not needed: greedy
    decoding neither sorts nor draws, a fifth of a small model's cached step."""
    B, W = context_BxW.shape
    text_BxL = jnp.concatenate([context_BxW, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    if greedy:
        draw = lambda logits_BxV, key: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    else:
        draw = lambda logits_BxV, key: sample_logits(logits_BxV, key, temperature, top_k,
                                                     top_p if nucleus else None)
    tokens_NxB = autoregress(
        model, params, text_BxL, length, rng, count=max_new_tokens, width=W, window=W,
        draw=draw,
        inputs_at=lambda text, start, n: jax.lax.dynamic_slice_in_dim(text, start, n, axis=1))
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
                       max_new_tokens=max_new_tokens, top_k=top_k, greedy=temperature == 0,
                       nucleus=top_p < 1)
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
