"""Autoregressive sampling with a key/value cache, streamed in compiled chunks.

A `Decoder` holds B rows on the device (each row's cache, newest logits, settings and the
tokens it may still produce) and advances them together, a chunk of steps per compiled call,
so the host sees tokens as they come while the cache never leaves the device. Rows are
independent: each has its own position, random key, temperature and top-p, so prompts of any
length, and requests arriving at different times, share one batch (a row is placed when a slot
is free and stops changing when it finishes). A prompt is one forward pass (prefill), each new
token one cached step. When a row's text outgrows the context window it slides: absolute
positions cannot move inside a cache, so a full cache is refilled from the last half-window
of text (one prefill per half-window of new tokens). Batched steps read only as much of the
cache as the rows use: its first quarter, half, or all of it (see `Decoder.advance`).

`TextStream` turns a row's tokens into text as it grows, holding back what may still turn into
a stop string; `Sampler` ties both to a tokenizer for prompts given as text (sample.py, the
server).

Shapes: B rows, W context window (max_len), V vocabulary, C steps per chunk.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer_jax.model import (
    Transformer,
    cache_prefix,
    empty_cache,
    half_window,
    put_cache_prefix,
)

FREE = -1  # in a chunk's tokens: no token (the row had finished, or was free)
# XLA's CPU compiler hands dots and their neighbours to YNNPACK fusions (experimental) by
# default; for decoding steps (a few rows against the cache) they are slower than XLA's own
# loops: at 16 rows of the `default` model, about 2x (benchmarks/RESULTS.md). Other backends
# ignore this option.
_DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Batched chunks read a cache prefix only from this many rows on: one row's whole cache is
# small (1 MB for the `default` model), and each prefix length is one more compiled program.
_PREFIX_ROWS = 4


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array,
                  top_k: int = 0, top_p: jax.Array | None = 1.0) -> jax.Array:
    """Next token ids (B,) from logits: greedy at temperature 0, else softmax(logits / T)
    restricted to the `top_k` largest (0: all) and the smallest set of probability >= `top_p`
    (None: no such restriction, as 1.0 but without sorting the vocabulary).

    `rng` is one key per row (B, 2) or one key for all; `temperature` and `top_p` are scalars
    or one per row (B,)."""
    B = logits_BxV.shape[0]
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    temperature_Bx1 = jnp.broadcast_to(temperature, (B,))[:, None]
    logits_BxV = logits_BxV / jnp.maximum(temperature_Bx1, 1e-6)
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p is not None:
        top_p_Bx1 = jnp.broadcast_to(top_p, (B,))[:, None]
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        # Keep each token whose predecessors' mass is still below top_p (the first always).
        keep_BxV = (mass_before_BxV < top_p_Bx1) | (jnp.arange(sorted_BxV.shape[-1]) == 0)
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    # Inverse transform: the first token whose cumulative probability reaches u ~ U(0, 1]
    # (one uniform per row; Gumbel noise, jax.random.categorical's way, takes V of them, most
    # of a small model's batched step on a CPU).
    keys_B = rng if jnp.ndim(rng) == 2 else jax.random.split(rng, B)
    u_Bx1 = 1.0 - jax.vmap(jax.random.uniform)(keys_B)[:, None]
    mass_BxV = jnp.cumsum(jax.nn.softmax(logits_BxV, axis=-1), axis=-1)
    sampled_B = jnp.sum(mass_BxV < u_Bx1 * mass_BxV[:, -1:], axis=-1)
    return jnp.where(temperature_Bx1[:, 0] == 0, greedy_B, sampled_B)


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


@flax.struct.dataclass
class Rows:
    """The decoder's device state: B rows, each at its own position.

    cache: the model's key/value cache (trunk/index (B,): positions each row holds);
    logits_BxV: each row's prediction of its next token; window_BxW: the tokens its cache
    holds, in order; keys_Bx2: its random key; temperature_B, top_p_B: its settings;
    left_B: tokens it may still produce (0: finished, or a free slot).
    """

    cache: dict
    logits_BxV: jax.Array
    window_BxW: jax.Array
    keys_Bx2: jax.Array
    temperature_B: jax.Array
    top_p_B: jax.Array
    left_B: jax.Array


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(params, tokens_1xT: jax.Array, used, *, model: nn.Module):
    """A fresh cache (one row) of the first `used` of `tokens_1xT` and the logits (V,) after
    them: a forward pass over all T (the positions past `used` are overwritten before any
    query reads them)."""
    logits_1xTxV, vars_ = model.apply(
        {"params": params, "cache": empty_cache(model, tokens_1xT[:, :1])}, tokens_1xT,
        decode=True, mutable=["cache"])
    cache = vars_["cache"]
    cache = {**cache, "trunk": {**cache["trunk"], "index": jnp.full((1,), used, jnp.int32)}}
    return cache, logits_1xTxV[0, used - 1]


def _put_row(rows: Rows, slot, cache_1, logits_V, window_W) -> Rows:
    """`rows` with row `slot`'s cache, logits and window replaced."""
    put = lambda many, one: jax.lax.dynamic_update_slice_in_dim(many, one, slot, axis=0)
    return rows.replace(cache=jax.tree.map(put, rows.cache, cache_1),
                        logits_BxV=rows.logits_BxV.at[slot].set(logits_V),
                        window_BxW=rows.window_BxW.at[slot].set(window_W))


