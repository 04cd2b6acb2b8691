"""Causal transformer in Flax linen: embedding, positions, L attention blocks, tied prediction;
and the same trunk over real-valued series.

Shapes are in names: B batch, T sequence (this call), S cache length, D d_model, H heads,
K head dim, F feed-forward size, V vocabulary.

Decoding (`decode=True`, mutable "cache") appends the T tokens of the call to a key/value cache
of length `max_len` at each row's own cache index (trunk/index, shape (B,)), so a prompt is one
call (prefill), each new token one more, and the rows of a batch may be at different positions
(sequences of different lengths decoded together). `init_cache` builds an empty cache. A cache
may also be cut to its first S < max_len positions (`cache_prefix`): a step then reads only
those, which is right while every row it serves stays below position S.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer_jax.config import TransformerConfig

_INIT = nn.initializers.normal(stddev=0.02)
_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
}


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
    """Vaswani et al.'s table: p[t, 2i] = sin(t / 10000^(2i/d)), p[t, 2i+1] = cos(same).

    Returns:
      float32 array (length, d_model).
    """
    t = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
    angle = t / np.power(10000.0, two_i / d_model)
    table = np.zeros((length, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return table.astype(np.float32)


def _dtype(config: TransformerConfig):
    return jnp.dtype(config.dtype)


def cudnn_attention_fits(q_BxTxHxK: jax.Array) -> bool:
    """Whether cuDNN's fused (flash) attention takes these queries in training: it needs an
    NVIDIA GPU from Ampere (compute capability 8.0) on, 16-bit floats, a head dim that is a
    multiple of 8 up to 128 and, with a mask, an even length."""
    _, T, _, K = q_BxTxHxK.shape
    if "cuda" not in jax.extend.backend.get_backend().platform_version:
        return False
    ampere = float(jax.devices()[0].compute_capability) >= 8.0
    return ampere and q_BxTxHxK.dtype.itemsize == 2 and K % 8 == 0 and K <= 128 and T % 2 == 0


def attention(q_BxTxHxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS, *, fused=None,
              drop_probs=lambda p: p):
    """Each query's average of the values, weighted by softmax(q . k / sqrt(K)) over the keys
    that `mask_BxTxS` allows; softmax statistics in (at least) float32 whatever the dtype.

    Keys and values come heads first, as the decoding cache holds them: each (row, head)'s
    (S, K) block is contiguous, so the products read the cache in place (keys laid out as
    (B, S, H, K) cost a transposed copy of the whole cache per layer and step).

    Args:
      fused: None computes it here (einsum, masked softmax, einsum); "xla" or "cudnn" calls
        `jax.nn.dot_product_attention` with that implementation instead.
      drop_probs: applied to the attention probabilities (dropout); ignored when fused.
    Returns:
      (B, T, H, K) array.
    """
    if fused:
        # With T == S query t is key t, so the mask is causal in the usual sense and saying
        # so lets cuDNN skip the blocks above the diagonal.
        return jax.nn.dot_product_attention(
            q_BxTxHxK, k_BxHxSxK.swapaxes(1, 2), v_BxHxSxK.swapaxes(1, 2),
            mask=mask_BxTxS[:, None], is_causal=q_BxTxHxK.shape[1] == k_BxHxSxK.shape[2],
            implementation=fused)
    # Scores leave the matmul in the compute dtype: a float32 product would make the backward
    # pass multiply float32 by 16-bit operands, off the fast 16-bit path.
    scores_BxHxTxS = jnp.einsum("bthk,bhsk->bhts", q_BxTxHxK, k_BxHxSxK)
    stats = jnp.promote_types(scores_BxHxTxS.dtype, jnp.float32)
    scores_BxHxTxS = scores_BxHxTxS.astype(stats) / np.sqrt(q_BxTxHxK.shape[-1])
    scores_BxHxTxS = jnp.where(mask_BxTxS[:, None], scores_BxHxTxS, jnp.finfo(stats).min)
    probs_BxHxTxS = drop_probs(jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(v_BxHxSxK.dtype))
    return jnp.einsum("bhts,bhsk->bthk", probs_BxHxTxS, v_BxHxSxK)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t (and valid keys only)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxTxD, valid_BxT=None, *, offset=None, decode=False, train=False,
                 layer=0):
        """Attend; with `decode`, write this call's keys/values into the cache at `offset`.

        Args:
          x_BxTxD: input hidden states.
          valid_BxT: optional bool mask of real (non-pad) tokens; pad keys are never attended.
          offset: int32 (B,) (or a scalar for every row), cache position of each row's first
            token of this call (decode only).
          layer: this block's index from 0, an int or (scanned layers) an int32 scalar; with
            `attn_scale_by_layer` the scores are divided by layer + 1.
        Returns:
          (B, T, D) output.
        """
        cfg = self.config
        B, T, _ = x_BxTxD.shape
        H, K = cfg.heads, cfg.head_dim
        dense = lambda n, name: nn.Dense(n, dtype=_dtype(cfg), kernel_init=_INIT, name=name)
        qkv_BxTx3D = dense(3 * cfg.d_model, "qkv")(x_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_BxTx3D.reshape(B, T, 3 * H, K), 3, axis=2)
        k_BxHxTxK, v_BxHxTxK = k_BxTxHxK.swapaxes(1, 2), v_BxTxHxK.swapaxes(1, 2)
        q_pos_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if decode:
            offset_B = jnp.broadcast_to(offset, (B,))
            # Each row's T new entries at its own offset (a row's update of its cache along S).
            write = lambda axis: jax.vmap(lambda cache, new, at: (
                jax.lax.dynamic_update_slice_in_dim(cache, new, at, axis=axis)))
            shape = (B, H, cfg.max_len, K)
            cached_k = self.variable("cache", "key", jnp.zeros, shape, k_BxTxHxK.dtype)
            cached_v = self.variable("cache", "value", jnp.zeros, shape, v_BxTxHxK.dtype)
            S = cached_k.value.shape[2]  # max_len, or fewer for a cache_prefix
            cached_k.value = write(1)(cached_k.value, k_BxHxTxK, offset_B)
            cached_v.value = write(1)(cached_v.value, v_BxHxTxK, offset_B)
            k_BxHxSxK, v_BxHxSxK = cached_k.value, cached_v.value
            q_pos_BxT = q_pos_BxT + offset_B[:, None]
            # Pads are cached too (as "pad", so init_cache's zeros mean "all valid"): a pad
            # written by an earlier call stays unattended.
            cached_pad = self.variable("cache", "pad", jnp.zeros, (B, S), bool)
            if valid_BxT is not None:
                cached_pad.value = write(0)(cached_pad.value, ~valid_BxT.astype(bool), offset_B)
            valid_BxT = ~cached_pad.value
        else:
            S, k_BxHxSxK, v_BxHxSxK = T, k_BxHxTxK, v_BxHxTxK
        mask_BxTxS = jnp.arange(S)[None, None, :] <= q_pos_BxT[:, :, None]
        if valid_BxT is not None:
            mask_BxTxS = mask_BxTxS & valid_BxT[:, None, :]
        if cfg.attn_scale_by_layer:  # scaling the queries scales the scores, fused or not
            q_BxTxHxK = q_BxTxHxK / jnp.asarray(layer + 1, q_BxTxHxK.dtype)
        drop = nn.Dropout(cfg.dropout)
        # The fused call has no dropout; decoding (few queries against the cache) and every
        # other backend or dtype take the explicit path (XLA's fused call is no faster on CPUs).
        plain = not decode and not (train and cfg.dropout > 0)
        fused = "cudnn" if plain and cudnn_attention_fits(q_BxTxHxK) else None
        out_BxTxHxK = attention(q_BxTxHxK, k_BxHxSxK, v_BxHxSxK, mask_BxTxS, fused=fused,
                                drop_probs=lambda p: drop(p, deterministic=not train))
        return dense(cfg.d_model, "out")(out_BxTxHxK.reshape(B, T, cfg.d_model))


class FeedForward(nn.Module):
    """Position-wise D -> F -> D with the configured activation."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        h_BxTxF = nn.Dense(cfg.d_ff, dtype=_dtype(cfg), kernel_init=_INIT, name="up")(x_BxTxD)
        h_BxTxF = _ACTIVATIONS[cfg.activation](h_BxTxF)
        return nn.Dense(cfg.d_model, dtype=_dtype(cfg), kernel_init=_INIT, name="down")(h_BxTxF)


