"""Tests for transformer_jax.model against independent references: the Vaswani formula written
as loops, a full numpy forward pass, and causality/masking invariants."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, random_params, tiny_config, with_

from transformer_jax.config import TransformerConfig
from transformer_jax.model import (
    Transformer,
    Trunk,
    cache_prefix,
    count_params,
    init_cache,
    init_params,
    layered,
    param_shapes,
    put_cache_prefix,
    sinusoidal_positions,
)

# ---------------------------------------------------------------------------------------------
# numpy reference forward pass, written from the parameter tree alone


def _np_layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


_NP_ACT = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi)
                                                    * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def _np_attention(x_TxD, p, heads, valid_T):
    T, D = x_TxD.shape
    K = D // heads
    qkv = _np_dense(x_TxD, p["qkv"])
    q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
    out = np.zeros((T, D))
    for h in range(heads):
        cols = slice(h * K, (h + 1) * K)
        for t in range(T):
            allowed = [s for s in range(t + 1) if valid_T[s]]
            if not allowed:
                continue  # a pad query with nothing to see: its output is never compared
            scores = np.array([q[t, cols] @ k[s, cols] for s in allowed]) / math.sqrt(K)
            w = np.exp(scores - scores.max())
            w /= w.sum()
            out[t, cols] = sum(wi * v[s, cols] for wi, s in zip(w, allowed))
    return _np_dense(out, p["out"])


def numpy_forward(cfg: TransformerConfig, params, ids_BxT, valid_BxT=None) -> np.ndarray:
    """Logits (B, T, V) in float64, from the definitions, one sequence at a time."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    E = p["embed"]["embedding"]
    B, T = ids_BxT.shape
    valid_BxT = np.ones((B, T), bool) if valid_BxT is None else np.asarray(valid_BxT)
    if cfg.positions == "sinusoidal":
        table = np.array([[math.sin(t / 10000 ** (i / cfg.d_model)) if i % 2 == 0 else
                           math.cos(t / 10000 ** ((i - 1) / cfg.d_model))
                           for i in range(cfg.d_model)] for t in range(T)])
    else:
        table = p["trunk"]["positions"][:T]
    act, eps = _NP_ACT[cfg.activation], cfg.layer_norm_eps
    logits = []
    for b in range(B):
        x = E[ids_BxT[b]] + table
        for i in range(cfg.layers):
            blk = p["trunk"][f"block_{i}"]
            attn = lambda y, blk=blk, b=b: _np_attention(y, blk["attn"], cfg.heads, valid_BxT[b])
            mlp = lambda y, blk=blk: _np_dense(act(_np_dense(y, blk["mlp"]["up"])),
                                               blk["mlp"]["down"])
            if cfg.norm == "post":
                x = _np_layer_norm(x + attn(x), blk["ln1"], eps)
                x = _np_layer_norm(x + mlp(x), blk["ln2"], eps)
            else:
                x = x + attn(_np_layer_norm(x, blk["ln1"], eps))
                x = x + mlp(_np_layer_norm(x, blk["ln2"], eps))
        if cfg.norm == "pre":
            x = _np_layer_norm(x, p["trunk"]["ln_f"], eps)
        logits.append(x @ E.T if cfg.tie_embeddings else _np_dense(x, p["head"]))
    return np.stack(logits)


