"""Tiny shared helpers for the model and sampling tests."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import TransformerConfig
from transformer_jax.model import Transformer

TINY = dict(vocab_size=20, d_model=16, layers=2, heads=2, d_ff=32, max_len=16,
            activation="relu", norm="pre", positions="learned")


def tiny_config(**overrides) -> TransformerConfig:
    """A model small enough that every test compiles and runs in well under a second."""
    return TransformerConfig(**{**TINY, **overrides})


def random_params(config: TransformerConfig, seed: int = 0, scale: float = 0.5):
    """Parameters of `config`'s tree with every leaf redrawn at `scale` (layer-norm scales near
    1), so that attention is far from uniform and every parameter visibly matters."""
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), ids)["params"]
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(params)

    def draw(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if getattr(path[-1], "key", None) == "scale":
            return 1.0 + 0.2 * noise
        return scale * noise

    leaves = [draw(path, leaf) for path, leaf in flat[0]]
    return jax.tree_util.tree_unflatten(flat[1], [jnp.asarray(x) for x in leaves])


@functools.cache
def forward(config: TransformerConfig, train: bool = False):
    """Compiled full forward pass (params, ids[, valid][, rngs]) -> float32 logits."""
    return jax.jit(functools.partial(Transformer(config).apply, train=train))


def with_(config: TransformerConfig, **changes) -> TransformerConfig:
    return dataclasses.replace(config, **changes)


def option_strings(parser) -> set[str]:
    """Every option string (--flag) of an argparse parser."""
    return {opt for action in parser._actions for opt in action.option_strings}