class Block(nn.Module):
    """Attention and feed-forward, each a residual branch with layer norm after (post-LN, as in
    the lecture and Vaswani et al.) or before (pre-LN, as in GPT-2)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxTxD, valid_BxT=None, offset=None, decode=False, train=False,
                 layer=0):
        cfg = self.config
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=_dtype(cfg), name=name)
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=not train)
        attend = lambda y: CausalSelfAttention(cfg, name="attn")(
            y, valid_BxT, offset=offset, decode=decode, train=train, layer=layer)
        mlp = FeedForward(cfg, name="mlp")
        if cfg.norm == "pre":
            x_BxTxD = x_BxTxD + drop(attend(norm("ln1")(x_BxTxD)))
            return x_BxTxD + drop(mlp(norm("ln2")(x_BxTxD)))
        x_BxTxD = norm("ln1")(x_BxTxD + drop(attend(x_BxTxD)))
        return norm("ln2")(x_BxTxD + drop(mlp(x_BxTxD)))


class Trunk(nn.Module):
    """Positions, the L blocks and (pre-LN) the final layer norm: (B, T, D) -> (B, T, D).

    Shared by every head: the token language model here, real-valued heads elsewhere.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxTxD, valid_BxT=None, *, decode=False, train=False):
        cfg = self.config
        B, T = x_BxTxD.shape[:2]
        if T > cfg.max_len:
            raise ValueError(f"{T} tokens exceed the context window max_len={cfg.max_len}")
        offset_B = None
        pos_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if decode:
            index = self.variable("cache", "index", lambda: jnp.zeros((B,), jnp.int32))
            offset_B = index.value
            index.value = offset_B + T
            pos_BxT = pos_BxT + offset_B[:, None]
        if cfg.positions == "learned":
            table = self.param("positions", _INIT, (cfg.max_len, cfg.d_model))
        else:
            table = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model))
        # Clipped: a row whose cache is full may still be stepped (its output then discarded).
        x_BxTxD = (x_BxTxD + jnp.take(table, pos_BxT, axis=0, mode="clip")).astype(_dtype(cfg))
        x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=not train)
        # Rematerialised blocks keep only their inputs for the backward pass (decode and train
        # are arguments 4 and 5, counting the module itself as 0).
        block = nn.remat(Block, static_argnums=(4, 5)) if cfg.remat else Block
        if cfg.scan_layers:
            # One block traced once and run L times by lax.scan over parameters (and caches)
            # stacked on a leading layer axis: trunk/blocks/... of shape (L, ...); the layer
            # index is scanned over too.
            body = lambda mdl, x, valid, at, i: (mdl(x, valid, at, decode, train, i), None)
            layers = nn.scan(body, variable_axes={"params": 0, "cache": 0},
                             split_rngs={"params": True, "dropout": True},
                             in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.layers)
            x_BxTxD, _ = layers(block(cfg, name="blocks"), x_BxTxD, valid_BxT, offset_B,
                                jnp.arange(cfg.layers))
        else:
            for i in range(cfg.layers):
                x_BxTxD = block(cfg, name=f"block_{i}")(x_BxTxD, valid_BxT, offset_B, decode,
                                                        train, i)
        if cfg.norm == "pre":
            x_BxTxD = nn.LayerNorm(cfg.layer_norm_eps, dtype=_dtype(cfg), name="ln_f")(x_BxTxD)
        return x_BxTxD


