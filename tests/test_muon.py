"""Muon with the Newton-Schulz iterations stacked by shape, against optax's own Muon (the
reference for both the state and the updates) and against the iteration written in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer_jax import muon, training
from transformer_jax.config import TrainConfig


def _params(rng) -> dict:
    """Kernels of one shape twice, its transpose, a scanned (L, in, out) stack, a square one,
    and leaves AdamW trains (an embedding, a bias)."""
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    return {"embed": {"embedding": draw(7, 6)},
            "trunk": {"block_0": {"up": {"kernel": draw(6, 10), "bias": draw(10)},
                                  "down": {"kernel": draw(10, 6)}},
                      "block_1": {"up": {"kernel": draw(6, 10)}, "out": {"kernel": draw(6, 6)}},
                      "blocks": {"qkv": {"kernel": draw(3, 6, 10)}}}}


def optax_muon(cfg: TrainConfig) -> optax.GradientTransformation:
    """What training.optimizer built before muon.py: optax's Muon, one matrix at a time."""
    schedule = training.learning_rate(cfg)
    dims = lambda params: jax.tree.map(
        lambda m, p: optax.contrib.MuonDimensionNumbers(p.ndim - 2, p.ndim - 1) if m else None,
        training.muon_matrices(params), params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.contrib.muon(lambda step: schedule(step) * (cfg.muon_lr / cfg.lr), ns_steps=3,
                           preconditioning="aol", weight_decay=cfg.weight_decay,
                           adam_b1=cfg.beta1, adam_b2=cfg.beta2,
                           adam_weight_decay=cfg.weight_decay, adam_learning_rate=schedule,
                           muon_weight_dimension_numbers=dims))


CFG = TrainConfig(optimizer="muon", lr=0.01, muon_lr=0.05, warmup_steps=2, decay_steps=10,
                  min_lr=0.001, weight_decay=0.1, grad_clip=1.0)


def test_state_is_optaxs_leaf_for_leaf():
    """The same tree (so a checkpoint of either restores into the other) and the same values."""
    params = _params(np.random.default_rng(0))
    ours, theirs = training.optimizer(CFG).init(params), optax_muon(CFG).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    paths = lambda tree: [jax.tree_util.keystr(p) for p, _ in
                          jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths(ours) == paths(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_updates_equal_optaxs_over_several_steps():
    rng = np.random.default_rng(1)
    params = _params(rng)
    ours, theirs = training.optimizer(CFG), optax_muon(CFG)
    step = lambda tx: jax.jit(lambda g, s, p: tx.update(g, s, p))
    ours_step, theirs_step = step(ours), step(theirs)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for t in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        u_ours, s_ours = ours_step(grads, s_ours, params)
        u_theirs, s_theirs = theirs_step(grads, s_theirs, params)
        for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_theirs, s_theirs))):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=f"step {t}")
        if t:
            assert all(np.any(u) for u in jax.tree.leaves(u_ours))  # every leaf moved
        params = optax.apply_updates(params, u_ours)


def _newton_schulz_np(x: np.ndarray, steps: int) -> np.ndarray:
    """The iteration in float64 numpy, one matrix (M <= K) at a time."""
    a, b, c = muon.NS_COEFFS
    x = x.astype(np.float64)
    s = 1 / np.sqrt(np.maximum(np.abs(x @ x.T).sum(1), 1e-8))
    x = x * s[:, None]
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_newton_schulz_is_the_quintic_after_aol(steps):
    x = np.random.default_rng(2).normal(size=(4, 5, 9)).astype(np.float32)
    got = muon.newton_schulz(jnp.asarray(x), jnp.asarray(muon.NS_COEFFS), steps)
    want = np.stack([_newton_schulz_np(m, steps) for m in x])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if steps == 5:  # near the polar factor: singular values in the quintic's band
        singular = np.linalg.svd(np.asarray(got), compute_uv=False)
        assert singular.min() > 0.6 and singular.max() < 1.3, singular


def test_orthogonalize_stacks_by_shape_and_keeps_each_matrix_apart():
    """Each array comes back with its shape, equal to its matrices orthogonalised one by one
    (a transposed shape through the transposed iteration), and zero matrices (the padding of
    a split stack) stay zero."""
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=s).astype(np.float32) for s in
              [(6, 10), (10, 6), (3, 6, 10), (6, 6), (2, 6, 6)]] + [np.zeros((6, 10), np.float32)]
    coeffs = jnp.asarray(muon.NS_COEFFS)
    got = muon.orthogonalize([jnp.asarray(a) for a in arrays], coeffs, 3)
    for a, g in zip(arrays, got):
        assert g.shape == a.shape
        for m, out in zip(a.reshape(-1, *a.shape[-2:]), np.asarray(g).reshape(-1, *a.shape[-2:])):
            want = (_newton_schulz_np(m, 3) if m.shape[0] <= m.shape[1]
                    else _newton_schulz_np(m.T, 3).T)
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(got[-1]))