@functools.partial(jax.jit, donate_argnums=0)
def _place(rows: Rows, slot, cache_1, logits_V, window_W, key, temperature, top_p, left):
    rows = _put_row(rows, slot, cache_1, logits_V, window_W)
    return rows.replace(keys_Bx2=rows.keys_Bx2.at[slot].set(key),
                        temperature_B=rows.temperature_B.at[slot].set(temperature),
                        top_p_B=rows.top_p_B.at[slot].set(top_p),
                        left_B=rows.left_B.at[slot].set(left))


@functools.partial(jax.jit, donate_argnums=0)
def _put_first(rows: Rows, first: Rows) -> Rows:
    """`rows` with its first rows replaced by `first`."""
    return jax.tree.map(lambda many, few: jax.lax.dynamic_update_slice_in_dim(many, few, 0, 0),
                        rows, first)


@functools.partial(jax.jit, donate_argnums=0)
def _finish(rows: Rows, finished_B):
    return rows.replace(left_B=jnp.where(finished_B, 0, rows.left_B))


def _draw(rows: Rows, top_k: int, draw: str):
    """Each row's next token (B,) and its next random key (B, 2). `draw` (static, from what
    the live rows ask): greedy takes the argmax alone (no key is split), sample draws with
    each row's temperature, nucleus also sorts for top-p (a fifth of a small model's step)."""
    if draw == "greedy":
        return jnp.argmax(rows.logits_BxV, axis=-1).astype(jnp.int32), rows.keys_Bx2
    split_Bx2x2 = jax.vmap(jax.random.split)(rows.keys_Bx2)
    token_B = sample_logits(rows.logits_BxV, split_Bx2x2[:, 1], rows.temperature_B, top_k,
                            rows.top_p_B if draw == "nucleus" else None)
    return token_B.astype(jnp.int32), split_Bx2x2[:, 0]


@functools.partial(jax.jit, static_argnames=("model",))
def _step(params, cache, ids_Bx1, *, model: nn.Module):
    """One decoding step of every row: (logits (B, 1, V), {"cache": the new cache}). Jitted
    on its own so that the chunk's two kinds of step (with and without a refill) trace the
    model once between them."""
    return model.apply({"params": params, "cache": cache}, ids_Bx1, decode=True,
                       mutable=["cache"])


@functools.partial(jax.jit, static_argnames=("model", "top_k", "end_id", "max_chunk", "draw",
                                             "span"),
                   donate_argnums=1, compiler_options=_DECODE_COMPILER_OPTIONS)
