"""Tests for the attention of transformer_jax.model against a numpy reference written with
loops: each query's softmax-weighted mean of the values over the keys its mask allows, with
padding, causality and the decoding cache's offsets. float32 within 1e-5; cuDNN's kernel, on an
NVIDIA GPU only, in bfloat16 within its rounding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from transformer_jax.model import CausalSelfAttention, attention, cudnn_attention_fits

TOL = dict(atol=1e-5, rtol=1e-5)


def np_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS) -> np.ndarray:
    """float64 reference; a query with no allowed key is left at zero (never compared)."""
    B, T, H, K = q_BxTxHxK.shape
    out = np.zeros((B, T, H, K))
    for b in range(B):
        for t in range(T):
            allowed = np.flatnonzero(mask_BxTxS[b, t])
            for h in range(H):
                scores = [q_BxTxHxK[b, t, h] @ k_BxSxHxK[b, s, h] / math.sqrt(K) for s in allowed]
                w = np.exp(np.array(scores) - max(scores, default=0.0))
                out[b, t, h] = sum(wi * v_BxSxHxK[b, s, h] for wi, s in zip(w / w.sum(), allowed))
    return out


def causal_mask(T: int, valid_BxS: np.ndarray, offset: int = 0) -> np.ndarray:
    """Query t (at position offset + t) may see key s when s <= offset + t and s is valid."""
    B, S = valid_BxS.shape
    return np.array([[[s <= offset + t and valid_BxS[b, s] for s in range(S)]
                      for t in range(T)] for b in range(B)])


def _valid(B: int, S: int) -> np.ndarray:
    """Pads at the start of row 0 (its first query sees nothing), inside and at the end."""
    valid = np.ones((B, S), bool)
    valid[0, :2] = False
    valid[-1, S // 2] = False
    valid[-1, -1] = False
    return valid


def _qkv(B, T, S, H=2, K=8, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.normal(size=(B, n, H, K)).astype(np.float32)
    return draw(T), draw(S), draw(S)


def _compare(got, want, mask_BxTxS, **tol):
    """Only queries that see at least one key: the others' outputs are never used."""
    seen = mask_BxTxS.any(-1)
    np.testing.assert_allclose(np.asarray(got)[seen], want[seen], **(tol or TOL))


@pytest.mark.parametrize("fused", [None, "xla"])
@pytest.mark.parametrize("T,S,offset,pads", [
    (9, 9, 0, False),   # causal only (training without padding)
    (9, 9, 0, True),    # causal with pad keys
    (3, 12, 4, True),   # decoding: 3 new queries at positions 4..6 of a 12-slot cache
    (1, 12, 11, True),  # one token at the cache's last slot
])
def test_attention_matches_numpy_reference(fused, T, S, offset, pads):
    """The einsum path, and the fused call with the arguments the cuDNN path passes (run here
    by XLA's implementation), both equal the reference."""
    q, k, v = _qkv(3, T, S)
    valid = _valid(3, S) if pads else np.ones((3, S), bool)
    mask = causal_mask(T, valid, offset)
    heads_first = lambda x: jnp.asarray(x).swapaxes(1, 2)  # (B, S, H, K) -> (B, H, S, K)
    got = attention(jnp.asarray(q), heads_first(k), heads_first(v), jnp.asarray(mask),
                    fused=fused)
    assert got.shape == q.shape and got.dtype == jnp.float32
    _compare(got, np_attention(q, k, v, mask), mask)


def _module_reference(params, x_BxTxD, mask_BxTxS, heads):
    """The module from its parameters: qkv projection, per-head attention, out projection."""
    B, T, D = x_BxTxD.shape
    dense = lambda x, p: x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
    qkv = dense(x_BxTxD, params["qkv"])
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, T, heads, D // heads) for i in range(3))
    return dense(np_attention(q, k, v, mask_BxTxS).reshape(B, T, D), params["out"])


def _module_and_params(cfg, B, T):
    x = np.random.default_rng(1).normal(size=(B, T, cfg.d_model)).astype(np.float32)
    module = CausalSelfAttention(cfg)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float32),
                          shapes)
    return module, params, x


def test_self_attention_with_padding_matches_numpy_reference():
    cfg = tiny_config(heads=4, d_model=16)
    module, params, x = _module_and_params(cfg, 3, 10)
    valid = _valid(3, 10)
    got = module.apply({"params": params}, jnp.asarray(x), jnp.asarray(valid))
    mask = causal_mask(10, valid)
    _compare(got, _module_reference(params, x, mask, cfg.heads), mask)


def test_cached_self_attention_over_two_calls_matches_numpy_reference():
    """A prefill of 6 tokens then 3 more at offset 6: the second call's queries see the cached
    keys (minus the pads written by the first call) and their own, causally."""
    cfg = tiny_config(heads=4, d_model=16, max_len=12)
    module, params, x = _module_and_params(cfg, 3, 9)
    valid = _valid(3, 9)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.asarray(x[:, :1]),
                                                   offset=0, decode=True))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
    step = jax.jit(lambda cache, x, valid, offset: module.apply(
        {"params": params, "cache": cache}, x, valid, offset=offset, decode=True,
        mutable=["cache"]))
    out1, vars_ = step(cache, jnp.asarray(x[:, :6]), jnp.asarray(valid[:, :6]), 0)
    out2, _ = step(vars_["cache"], jnp.asarray(x[:, 6:]), jnp.asarray(valid[:, 6:]), 6)
    mask = causal_mask(9, valid)
    want = _module_reference(params, x, mask, cfg.heads)
    _compare(out1, want[:, :6], mask[:, :6, :6])
    _compare(out2, want[:, 6:], mask[:, 6:])


def test_cudnn_is_never_chosen_off_an_nvidia_gpu_nor_for_float32_or_unfit_shapes():
    q = lambda dtype, K=8, T=4: jnp.zeros((1, T, 2, K), dtype)
    if "cuda" not in jax.extend.backend.get_backend().platform_version:
        assert not cudnn_attention_fits(q(jnp.bfloat16))
    assert not cudnn_attention_fits(q(jnp.float32))
    assert not cudnn_attention_fits(q(jnp.bfloat16, K=4))  # head dim not a multiple of 8
    assert not cudnn_attention_fits(q(jnp.bfloat16, T=5))  # odd length with a mask


@pytest.mark.skipif(not cudnn_attention_fits(jnp.zeros((1, 8, 2, 8), jnp.bfloat16)),
                    reason="needs cuDNN's fused attention (an NVIDIA GPU)")
def test_cudnn_attention_in_bfloat16_matches_numpy_reference():
    """Within bfloat16 rounding of the reference on the same inputs (the explicit path and
    XLA's fused one: 0.01 off at most on CPU)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(3, 16, 16, K=64))
    mask = causal_mask(16, _valid(3, 16))
    got = attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.asarray(mask), fused="cudnn")
    f64 = lambda x: np.asarray(x, np.float64)
    _compare(f64(got), np_attention(f64(q), f64(k), f64(v), mask), mask,
             atol=3e-2, rtol=3e-2)