def _ids(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


def _logits(cfg, params, ids, valid=None, train=False, **kw):
    args = (jnp.asarray(ids),) if valid is None else (jnp.asarray(ids), jnp.asarray(valid))
    return np.asarray(forward(cfg, train)({"params": params}, *args, **kw))


# ---------------------------------------------------------------------------------------------
# sinusoidal positions


def _vaswani_loops(length, d):
    table = np.zeros((length, d))
    for t in range(length):
        for i in range(d):
            pair = i - i % 2  # 2i of the formula
            angle = t / 10000.0 ** (pair / d)
            table[t, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    return table


@pytest.mark.parametrize("length,d",
                         [(1, 2), (7, 16), (50, 32), (9, 15), (4, 1), (6, 7), (501, 16)])
def test_sinusoidal_positions_match_vaswani_formula_including_odd_d(length, d):
    table = sinusoidal_positions(length, d)
    assert table.shape == (length, d) and table.dtype == np.float32
    np.testing.assert_allclose(table, _vaswani_loops(length, d), atol=1e-6, rtol=0)


def test_odd_d_model_sinusoidal_model_runs_and_matches_numpy_reference():
    cfg = tiny_config(d_model=15, heads=3, layers=1, positions="sinusoidal", norm="post")
    params = random_params(cfg, seed=3)
    ids = _ids(cfg, 2, 9)
    np.testing.assert_allclose(_logits(cfg, params, ids), numpy_forward(cfg, params, ids),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the numpy reference forward pass


def test_post_ln_one_layer_sinusoidal_relu_tied_matches_numpy_forward():
    cfg = tiny_config(layers=1, norm="post", positions="sinusoidal", activation="relu",
                      tie_embeddings=True)
    params = random_params(cfg, seed=1)
    assert set(params) == {"embed", "trunk"}  # tied: no separate head
    assert "positions" not in params["trunk"] and "ln_f" not in params["trunk"]
    ids = _ids(cfg, 2, cfg.max_len)
    np.testing.assert_allclose(_logits(cfg, params, ids), numpy_forward(cfg, params, ids),
                               atol=1e-5, rtol=1e-5)


def test_pre_ln_two_layers_gelu_learned_with_ln_f_matches_numpy_forward():
    cfg = tiny_config(layers=2, norm="pre", positions="learned", activation="gelu")
    params = random_params(cfg, seed=2)
    assert "ln_f" in params["trunk"] and params["trunk"]["positions"].shape == (16, 16)
    ids = _ids(cfg, 2, 11)
    np.testing.assert_allclose(_logits(cfg, params, ids), numpy_forward(cfg, params, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_pre_ln_untied_head_with_padding_matches_numpy_forward(activation):
    cfg = tiny_config(layers=1, heads=4, activation=activation, tie_embeddings=False,
                      positions="sinusoidal", layer_norm_eps=1e-3)
    params = random_params(cfg, seed=4)
    ids = _ids(cfg, 2, 10)
    valid = np.ones((2, 10), bool)
    valid[0, 7:] = False  # right padding
    valid[1, [2, 5]] = False  # holes
    got, want = _logits(cfg, params, ids, valid), numpy_forward(cfg, params, ids, valid)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# causality and masking

ARCHS = [(n, p) for n in ("pre", "post") for p in ("learned", "sinusoidal")]


@pytest.mark.parametrize("norm,positions", ARCHS)
def test_changing_later_tokens_never_changes_earlier_logits(norm, positions):
    cfg = tiny_config(norm=norm, positions=positions)
    params = random_params(cfg, seed=5)
    ids = _ids(cfg, 2, 12)
    base = _logits(cfg, params, ids)
    for t in (0, 4, 10):
        changed = ids.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + np.arange(11 - t)) % cfg.vocab_size
        out = _logits(cfg, params, changed)
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3  # the change is seen later


@pytest.mark.parametrize("norm,positions", ARCHS)
def test_gradient_of_early_output_wrt_later_input_embedding_is_exactly_zero(norm, positions):
    cfg = tiny_config(norm=norm, positions=positions)
    trunk_params = {"params": random_params(cfg, seed=6)["trunk"]}
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, cfg.d_model))
    jac = jax.jit(jax.jacrev(lambda x: Trunk(cfg).apply(trunk_params, x)))(x)  # (1,10,D, 1,10,D)
    jac = np.asarray(jac)[0, :, :, 0]  # (t_out, D, t_in, D)
    for t_out in range(10):
        for t_in in range(10):
            block = np.abs(jac[t_out, :, t_in]).max()
            if t_in > t_out:
                assert block == 0.0, (t_out, t_in)
            else:
                assert block > 0.0, (t_out, t_in)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_pad_keys_are_never_attended(norm):
    cfg = tiny_config(norm=norm)
    params = random_params(cfg, seed=7)
    ids = _ids(cfg, 2, 10)
    valid = np.ones((2, 10), bool)
    valid[0, :3] = False  # left padding
    valid[1, [1, 4, 5]] = False  # holes in the middle
    other = ids.copy()
    other[~valid] = (ids[~valid] + 7) % cfg.vocab_size
    a, b = _logits(cfg, params, ids, valid), _logits(cfg, params, other, valid)
    np.testing.assert_allclose(a[valid], b[valid], atol=1e-6, rtol=0)
    # Without the mask the pad ids do reach the later valid positions.
    changed = _logits(cfg, params, ids)[valid] - _logits(cfg, params, other)[valid]
    assert np.abs(changed).max() > 1e-3


def test_all_true_valid_mask_equals_no_mask():
    cfg = tiny_config()
    params = random_params(cfg, seed=8)
    ids = _ids(cfg, 2, 9)
    np.testing.assert_allclose(_logits(cfg, params, ids, np.ones((2, 9), bool)),
                               _logits(cfg, params, ids), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# configuration validation


@pytest.mark.parametrize("changes,fields", [
    (dict(d_model=30, heads=4), ("d_model", "heads")),
    (dict(d_model=0), ("d_model",)),
    (dict(layers=0), ("layers",)),
    (dict(heads=-2), ("heads",)),
    (dict(d_ff=0), ("d_ff",)),
    (dict(max_len=-1), ("max_len",)),
    (dict(layer_norm_eps=0.0), ("layer_norm_eps",)),
    (dict(vocab_size=-1), ("vocab_size",)),
    (dict(activation="swish"), ("activation",)),
    (dict(norm="middle"), ("norm",)),
    (dict(positions="rotary"), ("positions",)),
    (dict(dtype="float16"), ("dtype",)),
    (dict(dropout=1.0), ("dropout",)),
    (dict(dropout=-0.1), ("dropout",)),
])
def test_config_validation_raises_value_error_naming_the_field(changes, fields):
    with pytest.raises(ValueError) as err:
        tiny_config(**changes)
    for name in fields:
        assert name in str(err.value)


def test_valid_configs_are_accepted_and_head_dim_is_d_model_over_heads():
    assert tiny_config(d_model=24, heads=3).head_dim == 8
    TransformerConfig()  # the defaults are valid


# ---------------------------------------------------------------------------------------------
# the prediction layer


def _trunk_out(cfg, params, ids):
    x = params["embed"]["embedding"][jnp.asarray(ids)]
    return np.asarray(jax.jit(Trunk(cfg).apply)({"params": params["trunk"]}, x))


def test_tied_head_logits_equal_trunk_output_times_embedding_transpose():
    cfg = tiny_config(tie_embeddings=True)
    params = random_params(cfg, seed=9)
    ids = _ids(cfg, 2, 8) % 10  # tokens 10..19 never appear in the input
    h = _trunk_out(cfg, params, ids)
    E = np.asarray(params["embed"]["embedding"])
    np.testing.assert_allclose(_logits(cfg, params, ids), h @ E.T, atol=1e-5, rtol=1e-5)
    # Changing an output-only row of E changes exactly that logit column.
    E2 = E.copy()
    E2[15] += 1.0
    params2 = {**params, "embed": {"embedding": jnp.asarray(E2)}}
    diff = np.abs(_logits(cfg, params2, ids) - _logits(cfg, params, ids)).max(axis=(0, 1))
    assert diff[15] > 1e-2 and np.delete(diff, 15).max() < 1e-6


def test_untied_head_has_its_own_dense_and_ignores_output_rows_of_embedding():
    cfg = tiny_config(tie_embeddings=False)
    params = random_params(cfg, seed=10)
    assert params["head"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)
    assert params["head"]["bias"].shape == (cfg.vocab_size,)
    ids = _ids(cfg, 2, 8) % 10
    h = _trunk_out(cfg, params, ids)
    want = h @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(_logits(cfg, params, ids), want, atol=1e-5, rtol=1e-5)
    E2 = np.asarray(params["embed"]["embedding"]).copy()
    E2[15] += 1.0
    params2 = {**params, "embed": {"embedding": jnp.asarray(E2)}}
    np.testing.assert_array_equal(_logits(cfg, params2, ids), _logits(cfg, params, ids))


def test_count_params_matches_formula_for_untied_learned_pre_ln():
    cfg = tiny_config(tie_embeddings=False)
    D, F, V, L, S = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.layers, cfg.max_len
    per_block = (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 4 * D
    want = V * D + S * D + L * per_block + 2 * D + (D * V + V)
    assert count_params(init_params(cfg, jax.random.PRNGKey(0))) == want


# ---------------------------------------------------------------------------------------------
# dtypes and dropout


def test_bfloat16_compute_gives_float32_logits_close_to_float32_model():
    cfg = tiny_config(norm="pre")
    params = random_params(cfg, seed=11, scale=0.3)
    ids = _ids(cfg, 2, 12)
    f32 = _logits(cfg, params, ids)
    bf16 = _logits(with_(cfg, dtype="bfloat16"), params, ids)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    scale = np.abs(f32).max()
    assert np.abs(bf16 - f32).max() < 0.05 * scale
    assert np.abs(bf16 - f32).max() > 0  # it really computed in a lower precision
    shapes = jax.eval_shape(Transformer(with_(cfg, dtype="bfloat16")).init,
                            jax.random.PRNGKey(0), jnp.asarray(ids))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))  # parameters stay f32


def test_dropout_is_active_only_with_train_true():
    cfg = tiny_config(dropout=0.5)
    params = random_params(cfg, seed=12)
    ids = _ids(cfg, 2, 8)
    no_dropout = _logits(with_(cfg, dropout=0.0), params, ids)
    np.testing.assert_array_equal(_logits(cfg, params, ids), no_dropout)
    np.testing.assert_array_equal(_logits(cfg, params, ids, train=False), no_dropout)
    key = lambda s: {"dropout": jax.random.PRNGKey(s)}
    t1 = _logits(cfg, params, ids, train=True, rngs=key(1))
    assert np.abs(t1 - no_dropout).max() > 1e-2
    np.testing.assert_array_equal(t1, _logits(cfg, params, ids, train=True, rngs=key(1)))
    assert np.abs(t1 - _logits(cfg, params, ids, train=True, rngs=key(2))).max() > 1e-2
    # A dropout-free model ignores train=True.
    np.testing.assert_array_equal(
        _logits(with_(cfg, dropout=0.0), params, ids, train=True, rngs=key(1)), no_dropout)


# ---------------------------------------------------------------------------------------------
# the decoding cache


def test_init_cache_is_empty_and_shaped_batch_heads_max_len():
    cfg = tiny_config(heads=4)
    cache = init_cache(cfg, 3)
    assert cache["trunk"]["index"].tolist() == [0, 0, 0]
    for name in ("key", "value"):  # heads first: each (row, head)'s (S, K) block contiguous
        kv = cache["trunk"]["block_0"]["attn"][name]
        assert kv.shape == (3, 4, cfg.max_len, cfg.head_dim) and not np.asarray(kv).any()


def test_decode_steps_never_attend_pad_keys_written_by_an_earlier_call():
    """'pad keys are never attended' must survive the cache: a pad in the prefill stays masked
    when the next token is decoded, as in the full forward pass with the same mask."""
    cfg = tiny_config()
    params = random_params(cfg, seed=13)
    ids = _ids(cfg, 2, 6)
    valid = np.ones((2, 6), bool)
    valid[:, 1] = False
    full = _logits(cfg, params, ids, valid)
    model = Transformer(cfg)
    step = jax.jit(lambda cache, ids, valid: model.apply(
        {"params": params, "cache": cache}, ids, valid, decode=True, mutable=["cache"]))
    logits, vars_ = step(init_cache(cfg, 2), jnp.asarray(ids[:, :5]), jnp.asarray(valid[:, :5]))
    np.testing.assert_allclose(np.asarray(logits)[valid[:, :5]], full[:, :5][valid[:, :5]],
                               atol=1e-5, rtol=1e-5)
    logits, _ = step(vars_["cache"], jnp.asarray(ids[:, 5:]), jnp.asarray(valid[:, 5:]))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, 5], atol=1e-5, rtol=1e-5)


