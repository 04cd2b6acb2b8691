"""Tests for transformer_jax.sampling against independent references: the full forward pass,
argmax loops written here, the documented sliding-window rule and numpy softmax frequencies.

Compiles are the cost here: every distinct (config, max_new_tokens, top_k, num_samples) of
`generate` compiles once, so the tests share a few of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, random_params, tiny_config
from hypothesis import given, settings, strategies as st

from transformer_jax import sampling
from transformer_jax.config import Config, TrainConfig
from transformer_jax.model import Transformer, init_cache
from transformer_jax.sampling import (
    FREE,
    Decoder,
    Settings,
    TextStream,
    complete,
    generate,
    sample_logits,
    text_sampler,
)
from transformer_jax.tokenizer import CharTokenizer

CORPUS = "the cat sat on a mat; 0123!?"  # 17 distinct characters: vocabulary of 21
TOK = CharTokenizer.from_text(CORPUS)
CFG = tiny_config(vocab_size=TOK.vocab_size, max_len=8)  # small window: slides often
W, HALF = CFG.max_len, CFG.max_len // 2
N = 20  # the shared max_new_tokens


@pytest.fixture(scope="module")
def params():
    """Weights whose greedy continuations vary (seed 0's collapse onto one token)."""
    return random_params(CFG, seed=3, scale=0.5)


@pytest.fixture(scope="module")
def soft_params():
    """Smaller weights: flatter next-token distributions, so samples differ."""
    return random_params(CFG, seed=1, scale=0.15)


def full_logits(cfg, params, ids) -> np.ndarray:
    """Logits (len(ids), V) of one sequence by the full forward pass, right-padded to max_len
    (causal, so the padding changes nothing: one compile serves every length)."""
    ids = list(ids)
    assert 1 <= len(ids) <= cfg.max_len
    padded = np.zeros((1, cfg.max_len), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(forward(cfg)({"params": params}, jnp.asarray(padded)))[0, :len(ids)]


def reference_greedy(cfg, params, prompt, n) -> list[int]:
    """The documented rule, independently: the model reads the text since the last (re)start
    point; a prompt longer than max_len starts at its last half-window; whenever feeding the
    newest token would overflow the max_len cache, restart at the last max_len//2 tokens."""
    W, half = cfg.max_len, max(cfg.max_len // 2, 1)
    text = list(prompt)
    start = 0 if len(text) <= W else len(text) - half
    out = []
    for _ in range(n):
        context = text[start:]
        token = int(np.argmax(full_logits(cfg, params, context)[-1]))
        text.append(token)
        out.append(token)
        if len(text) - start > W:
            start = len(text) - half
    return out


def _gen(params, prompt, n=N, **kw):
    kw.setdefault("rng", jax.random.PRNGKey(0))
    return generate(Transformer(CFG), params, prompt, max_new_tokens=n, **kw)


# ---------------------------------------------------------------------------------------------
# the key/value cache


@pytest.mark.parametrize("norm,positions", [("pre", "learned"), ("post", "sinusoidal")])
def test_cached_prefill_then_one_token_steps_equal_full_forward_logits(norm, positions):
    cfg = tiny_config(vocab_size=20, max_len=12, norm=norm, positions=positions)
    params = random_params(cfg, seed=2)
    ids = np.random.default_rng(0).integers(0, 20, (2, cfg.max_len)).astype(np.int32)
    full = np.asarray(forward(cfg)({"params": params}, jnp.asarray(ids)))

    @jax.jit
    def step(cache, ids_BxT):
        logits, vars_ = Transformer(cfg).apply({"params": params, "cache": cache}, ids_BxT,
                                               decode=True, mutable=["cache"])
        return logits, vars_["cache"]

    prompt = 5
    logits, cache = step(init_cache(cfg, 2), jnp.asarray(ids[:, :prompt]))
    np.testing.assert_allclose(np.asarray(logits), full[:, :prompt], atol=1e-4, rtol=1e-4)
    assert cache["trunk"]["index"].tolist() == [prompt, prompt]
    for t in range(prompt, cfg.max_len):
        logits, cache = step(cache, jnp.asarray(ids[:, t:t + 1]))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-4, rtol=1e-4,
                                   err_msg=f"position {t}")
    assert cache["trunk"]["index"].tolist() == [cfg.max_len] * 2


# ---------------------------------------------------------------------------------------------
# generate


def test_greedy_generate_within_window_equals_argmax_loop_over_full_forward(params):
    prompt = [3, 1, 4]
    n = W - len(prompt)  # the last new token is predicted from a full window, no slide yet
    text = list(prompt)
    for _ in range(n):
        text.append(int(np.argmax(full_logits(CFG, params, text)[-1])))
    got = _gen(params, prompt, n, temperature=0.0)
    assert got.shape == (1, n) and got.dtype == np.int32
    assert list(got[0]) == text[len(prompt):]


@pytest.mark.parametrize("prompt", [[5], [3, 1, 4], [2, 7, 1, 8, 2, 8, 1]])
def test_greedy_generate_past_window_follows_documented_sliding_rule(params, prompt):
    want = reference_greedy(CFG, params, prompt, N)
    assert len(set(want)) > 2  # a varied continuation, not one repeated token
    got = _gen(params, prompt, temperature=0.0)
    assert list(got[0]) == want


def test_greedy_sliding_reference_is_not_just_a_plain_argmax_over_last_window(params):
    """Guards the test above: the restart rule matters, a naive 'last max_len tokens' loop
    gives a different continuation for these weights."""
    prompt = [3, 1, 4]
    text = list(prompt)
    for _ in range(N):
        text.append(int(np.argmax(full_logits(CFG, params, text[-W:])[-1])))
    assert text[len(prompt):] != reference_greedy(CFG, params, prompt, N)


def test_prompt_longer_than_max_len_keeps_its_last_half_window(params):
    prompt = list(np.random.default_rng(1).integers(0, 16, 13))
    got = _gen(params, prompt, temperature=0.0)
    assert list(got[0]) == reference_greedy(CFG, params, prompt, N)
    assert list(got[0]) == list(_gen(params, prompt[-HALF:], temperature=0.0)[0])


def test_prompt_of_exactly_max_len_tokens_is_kept_whole_as_documented(params):
    """generate's docstring: 'The last max_len tokens at most are kept as context (a longer
    prompt keeps its last half-window)'. A prompt of exactly max_len tokens fits the cache, so
    the first new token must be predicted from all of it."""
    prompt = [2, 7, 1, 8, 2, 8, 1, 8]
    assert len(prompt) == W
    first = int(np.argmax(full_logits(CFG, params, prompt)[-1]))
    assert first != int(np.argmax(full_logits(CFG, params, prompt[-HALF:])[-1]))  # guard
    got = _gen(params, prompt, temperature=0.0)
    assert got[0, 0] == first
    assert list(got[0]) == reference_greedy(CFG, params, prompt, N)


def test_greedy_samples_are_identical_rows(params):
    got = _gen(params, [3, 1, 4], temperature=0.0, num_samples=3)
    assert got.shape == (3, N)
    assert (got == got[0]).all()
    assert list(got[0]) == reference_greedy(CFG, params, [3, 1, 4], N)


def test_max_new_tokens_zero_returns_empty(params):
    out = _gen(params, [1, 2], 0, num_samples=2)
    assert out.shape == (2, 0) and out.dtype == np.int32


@pytest.mark.parametrize("kw", [dict(top_k=CFG.vocab_size + 1), dict(top_k=-1),
                                dict(temperature=-0.1),
                                dict(top_p=0.0), dict(top_p=1.5), dict(num_samples=0),
                                dict(max_new_tokens=-1)])
def test_generate_rejects_invalid_arguments(params, kw):
    n = kw.pop("max_new_tokens", N)
    with pytest.raises(ValueError):
        _gen(params, [1, 2], n, **kw)


@pytest.mark.parametrize("prompt", [[], [[1, 2]]])
def test_generate_rejects_empty_or_2d_prompt(params, prompt):
    with pytest.raises(ValueError):
        _gen(params, prompt)


def test_same_seed_same_samples_different_seed_different(soft_params):
    a = _gen(soft_params, [1, 2, 3], num_samples=3, rng=jax.random.PRNGKey(7))
    b = _gen(soft_params, [1, 2, 3], num_samples=3, rng=jax.random.PRNGKey(7))
    c = _gen(soft_params, [1, 2, 3], num_samples=3, rng=jax.random.PRNGKey(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


# ---------------------------------------------------------------------------------------------
# sample_logits

_sample = jax.jit(sample_logits, static_argnums=3)


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _draws(logits_V, n, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    tiled = jnp.tile(jnp.asarray(logits_V, jnp.float32)[None], (n, 1))
    return np.asarray(_sample(tiled, jax.random.PRNGKey(seed), jnp.float32(temperature), top_k,
                              jnp.float32(top_p)))


LOGITS = np.random.default_rng(3).normal(size=(64, 20)).astype(np.float32) * 2


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0),
                                dict(temperature=0.0, top_k=5, top_p=0.5)])
def test_degenerate_settings_are_greedy(kw):
    args = dict(temperature=1.0, top_k=0, top_p=1.0) | kw
    for seed in range(5):
        got = _sample(jnp.asarray(LOGITS), jax.random.PRNGKey(seed),
                      jnp.float32(args["temperature"]),
                      args["top_k"], jnp.float32(args["top_p"]))
        np.testing.assert_array_equal(np.asarray(got), LOGITS.argmax(-1))


def test_no_nucleus_draws_what_top_p_1_draws():
    """top_p=None skips the nucleus step (generate does so for top_p 1): the same draws."""
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        every = _sample(jnp.asarray(LOGITS), key, jnp.float32(1.0), 0, jnp.float32(1.0))
        skipped = _sample(jnp.asarray(LOGITS), key, jnp.float32(1.0), 0, None)
        np.testing.assert_array_equal(np.asarray(skipped), np.asarray(every))


@pytest.mark.parametrize("top_p", [1e-30, 1e-38, 1e-45, 1e-300])
def test_top_p_below_float32_normal_range_still_keeps_the_top_token(top_p):
    """The nucleus always holds the most likely token, however small top_p > 0 is; a top_p
    that float32 flushes to zero must not empty it (all -inf: token 0 for every row)."""
    got = _sample(jnp.asarray(LOGITS), jax.random.PRNGKey(0), jnp.float32(1.0), 0,
                  jnp.float32(top_p))
    np.testing.assert_array_equal(np.asarray(got), LOGITS.argmax(-1))


def test_generate_with_tiny_top_p_is_greedy(params):
    got = _gen(params, [3, 1, 4], temperature=1.0, top_p=1e-300, rng=jax.random.PRNGKey(4))
    assert list(got[0]) == reference_greedy(CFG, params, [3, 1, 4], N)


def test_top_k_samples_only_the_k_largest_and_all_of_them():
    logits = LOGITS[0]
    top3 = set(np.argsort(logits)[-3:].tolist())
    seen = set()
    for seed in range(4):
        draws = _draws(logits, 2000, temperature=3.0, top_k=3, seed=seed)
        assert set(draws.tolist()) <= top3
        seen |= set(draws.tolist())
    assert seen == top3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_empirical_frequencies_match_softmax_of_logits_over_temperature(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -3.0], np.float32)
    n = 20000
    freq = np.bincount(_draws(logits, n, temperature, seed=11), minlength=6) / n
    np.testing.assert_allclose(freq, _np_softmax(logits.astype(np.float64) / temperature),
                               atol=0.02, rtol=0)


def test_empirical_frequencies_with_top_k_are_renormalised_softmax_of_the_k_largest():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -3.0], np.float32)
    n = 20000
    freq = np.bincount(_draws(logits, n, top_k=3, seed=12), minlength=6) / n
    want = np.zeros(6)
    keep = np.argsort(logits)[-3:]
    want[keep] = _np_softmax(logits[keep].astype(np.float64))
    np.testing.assert_allclose(freq, want, atol=0.02, rtol=0)


