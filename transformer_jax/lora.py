"""Low-rank adapters (LoRA, Hu et al. 2021) of a frozen model's weight matrices.

An adapted Dense layer computes x (W + s A B) + b with W frozen, A (in, r) and B (r, out)
trained and s = alpha / r; B starts at zero, so at initialisation the adapted model is the
base model exactly. Adapters live in their own tree, `{"trunk": {block: {attn|mlp: {name:
{"a", "b"}}}}}` beside the parameters they adapt (stacked (L, ...) like them under
`scan_layers`), so training keeps optimizer state and checkpoints for them alone; `merged`
folds them into the weights, which is what sampling, evaluation, serving and export use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util


def _targets(params: dict, targets: tuple[str, ...]) -> dict:
    """The adapted kernels of `params`: {path of its Dense layer: kernel (..., in, out)}."""
    flat = traverse_util.flatten_dict(params)
    return {path[:-1]: kernel for path, kernel in flat.items()
            if path[0] == "trunk" and path[-1] == "kernel" and path[-2] in targets}


def init_adapters(params: dict, targets: tuple[str, ...], rank: int, rng: jax.Array) -> dict:
    """Fresh adapters for the Dense layers of `params`' blocks named in `targets`: A of shape
    (..., in, r) drawn from N(0, 1/in), B (..., r, out) zero."""
    kernels = _targets(params, targets)
    if not kernels:
        raise ValueError(f"no weight matrix named {', '.join(targets)} to adapt")
    keys = jax.random.split(rng, len(kernels))
    adapters = {}
    for key, (path, w) in zip(keys, sorted(kernels.items())):
        *lead, d_in, d_out = w.shape
        adapters[(*path, "a")] = (jax.random.normal(key, (*lead, d_in, rank), jnp.float32)
                                  / jnp.sqrt(d_in))
        adapters[(*path, "b")] = jnp.zeros((*lead, rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(adapters)


def merged(params: dict, scale: float) -> dict:
    """`params` with its "lora" adapters folded in: each adapted kernel W becomes
    W + scale * A B (in W's dtype); without "lora", `params` as it is."""
    if "lora" not in params:
        return params
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "lora"})
    adapters = traverse_util.flatten_dict(params["lora"])
    for *layer, part in adapters:
        if part == "a":
            w = flat[(*layer, "kernel")]
            update = adapters[(*layer, "a")] @ adapters[(*layer, "b")]
            flat[(*layer, "kernel")] = (w + scale * update).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)
