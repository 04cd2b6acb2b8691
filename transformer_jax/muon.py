"""Muon (Jordan et al. 2024) for the trunk's weight matrices and AdamW for everything else,
as optax's `contrib.muon` composes them, with one change: the Newton-Schulz iterations run on
stacks of same-shaped matrices, split over the devices of the data mesh, instead of on one
matrix at a time, each replicated on every device.

On a 2-core CPU with the `fast` preset's 8 matrices over 2 devices a step takes about a tenth
less time (benchmarks/muon.py; benchmarks/RESULTS.md). The optimizer state is optax's own,
leaf for leaf, so checkpoints written with either resume with the other, and the updates agree
with optax's to float32 rounding (tests/test_muon.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

# The quintic's coefficients (Jordan et al.), optax's default.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x_NxMxK: jax.Array, coeffs: jax.Array, steps: int, eps: float = 1e-8
                  ) -> jax.Array:
    """`steps` quintic Newton-Schulz iterations X <- aX + (bA + cA^2)X, A = XX^T, towards the
    nearest semi-orthogonal matrix of each of N matrices (M <= K), the first preconditioned by
    AOL (Boissin et al. 2025): rows scaled by the rsqrt of |XX^T|'s row sums.

    Args:
      x_NxMxK: the matrices, M <= K.
      coeffs: (3,) the quintic's a, b, c.
    Returns:
      (N, M, K), the same dtype.
    """
    a, b, c = coeffs.astype(x_NxMxK.dtype)
    x = x_NxMxK
    gram = x @ jnp.swapaxes(x, -1, -2)
    scale_NxMx1 = jax.lax.rsqrt(jnp.maximum(jnp.abs(gram).sum(-1), eps))[..., None]
    x, gram = x * scale_NxMx1, gram * scale_NxMx1 * jnp.swapaxes(scale_NxMx1, -1, -2)
    for i in range(steps):
        if i:
            gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def orthogonalize(matrices: list[jax.Array], coeffs: jax.Array, steps: int, mesh=None
                  ) -> list[jax.Array]:
    """`newton_schulz` of the trailing (A, B) matrices of each (..., A, B) array.

    Matrices of one shape up to transposition (a layer's up and down projections, the same
    projection in every layer) go through it as one stack, the short side first; with a mesh
    of several devices each stack is padded to a multiple of its size with zero matrices
    (which stay zero) and split along its `data` axis, so each device orthogonalises its share
    and XLA gathers the results.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(matrices):
        groups.setdefault(tuple(sorted(x.shape[-2:])), []).append(i)
    split = mesh is not None and mesh.devices.size > 1
    out: list[Any] = [None] * len(matrices)
    short_first = lambda x, tall: jnp.swapaxes(x, 1, 2) if tall else x  # its own inverse
    for index in groups.values():
        flat = [matrices[i].reshape(-1, *matrices[i].shape[-2:]) for i in index]
        tall = [x.shape[1] > x.shape[2] for x in flat]
        stack_NxMxK = jnp.concatenate([short_first(x, t) for x, t in zip(flat, tall)])
        n = stack_NxMxK.shape[0]
        if split:
            stack_NxMxK = jax.lax.with_sharding_constraint(
                jnp.pad(stack_NxMxK, ((0, -n % mesh.devices.size), (0, 0), (0, 0))),
                NamedSharding(mesh, P("data")))
        done_NxMxK = newton_schulz(stack_NxMxK, coeffs, steps)
        if split:
            done_NxMxK = jax.lax.with_sharding_constraint(done_NxMxK, NamedSharding(mesh, P()))
        start = 0
        for i, x, t in zip(index, flat, tall):
            out[i] = short_first(done_NxMxK[start:start + x.shape[0]], t).reshape(
                matrices[i].shape)
            start += x.shape[0]
    return out


def scale_by_muon(steps: int, beta: float = 0.95, mesh=None) -> optax.GradientTransformation:
    """Nesterov momentum, orthogonalised (`orthogonalize`): optax's `scale_by_muon` with AOL
    preconditioning and its state (`optax.contrib.MuonState`)."""
    def init(params):
        return optax.contrib.MuonState(count=jnp.zeros([], jnp.int32),
                                       mu=optax.tree.zeros_like(params),
                                       ns_coeffs=jnp.asarray(NS_COEFFS))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                              optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                              optax.tree.bias_correction(updates, beta, count))
        leaves, treedef = jax.tree.flatten(mu_hat)
        done = orthogonalize(leaves, state.ns_coeffs, steps, mesh)
        return (jax.tree.unflatten(treedef, done),
                optax.contrib.MuonState(count=count, mu=mu, ns_coeffs=state.ns_coeffs))

    return optax.GradientTransformation(init, update)


def scale_by_width() -> optax.GradientTransformation:
    """Each (..., D_in, D_out) update times sqrt(max(1, D_out / D_in)) (Jordan's width rule,
    optax's default for Muon)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda u: u * max(1.0, u.shape[-1] / u.shape[-2]) ** 0.5, updates))


def muon(learning_rate: optax.ScalarOrSchedule, adam_learning_rate: optax.ScalarOrSchedule,
         is_matrix: Callable[[Any], Any], *, steps: int = 3, weight_decay: float = 0.0,
         adam_b1: float = 0.9, adam_b2: float = 0.999, mesh=None
         ) -> optax.GradientTransformation:
    """Muon where `is_matrix(params)` (a tree of booleans) says so, AdamW (Nesterov, as optax's
    Muon has it) elsewhere, both with decoupled weight decay: the transformation and state tree
    of `optax.contrib.muon(..., preconditioning="aol")`."""
    matrices = optax.chain(scale_by_muon(steps, mesh=mesh), scale_by_width(),
                           optax.add_decayed_weights(weight_decay),
                           optax.scale_by_learning_rate(learning_rate))
    rest = optax.adamw(adam_learning_rate, adam_b1, adam_b2, eps=1e-8,
                       weight_decay=weight_decay, nesterov=True)
    return optax.partition(
        {"muon": matrices, "adam": rest},
        lambda params: jax.tree.map(lambda m: "muon" if m else "adam", is_matrix(params)))