def test_empirical_frequencies_with_top_p_are_renormalised_nucleus():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -3.0], np.float32)
    probs = _np_softmax(logits.astype(np.float64))
    order = np.argsort(-probs)
    top_p = 0.75
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), top_p) + 1]  # smallest set >= p
    assert probs[nucleus].sum() >= top_p > probs[nucleus[:-1]].sum()
    want = np.zeros(6)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    n = 20000
    freq = np.bincount(_draws(logits, n, top_p=top_p, seed=13), minlength=6) / n
    np.testing.assert_allclose(freq, want, atol=0.02, rtol=0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 16), temperature=st.floats(0.05, 3.0),
       top_k=st.sampled_from([0, 1, 3, 20]), top_p=st.floats(1e-30, 1.0))  # below: next test
def test_property_samples_lie_in_numpy_top_k_and_nucleus_set(seed, temperature, top_k, top_p):
    logits = np.random.default_rng(seed).normal(size=(64, 20)).astype(np.float32) * 3
    got = np.asarray(_sample(jnp.asarray(logits), jax.random.PRNGKey(seed),
                             jnp.float32(temperature), top_k, jnp.float32(top_p)))
    for row, token in zip(logits.astype(np.float64), got):
        allowed = np.ones(20, bool)
        if top_k:
            allowed &= row >= np.sort(row)[-top_k]
        scaled = np.where(allowed, row / temperature, -np.inf)
        probs = _np_softmax(scaled)
        order = np.argsort(-scaled, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        ruled_out = order[before > top_p + 1e-5]  # clearly outside the nucleus
        assert allowed[token] and token not in ruled_out


# ---------------------------------------------------------------------------------------------
# complete


def _config(batching="random"):
    return Config(CFG, TrainConfig(batching=batching))


def test_complete_empty_prompt_starts_from_start_symbol(params):
    got = complete(_config(), TOK, params, "", max_new_tokens=N, temperature=0.0)
    want = reference_greedy(CFG, params, [TOK.start_id], N)
    assert got == [TOK.decode(want, skip_specials=True)]


def test_complete_stream_model_prepends_start_to_a_prompt(params):
    got = complete(_config("stream"), TOK, params, "cat", max_new_tokens=N, temperature=0.0)
    want = reference_greedy(CFG, params, [TOK.start_id, *TOK.encode("cat")], N)
    assert got == ["cat" + TOK.decode(want, skip_specials=True)]
    plain = complete(_config(), TOK, params, "cat", max_new_tokens=N, temperature=0.0)
    assert plain == ["cat" + TOK.decode(reference_greedy(CFG, params, TOK.encode("cat"), N),
                                        skip_specials=True)]


def test_complete_warns_naming_unseen_characters_and_reads_them_as_unknown(params):
    messages = []
    got = complete(_config(), TOK, params, "cat Zx", max_new_tokens=N, temperature=0.0,
                   warn=messages.append)
    assert len(messages) == 1 and "'Z'" in messages[0] and "'x'" in messages[0]
    assert "'c'" not in messages[0]
    ids = [*TOK.encode("cat "), TOK.unknown_id, TOK.unknown_id]
    assert got == ["cat Zx" + TOK.decode(reference_greedy(CFG, params, ids, N), skip_specials=True)]
    quiet = []
    complete(_config(), TOK, params, "cat", max_new_tokens=N, warn=quiet.append)
    assert quiet == []


def test_complete_prompt_longer_than_max_len_does_not_crash(params):
    prompt = "the cat sat on a mat; the cat sat"
    assert len(prompt) > W
    (got,) = complete(_config(), TOK, params, prompt, max_new_tokens=N, temperature=0.0)
    want = reference_greedy(CFG, params, TOK.encode(prompt), N)
    assert got == prompt + TOK.decode(want, skip_specials=True)


def test_complete_num_samples_gives_that_many_different_samples_starting_with_prompt(soft_params):
    got = complete(_config(), TOK, soft_params, "a c", max_new_tokens=N, temperature=1.0,
                   num_samples=3, seed=5)
    assert len(got) == 3 and len(set(got)) == 3
    assert all(s.startswith("a c") and len(s) <= 3 + N for s in got)
    again = complete(_config(), TOK, soft_params, "a c", max_new_tokens=N, temperature=1.0,
                     num_samples=3, seed=5)
    assert again == got


# ---------------------------------------------------------------------------------------------
# property tests of generate's arguments

prompts = st.lists(st.integers(0, TOK.vocab_size - 1), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(prompt=prompts, temperature=st.floats(0.0, 3.0), top_p=st.floats(0.0, 1.0, exclude_min=True),
       seed=st.integers(0, 2 ** 31 - 1))
def test_property_generate_any_temperature_top_p_prompt_gives_ids_in_range(
        soft_params, prompt, temperature, top_p, seed):
    out = _gen(soft_params, prompt, num_samples=3, temperature=temperature, top_p=top_p,
               rng=jax.random.PRNGKey(seed))  # the shapes of a compile shared with tests above
    assert out.shape == (3, N) and out.dtype == np.int32
    assert ((0 <= out) & (out < CFG.vocab_size)).all()
    if temperature == 0.0:
        assert (out == out[0]).all()


@settings(max_examples=8, deadline=None)
@given(prompt=prompts, temperature=st.floats(0.0, 3.0), top_k=st.integers(0, CFG.vocab_size),
       top_p=st.floats(0.0, 1.0, exclude_min=True), num_samples=st.integers(1, 3),
       max_new_tokens=st.integers(0, 20), seed=st.integers(0, 2 ** 31 - 1))
def test_property_generate_any_static_arguments_give_right_shape_and_ids_in_range(
        soft_params, prompt, temperature, top_k, top_p, num_samples, max_new_tokens, seed):
    """Every example with new (top_k, num_samples, max_new_tokens) compiles: few examples."""
    out = _gen(soft_params, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
               top_p=top_p, num_samples=num_samples, rng=jax.random.PRNGKey(seed))
    assert out.shape == (num_samples, max_new_tokens) and out.dtype == np.int32
    assert ((0 <= out) & (out < CFG.vocab_size)).all()


# ---------------------------------------------------------------------------------------------
# the streaming decoder: rows, chunks, ends


def _decoder(params, rows, **kw):
    return Decoder(Transformer(CFG), params, rows=rows, **kw)


def _drain(decoder) -> list[list[int]]:
    got = [[] for _ in range(decoder.size)]
    while decoder.left.any():
        for row, new in zip(got, decoder.advance()):
            row.extend(int(t) for t in new[new != FREE])
    return got


def test_rows_of_different_prompts_placed_at_different_times_each_decode_as_if_alone(soft_params):
    """Continuous batching changes nothing a row sees: prompts of different lengths (one past
    the window), settings and seeds side by side, one row placed two chunks late, all past
    several slides of the window, each equal to `generate` of that prompt alone."""
    asks = [([3, 1, 4], dict(temperature=0.0)),
            ([2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4], dict(temperature=1.0, top_p=0.9)),
            ([5], dict(temperature=0.7))]
    alone = [_gen(soft_params, prompt, rng=jax.random.PRNGKey(10 + i), **kw)[0].tolist()
             for i, (prompt, kw) in enumerate(asks)]
    decoder = _decoder(soft_params, 4, max_chunk=4, chunk_seconds=None)
    got = [[] for _ in range(4)]

    def place(i, slot):
        prompt, kw = asks[i]
        decoder.place([slot], prompt, jax.random.split(jax.random.PRNGKey(10 + i), 1),
                      max_new_tokens=N, **kw)

    place(0, 3)
    place(1, 0)
    for chunk in range(20):
        if chunk == 2:
            place(2, 1)  # slot 2 stays free throughout
        for row, new in zip(got, decoder.advance()):
            row.extend(new[new != FREE].tolist())
    assert [got[3], got[0], got[1]] == alone and got[2] == []
    assert not decoder.left.any()


def test_batched_chunks_read_the_cache_prefix_they_need_and_decode_as_alone(soft_params,
                                                                          monkeypatch):
    """From 4 rows on a chunk reads the cache's first W/4, W/2, 3W/4 or all W positions, the
    fewest that hold every live row to the chunk's end: one-step chunks from one-token prompts
    pass through all four and the slides, each row equal to `generate` of its prompt alone; a
    prefix too short for the rows is refused."""
    asks = [([5], 0.0), ([3], 1.0), ([2], 0.7), ([7], 0.0)]
    alone = [_gen(soft_params, prompt, rng=jax.random.PRNGKey(10 + i), temperature=t)[0].tolist()
             for i, (prompt, t) in enumerate(asks)]
    seen, chunk = [], sampling._chunk
    monkeypatch.setattr(sampling, "_chunk",
                        lambda *a, **k: seen.append(k["span"]) or chunk(*a, **k))
    decoder = _decoder(soft_params, 4, max_chunk=1, chunk_seconds=None)
    assert decoder.spans(4) == [W // 4, W // 2, 3 * W // 4, W] and decoder.spans(2) == [W]
    for i, (prompt, t) in enumerate(asks):
        decoder.place([i], prompt, jax.random.split(jax.random.PRNGKey(10 + i), 1),
                      max_new_tokens=N, temperature=t)
    got = [new[new != FREE].tolist() for new in decoder.advance()]  # positions 1 -> 2
    with pytest.raises(ValueError, match=f"span={W // 4} is not one of"):
        decoder.advance(span=W // 4)  # a step from position 2 needs 3
    assert [a + b for a, b in zip(got, _drain(decoder))] == alone
    assert seen[:3] == [W // 4, W // 2, W // 2] and set(seen) == set(decoder.spans(4))


def test_a_chunk_reads_no_further_than_its_rows_may_produce(soft_params):
    """A chunk of up to 16 steps whose rows may make one token more each fits in W/4 (what
    serving's warm-up asks for, however many steps the chunks have grown to)."""
    decoder = _decoder(soft_params, 4, max_chunk=16, chunk_seconds=None)
    decoder.place([3], [5], jax.random.split(jax.random.PRNGKey(0), 1), max_new_tokens=1)
    out = decoder.advance(span=W // 4)  # position 1 -> 2 = W/4
    assert (out[3] != FREE).sum() == 1 and not decoder.left.any()


def test_streamed_chunks_give_the_tokens_of_one_call(soft_params):
    prompt, rng = [3, 1, 4], jax.random.PRNGKey(2)
    one_call = _gen(soft_params, prompt, num_samples=2, rng=rng)
    decoder = _decoder(soft_params, 2, max_chunk=3, chunk_seconds=None)
    decoder.place([0, 1], prompt, jax.random.split(rng, 2), max_new_tokens=N)
    assert _drain(decoder) == one_call.tolist()


def test_adaptive_chunks_stay_within_bounds_and_lose_no_token(soft_params):
    decoder = _decoder(soft_params, 1, max_chunk=16, chunk_seconds=1e-9)  # always 1 step
    decoder.place([0], [3, 1, 4], jax.random.split(jax.random.PRNGKey(2), 1), max_new_tokens=N)
    first = decoder.advance()
    assert (first != FREE).sum() == 1
    rest = _drain(decoder)[0]
    assert [int(first[0][0]), *rest] == _gen(soft_params, [3, 1, 4],
                                             rng=jax.random.PRNGKey(2))[0].tolist()


def test_a_row_ends_at_the_end_symbol_not_emitting_it_while_another_goes_on(params):
    prompt = [3, 1, 4]
    want = reference_greedy(CFG, params, prompt, N)
    k = next(i for i in range(2, N) if want[i] not in want[:i])  # a token first drawn late
    end = want[k]
    decoder = _decoder(params, 2, end_id=end, max_chunk=8, chunk_seconds=None)
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    decoder.place([0], prompt, keys, max_new_tokens=N, temperature=0.0)
    decoder.place([1], [5], keys, max_new_tokens=N, temperature=0.0)
    got = _drain(decoder)
    assert got[0] == want[:k]
    other = reference_greedy(CFG, params, [5], N)
    assert got[1] == other[:other.index(end)] if end in other else got[1] == other


def test_a_finished_row_stops_changing_and_its_slot_is_free_again(soft_params):
    decoder = _decoder(soft_params, 2, max_chunk=4, chunk_seconds=None)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    decoder.place([0, 1], [3, 1, 4], keys, max_new_tokens=N)
    decoder.advance()
    decoder.finish([0])
    assert decoder.left.tolist() == [0, N - 4]
    out = decoder.advance()
    assert (out[0] == FREE).all() and (out[1] != FREE).all()
    decoder.place([0], [2, 2], keys[:1], max_new_tokens=3, temperature=0.0)
    assert _drain(decoder)[0] == reference_greedy(CFG, soft_params, [2, 2], 3)


def test_a_chunk_ends_once_every_row_is_done(soft_params):
    decoder = _decoder(soft_params, 2, max_chunk=64, chunk_seconds=None)
    decoder.place([0, 1], [1], jax.random.split(jax.random.PRNGKey(1), 2), max_new_tokens=3)
    out = decoder.advance()
    assert out.shape == (2, 64) and (out[:, :3] != FREE).all() and (out[:, 3:] == FREE).all()
    assert not decoder.left.any()


# ---------------------------------------------------------------------------------------------
# text streams and stop strings


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=200, deadline=None)
@given(text=st.text("ab c\n", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text("ab c\n", min_size=1, max_size=3), max_size=3))
def test_property_a_text_stream_ends_before_the_first_stop_however_the_text_arrives(
        text, cuts, stops):
    stream = TextStream(lambda piece, final=False: "".join(piece), stops)
    out = "".join(stream.push(list(piece)) for piece in _split(text, cuts)) + stream.close()
    found = [(at + len(s), at) for s, at in ((s, text.find(s)) for s in stops) if at >= 0]
    assert out == (text[:min(found)[1]] if found else text)  # the stop completed first
    assert stream.stopped == bool(found)


def test_a_text_stream_holds_back_only_what_may_begin_a_stop():
    stream = TextStream(lambda piece, final=False: piece, ["END", "\n\n"])
    assert stream.push("the E") == "the"  # " E" may begin END
    assert stream.push("N") == " "
    assert stream.push("D and more") == "" and stream.stopped
    assert stream.push("x") == "" and stream.close() == ""


def test_the_stop_completed_first_wins_however_the_text_arrives():
    for pieces in (["aba"], ["ab", "a"], ["a", "b", "a"]):
        stream = TextStream(lambda piece, final=False: piece, ["aba", "b"])
        assert "".join(stream.push(p) for p in pieces) + stream.close() == "a"


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="stop string"):
        TextStream(lambda piece, final=False: piece, ["a", ""])


# ---------------------------------------------------------------------------------------------
# Sampler: requests of text


def _sampler(params, rows=3, **kw):
    return text_sampler(_config(), TOK, params, rows=rows, **kw)


def test_a_request_of_n_samples_is_generate_with_its_seed(soft_params):
    sampler = _sampler(soft_params, ignore_end=True)  # generate knows no end symbol
    job = sampler.start("a c", Settings(N, 1.0, 1.0, n=3, seed=9))
    texts = ["", "", ""]
    for piece in sampler.run(job):
        texts[piece.index] += piece.text
    want = _gen(soft_params, TOK.encode("a c"), num_samples=3, rng=jax.random.PRNGKey(9))
    assert texts == [TOK.decode(row, skip_specials=True) for row in want]
    assert job.finish_reasons == ["length"] * 3 and job.produced == [N] * 3
    assert job.prompt_tokens == 3 and not sampler.busy


def test_finish_reasons_say_stop_for_a_stop_string_and_the_end_symbol(params):
    ids = reference_greedy(CFG, params, TOK.encode("cat"), N)
    greedy = TOK.decode(ids, skip_specials=True)
    stop = greedy[5:7]
    sampler = _sampler(params, ignore_end=True)
    job = sampler.start("cat", Settings(N, 0.0, stops=(stop,)))
    text = "".join(p.text for p in sampler.run(job))
    assert text == greedy[:greedy.find(stop)] and job.finish_reasons == ["stop"]
    assert sampler.free == 3  # a stopped row's slot is released

    class EndsAt:  # TOK, but its end symbol is a token these weights draw
        end_id = next(t for i, t in enumerate(ids) if i > 1 and t not in ids[:i])

        def __getattr__(self, name):
            return getattr(TOK, name)

    sampler = text_sampler(_config(), EndsAt(), params)
    job = sampler.start("cat", Settings(N, 0.0))
    text = "".join(p.text for p in sampler.run(job))
    assert text == TOK.decode(ids[:ids.index(EndsAt.end_id)], skip_specials=True)
    assert job.finish_reasons == ["stop"] and job.produced == [ids.index(EndsAt.end_id)]


def test_a_cancelled_job_frees_its_rows_and_others_go_on(soft_params):
    sampler = _sampler(soft_params, rows=3, ignore_end=True)
    a = sampler.start("a", Settings(N, 1.0, n=2, seed=1))
    with pytest.raises(ValueError, match="free rows"):
        sampler.start("b", Settings(N, n=2))
    b = sampler.start("b", Settings(N, 1.0, seed=2))
    text = "".join(p.text for p in sampler.step() if p.job is b)
    sampler.cancel(a)
    assert sampler.free == 2 and a.done and a.finish_reasons == ["cancelled"] * 2
    text += "".join(p.text for p in sampler.run(b))
    want = _gen(soft_params, TOK.encode("b"), rng=jax.random.PRNGKey(2))
    assert text == TOK.decode(want[0], skip_specials=True) and b.finish_reasons == ["length"]


def test_zero_new_tokens_is_done_at_once(params):
    sampler = _sampler(params)
    job = sampler.start("cat", Settings(0))
    assert job.done and job.finish_reasons == ["length"] and not sampler.busy