def _chunk(params, rows: Rows, steps, *, model: nn.Module, top_k: int, end_id: int | None,
           max_chunk: int, draw: str, span: int):
    """Up to `steps` (<= max_chunk) decoding steps of every live row, fewer once none is
    live: (rows, tokens (B, max_chunk), FREE where a row produced nothing). The steps read the
    cache's first `span` positions, which must hold every live row to the chunk's end."""
    (B, W), whole = rows.window_BxW.shape, rows.cache
    rows = rows.replace(cache=cache_prefix(whole, span))
    half = half_window(W)

    def refill(carry):
        """Row `b`, the first full one, refilled from its last half-window (ending with the
        token it just drew)."""
        rows, full_B, token_B = carry
        b = jnp.argmax(full_B)
        window_W = jnp.concatenate([rows.window_BxW[b, W - half + 1:], token_B[b, None],
                                    jnp.zeros((W - half,), jnp.int32)])
        cache_1, logits_V = _prefill(params, window_W[None, :half], half, model=model)
        return (_put_row(rows, b, cache_prefix(cache_1, span), logits_V, window_W),
                full_B.at[b].set(False), token_B)

    def body(carry, slide: bool):
        """One step of every row; `slide`: a live row may have a full cache, and is then
        refilled with what it drew (else none may)."""
        i, rows, out_BxC = carry
        live_B = rows.left_B > 0
        token_B, keys_Bx2 = _draw(rows, top_k, draw)
        ended_B = live_B & (token_B == end_id) if end_id is not None else jnp.zeros_like(live_B)
        emit_B = live_B & ~ended_B
        out_BxC = out_BxC.at[:, i].set(jnp.where(emit_B, token_B, FREE))
        left_B = jnp.where(emit_B, rows.left_B - 1, 0)
        index_B = rows.cache["trunk"]["index"]
        # Every row takes the step (one batched call); what it does to a row that has ended
        # is never read, and a full row's result is replaced by its refill.
        logits_Bx1xV, vars_ = _step(params, rows.cache, token_B[:, None], model=model)
        rows = rows.replace(
            cache=vars_["cache"], keys_Bx2=keys_Bx2, left_B=left_B,
            logits_BxV=logits_Bx1xV[:, 0],
            window_BxW=rows.window_BxW.at[jnp.arange(B), index_B].set(token_B, mode="drop"))
        if slide:
            full_B = (left_B > 0) & (index_B >= W)  # rows that go on but had no room
            rows = jax.lax.while_loop(lambda c: jnp.any(c[1]), refill,
                                      (rows, full_B, token_B))[0]
        return i + 1, rows, out_BxC

    going = lambda c: (c[0] < steps) & jnp.any(c[1].left_B > 0)
    roomy = lambda c: going(c) & ~jnp.any((c[1].left_B > 0) & (c[1].cache["trunk"]["index"] >= W))

    def stretch(carry):
        """Steps while no live row's cache is full (no refill to check for: a refill, even
        one that never happens, costs a small model a sixth of its step), then one step
        that refills the rows whose cache is."""
        carry = jax.lax.while_loop(roomy, lambda c: body(c, slide=False), carry)
        return jax.lax.cond(going(carry), lambda c: body(c, slide=True), lambda c: c, carry)

    out = jnp.full((B, max_chunk), FREE, jnp.int32)
    _, rows, out = jax.lax.while_loop(going, stretch, (jnp.int32(0), rows, out))
    return rows.replace(cache=put_cache_prefix(whole, rows.cache)), out