class Transformer(nn.Module):
    """Causal language model: token ids (B, T) -> float32 logits (B, T, V) (V: `outputs`)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, ids_BxT, valid_BxT=None, *, decode=False, train=False):
        """Next-token logits.

        Args:
          ids_BxT: int token ids.
          valid_BxT: optional bool mask, False at padding (those keys are never attended).
          decode: append to the key/value cache (apply with mutable=["cache"]).
          train: enable dropout (needs a "dropout" rng).
        Returns:
          float32 logits (B, T, V).
        """
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_INIT, name="embed")
        x_BxTxD = embed(ids_BxT)
        h_BxTxD = Trunk(cfg, name="trunk")(x_BxTxD, valid_BxT, decode=decode, train=train)
        if cfg.tie_embeddings:
            logits_BxTxV = h_BxTxD.astype(_dtype(cfg)) @ embed.embedding.astype(_dtype(cfg)).T
        else:
            logits_BxTxV = nn.Dense(cfg.outputs, use_bias=cfg.head_bias, dtype=_dtype(cfg),
                                    kernel_init=_INIT, name="head")(h_BxTxD)
        return logits_BxTxV.astype(jnp.promote_types(logits_BxTxV.dtype, jnp.float32))


class SeriesTransformer(nn.Module):
    """The same trunk over real values: standardised inputs (B, T, F) -> float32 outputs
    (B, T, O), O = `config.outputs` (a series head's K values, or K means then K log-variances).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxTxF, *, decode=False, train=False):
        cfg = self.config
        x_BxTxD = nn.Dense(cfg.d_model, dtype=_dtype(cfg), name="embed")(x_BxTxF)
        h_BxTxD = Trunk(cfg, name="trunk")(x_BxTxD, decode=decode, train=train)
        out_BxTxO = nn.Dense(cfg.outputs, dtype=_dtype(cfg), name="head",
                             kernel_init=_INIT)(h_BxTxD)
        return out_BxTxO.astype(jnp.promote_types(out_BxTxO.dtype, jnp.float32))


def series_inputs(rows_BxRxF: jax.Array, k: int) -> jax.Array:
    """A series model's inputs from rows of R times whose first k features are the forecast
    series: the series at times 0..R-2 beside the covariates at times 1..R-1, (B, R - 1, F)."""
    return jnp.concatenate([rows_BxRxF[:, :-1, :k], rows_BxRxF[:, 1:, k:]], axis=-1)


def _unrolled(config: TransformerConfig, series_features: int) -> nn.Module:
    """The model of `config` with its blocks unrolled (what initialisation builds): a
    `Transformer`, or given `series_features` F, a `SeriesTransformer` over F inputs."""
    unrolled = dataclasses.replace(config, scan_layers=False)
    return SeriesTransformer(unrolled) if series_features else Transformer(unrolled)


def _finish_params(params: dict, config: TransformerConfig) -> dict:
    """Initialised parameters in `config`'s layout (stacked blocks with `scan_layers`) and
    precision (float64 for a float64 model)."""
    params = layered(params, config.scan_layers)
    if config.dtype == "float64":
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    return params


def init_params(config: TransformerConfig, rng: jax.Array, *, series_features: int = 0) -> dict:
    """Freshly initialised parameters, compiled (linen's eager init is slow): float32, or
    float64 for a float64 model (everything in double precision, for reference checks).

    Of a `Transformer`, or given `series_features` F, of a `SeriesTransformer` over F inputs.
    The same `rng` gives the same numbers with and without `scan_layers` (only stacked)."""
    example = (jnp.zeros((1, 1, series_features), jnp.float32) if series_features
               else jnp.zeros((1, config.max_len), jnp.int32))
    params = jax.jit(_unrolled(config, series_features).init)(rng, example)["params"]
    return _finish_params(params, config)


def param_shapes(config: TransformerConfig, *, series_features: int = 0) -> dict:
    """The parameter tree as shapes and dtypes only (restore and load targets); no compute.
    Read off the decoding variables (`_variable_shapes`), whose cache a sampler of the model
    then needs too: one trace of the model serves both."""
    shape = (1, 1, series_features) if series_features else (1, 1)
    dtype = jnp.dtype(jnp.float32 if series_features else jnp.int32)
    variables = _variable_shapes(_unrolled(config, series_features), shape, dtype)
    return jax.eval_shape(lambda p: _finish_params(p, config), variables["params"])


def init_cache(config: TransformerConfig, batch_size: int) -> dict:
    """An empty decoding cache for `batch_size` sequences of up to `max_len` tokens."""
    return empty_cache(Transformer(config), jnp.zeros((batch_size, 1), jnp.int32))


def empty_cache(model: nn.Module, example_Bx1: jax.Array) -> dict:
    """The empty decoding cache of any model over the trunk, for inputs shaped like
    `example_Bx1` (one position of each of B sequences; a tracer will do)."""
    shapes = _variable_shapes(model, example_Bx1.shape, jnp.dtype(example_Bx1.dtype))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.lru_cache(maxsize=32)
def _variable_shapes(model: nn.Module, shape: tuple[int, ...], dtype) -> dict:
    """The shapes and dtypes of the variables ("params", "cache") that decoding inputs of
    `shape` make: a trace of the whole model's initialisation, done once per model and shape
    (loading a model and sampling from it ask for them several times)."""
    example = jax.ShapeDtypeStruct(shape, dtype)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, decode=True), example)