def test_remat_gives_the_same_parameters_loss_and_gradients():
    """--remat only changes what the backward pass keeps, never a number."""
    cfg = tiny_config(dropout=0.1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    params = random_params(cfg)

    def loss(config, p):
        logits = Transformer(config).apply({"params": p}, ids, train=True,
                                           rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    remat = with_(cfg, remat=True)
    assert (jax.tree.structure(init_params(remat, jax.random.PRNGKey(0)))
            == jax.tree.structure(params))
    # compiled, as training runs it (linen's op-by-op eager backward pass takes half a minute)
    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(functools.partial(loss, c)))(params)
                        for c in (cfg, remat))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # float32 rounding


# ---------------------------------------------------------------------------------------------
# scanned layers: the same model, its blocks stacked and run by lax.scan


def test_layered_stacks_blocks_on_a_leading_axis_and_back():
    cfg = tiny_config(layers=3)
    params = random_params(cfg)
    stacked = layered(params, True)
    assert "block_0" not in stacked["trunk"]
    kernel = stacked["trunk"]["blocks"]["attn"]["qkv"]["kernel"]
    assert kernel.shape == (3, *params["trunk"]["block_0"]["attn"]["qkv"]["kernel"].shape)
    np.testing.assert_array_equal(kernel[2], params["trunk"]["block_2"]["attn"]["qkv"]["kernel"])
    assert layered(stacked, True)["trunk"] == stacked["trunk"]  # already in that layout
    assert layered(params, False)["trunk"] == params["trunk"]
    for a, b in zip(jax.tree.leaves(layered(stacked, False)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    scanned = with_(cfg, scan_layers=True)
    assert (jax.tree.structure(init_params(scanned, jax.random.PRNGKey(0)))
            == jax.tree.structure(stacked))
    for a, b in zip(jax.tree.leaves(init_params(scanned, jax.random.PRNGKey(4))),
                    jax.tree.leaves(layered(init_params(cfg, jax.random.PRNGKey(4)), True))):
        np.testing.assert_array_equal(a, b)  # the same seed, the same model


@pytest.mark.parametrize("changes,series_features", [
    ({}, 0), ({"tie_embeddings": False}, 0), ({"scan_layers": True, "layers": 3}, 0),
    ({"dtype": "float64"}, 0), ({"scan_layers": True}, 3), ({"dtype": "float64"}, 2)])
def test_param_shapes_are_those_of_initialised_parameters(changes, series_features):
    with jax.enable_x64(changes.get("dtype") == "float64"):
        cfg = tiny_config(**changes)
        want = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0),
                                                  series_features=series_features))
        got = param_shapes(cfg, series_features=series_features)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)