def _context(prompt_ids: Sequence[int], width: int) -> np.ndarray:
    """The ids a row starts from: the prompt, or the last half-window of a prompt longer than
    the window `width` (as the sliding window would keep)."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim != 1 or len(prompt) == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D sequence of token ids")
    return prompt[-half_window(width):] if len(prompt) > width else prompt


def _bucket(n: int, top: int) -> int:
    """The prefill length for an n-token prompt: the next power of two (at least 8), at most
    `top`, so that few lengths compile. Not the half-window a refill prefills, although one
    prefill program would then serve both: a short prompt would pay for a half-window's
    forward pass (GPT-2 small on a CPU: 1.5 s for 512 positions, 0.14 s for 16)."""
    return min(max(8, 1 << (n - 1).bit_length()), top)


class Decoder:
    """B rows of one model decoded together, a compiled chunk of steps per `advance`.

    Args:
      rows: B, the rows decoded at once.
      top_k: sample among the k likeliest tokens (0: all), for every row.
      end_id: a token that ends a row when drawn (not emitted); None: none does.
      max_chunk: most steps per call; chunk_seconds: aim of each call's duration (the steps
        per call adapt to it, so a slow model still streams often and a fast one pays one
        call per max_chunk steps); None: always max_chunk steps.
    """

    def __init__(self, model: nn.Module, params, *, rows: int, top_k: int = 0,
                 end_id: int | None = None, max_chunk: int = 256,
                 chunk_seconds: float | None = 0.1):
        self.model, self.params = model, params
        self.size, self.width = rows, model.config.max_len
        self._static = dict(model=model, top_k=top_k, end_id=end_id, max_chunk=max_chunk)
        self._chunk_seconds = chunk_seconds
        self._steps = max_chunk if chunk_seconds is None else 1
        cache = empty_cache(model, jnp.zeros((rows, 1), jnp.int32))
        self._rows = Rows(cache=cache,
                          logits_BxV=jnp.zeros((rows, model.config.outputs), jnp.float32),
                          window_BxW=jnp.zeros((rows, self.width), jnp.int32),
                          keys_Bx2=jnp.zeros((rows, 2), jnp.uint32),
                          temperature_B=jnp.ones((rows,), jnp.float32),
                          top_p_B=jnp.ones((rows,), jnp.float32),
                          left_B=jnp.zeros((rows,), jnp.int32))
        # The host's copies: what each row may still produce and its cache index (after each
        # call), its settings.
        self.left, self._index = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
        self._temperature, self._top_p = np.ones(rows), np.ones(rows)

    def place(self, slots: Sequence[int], prompt_ids: Sequence[int], keys, *,
              max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> None:
        """Start rows `slots` (free ones) from one prompt, one prefill for all of them; row i
        draws with keys[i] (a (len(slots), 2) array)."""
        prompt = _context(prompt_ids, self.width)
        tokens = np.zeros((1, _bucket(len(prompt), self.width)), np.int32)
        tokens[0, :len(prompt)] = prompt
        cache_1, logits_V = _prefill(self.params, jnp.asarray(tokens), len(prompt),
                                     model=self.model)
        window = np.zeros(self.width, np.int32)
        window[:len(prompt)] = prompt
        for slot, key in zip(slots, np.asarray(keys)):
            self._rows = _place(self._rows, slot, cache_1, logits_V, window, key,
                                np.float32(temperature), np.float32(top_p),
                                np.int32(max_new_tokens))
            self.left[slot], self._index[slot] = max_new_tokens, len(prompt)
            self._temperature[slot], self._top_p[slot] = temperature, top_p

    def finish(self, slots: Iterable[int]) -> None:
        """End rows `slots` now (their slots become free)."""
        finished = np.zeros(self.size, bool)
        finished[list(slots)] = True
        if finished.any():
            self._rows = _finish(self._rows, finished)
            self.left[finished] = 0

    def _stepped(self) -> int:
        """k: the rows the next chunk steps, the first k (a power of two past the last live
        row, so few sizes compile): a free row would cost a step like a live one."""
        live = np.flatnonzero(self.left > 0)
        return self.size if not len(live) else min(1 << int(live[-1]).bit_length(), self.size)

    def spans(self, k: int) -> list[int]:
        """The cache prefixes a chunk of k rows may read: the whole window W, and from
        _PREFIX_ROWS rows on W/4, W/2 and 3W/4 too (a batched step's cost is mostly its
        reading of the cache, in proportion to the prefix: 16 rows of the `default` model
        read 16 MB of it at W)."""
        W = self.width
        return sorted({max(W * q // 4, 1) for q in (1, 2, 3, 4)}) if k >= _PREFIX_ROWS else [W]

    def advance(self, span: int | None = None) -> np.ndarray:
        """One compiled chunk: the tokens (B, C) it produced, FREE where a row produced none;
        `left` then says which rows go on. `span`: the cache prefix it reads (one of
        `spans`; default: the shortest that holds every live row to the chunk's end)."""
        began = time.perf_counter()
        drawing = (self.left > 0) & (self._temperature > 0)
        draw = ("greedy" if not drawing.any() else
                "nucleus" if (self._top_p[drawing] < 1).any() else "sample")
        k, live = self._stepped(), self.left > 0
        # The positions it may fill: no row steps past what it may still produce.
        reach = int(self._index[live].max(initial=0)) + min(
            self._steps, int(self.left.max(initial=0)))
        fits = [s for s in self.spans(k) if s >= min(reach, self.width)]
        if span is not None and span not in fits:
            raise ValueError(f"span={span} is not one of {fits}")
        span = span or fits[0]
        if k == self.size:
            self._rows, out = _chunk(self.params, self._rows, np.int32(self._steps),
                                     draw=draw, span=span, **self._static)
        else:
            part, out = _chunk(self.params, jax.tree.map(lambda x: x[:k], self._rows),
                               np.int32(self._steps), draw=draw, span=span, **self._static)
            self._rows = _put_first(self._rows, part)
        out, self.left = np.asarray(out), np.array(self._rows.left_B)
        self._index = np.array(self._rows.cache["trunk"]["index"])
        out = np.concatenate([out, np.full((self.size - k, out.shape[1]), FREE, np.int32)])
        if self._chunk_seconds is not None:
            spent = max(time.perf_counter() - began, 1e-6)
            aim = self._steps * self._chunk_seconds / spent
            self._steps = int(np.clip(aim, 1, self._static["max_chunk"]))
        return out


def generate(model: nn.Module, params, prompt_ids, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1) -> np.ndarray:
    """Continue `prompt_ids` (a non-empty sequence of ids) `num_samples` times, sample i with
    key i of `jax.random.split(rng, num_samples)`.

    The last `max_len` tokens at most are kept as context (a longer prompt keeps its last
    half-window, as the sliding window does).

    Returns:
      int32 array (num_samples, max_new_tokens) of new token ids.
    """
    check_arguments(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, num_samples=num_samples, vocab_size=model.config.vocab_size)
    _context(prompt_ids, model.config.max_len)
    if max_new_tokens == 0:
        return np.zeros((num_samples, 0), np.int32)
    decoder = Decoder(model, params, rows=num_samples, top_k=top_k,
                      max_chunk=min(max_new_tokens, 256), chunk_seconds=None)
    decoder.place(range(num_samples), prompt_ids, jax.random.split(rng, num_samples),
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    rows = [[] for _ in range(num_samples)]
    while decoder.left.any():
        for row, new in zip(rows, decoder.advance()):
            row.extend(new[new != FREE])
    return np.asarray(rows, np.int32)


class TextStream:
    """One sample's text as its tokens come: `push(ids)` returns the new text that is final.

    It ends at the first of `stops` to be completed (which is not returned): text that could
    still turn into a stop string is held back until it cannot, and `stopped` then says so.
    `close()` returns what was held back once no more tokens come.
    """

    def __init__(self, decode: Callable[..., str], stops: Sequence[str] = ()):
        """`decode(ids, final=False)`: the text of more ids (a tokenizer's
        `incremental_decoder()`, which may hold back an incomplete character until `final`)."""
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        self._decode, self._stops = decode, tuple(stops)
        self._hold = max(map(len, self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        text = self._pending + self._decode(ids, final=final)
        # The stop completed first wins (as token by token generation would meet it), the
        # longer of two ending together: so where the text ends does not depend on how it came.
        found = [(at + len(s), at) for s, at in ((s, text.find(s)) for s in self._stops)
                 if at >= 0]
        if found:
            self.stopped, self._pending = True, ""
            return text[:min(found)[1]]
        keep = 0 if final else min(self._hold, len(text))
        self._pending = text[len(text) - keep:]
        return text[:len(text) - keep]

    def close(self) -> str:
        return self.push((), final=True)


@dataclass(frozen=True)
class Settings:
    """How one request samples: `n` samples of at most `max_new_tokens` tokens each, sample i
    drawing with key i of `jax.random.split(PRNGKey(seed), n)` (so a request's text does not
    depend on what it shares a batch with), ending at the first of `stops`."""

    max_new_tokens: int = 500
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stops: tuple[str, ...] = ()


@dataclass(eq=False)
class Job:
    """A request being answered: its rows' slots, their text streams, the tokens each
    produced and why each finished ("stop": an end symbol or a stop string; "length")."""

    settings: Settings
    prompt_tokens: int
    slots: list[int]
    streams: list[TextStream]
    produced: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)


@dataclass(frozen=True)
class Piece:
    """New text of sample `index` of `job`; `finish` is set on its last piece."""

    job: Job
    index: int
    text: str
    finish: str | None = None


class Sampler:
    """Text in, text out, over a `Decoder`: `start` places a request's samples in free rows,
    `step` advances every row by one chunk and returns the new text as `Piece`s.

    The model ends a sample at the tokenizer's end symbol (`ignore_end`: never), so a
    model trained with start and end symbols stops where its texts did, GPT-2 at
    `<|endoftext|>`. `add_start`: every prompt begins with the start symbol (a model trained
    on stream batching saw one before every text); an empty prompt always does.
    """

    def __init__(self, model: nn.Module, params, tokenizer, *, rows: int = 1, top_k: int = 0,
                 add_start: bool = False, ignore_end: bool = False, **decoder_options):
        self.tokenizer, self.add_start = tokenizer, add_start
        end_id = None if ignore_end else tokenizer.end_id
        self.decoder = Decoder(model, params, rows=rows, top_k=top_k, end_id=end_id,
                               **decoder_options)
        self._jobs: dict[int, tuple[Job, int]] = {}  # slot -> (job, sample index)

    @property
    def free(self) -> int:
        return self.decoder.size - len(self._jobs)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def encode(self, prompt: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(prompt, add_start=self.add_start or not prompt),
                          np.int32)

    def start(self, prompt: str, settings: Settings) -> Job:
        """Place `settings.n` samples of `prompt` (ValueError if fewer rows are free)."""
        if settings.n > self.free:
            raise ValueError(f"{settings.n} samples need as many free rows; {self.free} are")
        ids = self.encode(prompt)
        slots = [s for s in range(self.decoder.size) if s not in self._jobs][:settings.n]
        streams = [TextStream(self.tokenizer.incremental_decoder(), settings.stops)
                   for _ in slots]
        job = Job(settings, len(ids), slots, streams, [0] * len(slots), [None] * len(slots))
        if settings.max_new_tokens == 0:
            job.finish_reasons[:] = ["length"] * len(slots)
            return job
        keys = jax.random.split(jax.random.PRNGKey(settings.seed), settings.n)
        self.decoder.place(slots, ids, keys, max_new_tokens=settings.max_new_tokens,
                           temperature=settings.temperature, top_p=settings.top_p)
        self._jobs.update({slot: (job, i) for i, slot in enumerate(slots)})
        return job

    def cancel(self, job: Job) -> None:
        """Stop every sample of `job` now, freeing its rows."""
        self._release([s for s in job.slots if self._jobs.get(s, (None,))[0] is job])
        job.finish_reasons[:] = [r or "cancelled" for r in job.finish_reasons]

    def _release(self, slots: list[int]) -> None:
        self.decoder.finish(slots)
        for slot in slots:
            del self._jobs[slot]

    def step(self) -> list[Piece]:
        """Advance every row one chunk: the new text of each sample that has some, and the
        last piece of each sample that finished."""
        tokens_BxC = self.decoder.advance()
        pieces, stopped = [], []
        for slot, (job, i) in list(self._jobs.items()):
            ids = tokens_BxC[slot][tokens_BxC[slot] != FREE]
            stream = job.streams[i]
            text = stream.push(ids.tolist())
            job.produced[i] += len(ids)
            finish = None
            if stream.stopped:
                finish = "stop"
                stopped.append(slot)
            elif self.decoder.left[slot] == 0:
                full = job.produced[i] == job.settings.max_new_tokens
                finish = "length" if full else "stop"
                text += stream.close()
                del self._jobs[slot]
            if finish:
                job.finish_reasons[i] = finish
            if text or finish:
                pieces.append(Piece(job, i, text, finish))
        self._release(stopped)
        return pieces

    def run(self, job: Job) -> Iterator[Piece]:
        """Step until `job` is done, yielding its pieces (and dropping other jobs' pieces)."""
        while not job.done:
            yield from (p for p in self.step() if p.job is job)


def complete(config, tokenizer, params, prompt: str, *, max_new_tokens: int, seed: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1, stops: Sequence[str] = (), warn=None) -> list[str]:
    """Text samples: the prompt followed by its continuation, as the lecture's `sample`.

    An empty prompt starts from the start symbol, and so does every prompt of a model trained
    with start symbols (stream batching). Characters the model never saw map to the unknown
    id, after a call to `warn` naming them.
    """
    sampler = text_sampler(config, tokenizer, params, rows=num_samples, top_k=top_k)
    warn_unseen(tokenizer, prompt, warn)
    job = sampler.start(prompt, Settings(max_new_tokens, temperature, top_p, num_samples, seed,
                                         tuple(stops)))
    texts = [prompt] * num_samples
    for piece in sampler.run(job):
        texts[piece.index] += piece.text
    return texts


def text_sampler(config, tokenizer, params, *, rows: int = 1, top_k: int = 0,
                 ignore_end: bool = False, **decoder_options) -> Sampler:
    """A `Sampler` of a trained text model (config: its `Config`), prompts read as it was
    trained."""
    return Sampler(Transformer(config.model), params, tokenizer, rows=rows, top_k=top_k,
                   add_start=config.train.batching == "stream", ignore_end=ignore_end,
                   **decoder_options)


def warn_unseen(tokenizer, prompt: str, warn) -> None:
    """Call `warn` naming the characters of `prompt` the model never saw (read as unknown)."""
    unseen = tokenizer.unknown_chars(prompt)
    if unseen and warn is not None:
        warn(f"the model never saw {', '.join(map(repr, unseen))}; "
             "they are read as the unknown symbol")