def _position_axis(path, leaf) -> int | None:
    """The axis along positions of a cache leaf: the last but one of a key or value
    ((L,) B, H, S, K), the last of a pad mask ((L,) B, S); None for trunk/index (B,)."""
    name = path[-1].key
    return leaf.ndim - 2 if name in ("key", "value") else leaf.ndim - 1 if name == "pad" else None


def half_window(width: int) -> int:
    """Positions a decoder keeps when its cache of `width` positions is full and refilled
    (absolute positions cannot slide inside a cache), and of a prompt longer than the window:
    the last half, at least one."""
    return max(width // 2, 1)


def cache_prefix(cache: dict, S: int) -> dict:
    """`cache` cut to its first S positions (the row indices kept): a decoding step over it
    reads S positions instead of max_len, and writes a row at position >= S nowhere useful
    (clamped to the last), so every live row must stay below S."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if (a := _position_axis(path, x)) is None
        else jax.lax.slice_in_dim(x, 0, S, axis=a), cache)


def put_cache_prefix(cache: dict, prefix: dict) -> dict:
    """`cache` with its first positions (and the row indices) replaced by `prefix`'s."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x, p: p if (a := _position_axis(path, x)) is None
        else jax.lax.dynamic_update_slice_in_dim(x, p, 0, axis=a), cache, prefix)