@pytest.mark.parametrize("norm,remat", [("pre", False), ("post", False), ("pre", True)])
def test_scanned_layers_give_the_same_logits_and_gradients(norm, remat):
    cfg = tiny_config(layers=3, norm=norm)
    scanned = with_(cfg, scan_layers=True, remat=remat)
    params = random_params(cfg, seed=3)
    ids = jnp.asarray(_ids(cfg, 2, 12))
    valid = np.ones((2, 12), bool)
    valid[1, :3] = False

    def loss(config, p):
        logits = Transformer(config).apply({"params": p}, ids, valid)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (a, la), ga = jax.value_and_grad(functools.partial(loss, cfg), has_aux=True)(params)
    (b, lb), gb = jax.value_and_grad(functools.partial(loss, scanned), has_aux=True)(
        layered(params, True))
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(layered(gb, False)), jax.tree.leaves(ga)):
        # float32 rounding, relative to the scale of the whole gradient of each parameter
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))


def test_scanned_layers_decode_with_a_stacked_cache_like_the_full_pass():
    unrolled = tiny_config(layers=3)
    cfg = with_(unrolled, scan_layers=True)
    params = layered(random_params(unrolled, seed=5), True)
    ids = _ids(cfg, 2, 9)
    full = _logits(cfg, params, ids)
    cache = init_cache(cfg, 2)
    # (L, B, H, S, K): the layers stacked, heads first
    assert cache["trunk"]["blocks"]["attn"]["key"].shape == (3, 2, 2, cfg.max_len, 8)
    model = Transformer(cfg)
    step = jax.jit(lambda cache, ids: model.apply({"params": params, "cache": cache}, ids,
                                                  decode=True, mutable=["cache"]))
    logits, vars_ = step(cache, jnp.asarray(ids[:, :6]))
    np.testing.assert_allclose(logits, full[:, :6], rtol=1e-5, atol=1e-5)
    for t in range(6, 9):
        logits, vars_ = step(vars_["cache"], jnp.asarray(ids[:, t:t + 1]))
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_cache_prefix_decodes_as_the_whole_cache_and_goes_back_into_it(scan_layers):
    """Steps over the first S positions of the cache give the logits of the full pass (as the
    whole cache does), and the prefix put back gives the whole cache those steps would."""
    unrolled = tiny_config(layers=2, max_len=16)
    cfg = with_(unrolled, scan_layers=scan_layers)
    params = layered(random_params(unrolled, seed=6), scan_layers)
    ids = _ids(cfg, 2, 8)
    full = _logits(cfg, params, ids)
    model = Transformer(cfg)
    step = jax.jit(lambda cache, ids: model.apply({"params": params, "cache": cache}, ids,
                                                  decode=True, mutable=["cache"]))
    _, vars_ = step(init_cache(cfg, 2), jnp.asarray(ids[:, :5]))
    whole = prefix = vars_["cache"]
    prefix = cache_prefix(whole, 8)
    key = "blocks" if scan_layers else "block_0"
    assert prefix["trunk"][key]["attn"]["key"].shape[-2] == 8
    assert prefix["trunk"][key]["attn"]["pad"].shape[-1] == 8
    for t in range(5, 8):
        logits, vars_ = step(vars_["cache"], jnp.asarray(ids[:, t:t + 1]))
        short, prefix = step(prefix, jnp.asarray(ids[:, t:t + 1]))
        prefix = prefix["cache"]
        np.testing.assert_allclose(short[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(short, logits)
    jax.tree.map(np.testing.assert_array_equal, put_cache_prefix(whole, prefix), vars_["cache"])