def layered(params: dict, scan_layers: bool) -> dict:
    """`params` (or any tree shaped like them, e.g. Adam's moments) in the layout of a model
    with `scan_layers`: blocks stacked as trunk/blocks (L, ...), or one trunk/block_i each.
    Trees already in that layout come back as they are."""
    trunk = dict(params["trunk"])
    if scan_layers and "block_0" in trunk:
        count = sum(1 for name in trunk if name.startswith("block_"))
        stacked = [trunk.pop(f"block_{i}") for i in range(count)]
        trunk["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *stacked)
    elif not scan_layers and "blocks" in trunk:
        stacked = trunk.pop("blocks")
        count = jax.tree.leaves(stacked)[0].shape[0]
        trunk.update({f"block_{i}": jax.tree.map(lambda x: x[i], stacked)  # noqa: B023 (now)
                      for i in range(count)})
    return {**params, "trunk": trunk}


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 (N + d V) + 12 L T d.

    N counts non-embedding parameters, d V is the output projection (paid even when tied) and
    12 L T d the attention scores and weighted sums (PaLM's convention plus the head).
    """
    d, L = config.d_model, config.layers
    per_layer = 3 * d * d + 3 * d + d * d + d + 2 * d * config.d_ff + config.d_ff + d + 4 * d
    n = L * per_layer + (2 * d if config.norm == "pre" else 0)
    if not config.tie_embeddings:
        n += config.outputs  # the untied head's bias; its weights are the d V term
    return 6.0 * (n + d * config.outputs) + 12.0 * L * seq_len * d
