"""Tests for transformer_jax.training: loss, schedule, optimiser, evaluation, data parallelism.

Numerical checks compare against references written here in numpy (log-softmax by hand, the
schedule's closed form, the lecture's `totalavgloss`). The 8-device data-parallel check runs
tests/_dp_equivalence.py in a subprocess, because the host device count is fixed when JAX
starts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer_jax import data, parallel, training
from transformer_jax.config import TrainConfig, TransformerConfig
from transformer_jax.model import Transformer, init_params
from transformer_jax.tokenizer import CharTokenizer

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Exactly 200 characters.
TEXT_200 = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
            "the slings and arrows of outrageous fortune, or to take arms against a sea of "
            "troubles and by opposing end them. Ay, there.")[:200]


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_token_nll_sum(logits: np.ndarray, targets: np.ndarray, pad_id: int) -> tuple[float, int]:
    """Sum of -log p(target) over non-pad targets, and their count, with plain loops."""
    logp = np_log_softmax(logits)
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if targets[b, t] != pad_id:
                total -= logp[b, t, targets[b, t]]
                count += 1
    return total, count


def tiny_model(vocab_size: int, **kw) -> tuple[Transformer, dict]:
    cfg = TransformerConfig(vocab_size=vocab_size, d_model=16, layers=1, heads=2, d_ff=32,
                            max_len=kw.pop("max_len", 16), **kw)
    return Transformer(cfg), init_params(cfg, jax.random.PRNGKey(0))


# --- token_losses / lm_loss -------------------------------------------------------------------


def test_token_losses_equals_numpy_cross_entropy_ignoring_pad_targets():
    rng = np.random.default_rng(0)
    B, T, V, pad = 3, 5, 7, 6
    logits = rng.normal(scale=3.0, size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V - 1, size=(B, T))
    targets[0, 3:] = pad
    targets[2, :] = pad
    targets[1, 0] = pad
    total, count = training.token_losses(jnp.asarray(logits), jnp.asarray(targets),
                                         jnp.asarray(targets) != pad)
    ref_total, ref_count = np_token_nll_sum(logits, targets, pad)
    assert float(count) == ref_count == B * T - 2 - 5 - 1
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)


def test_token_losses_ignores_logits_at_pad_targets():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    targets = np.array([[0, 1, 4, 4], [2, 4, 3, 4]])
    wild = logits.copy()
    wild[targets == 4] = rng.normal(scale=100.0, size=wild[targets == 4].shape)
    a = training.token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(targets) != 4)
    b = training.token_losses(jnp.asarray(wild), jnp.asarray(targets), jnp.asarray(targets) != 4)
    assert float(a[0]) == float(b[0]) and float(a[1]) == float(b[1]) == 4


def test_lm_loss_is_mean_cross_entropy_over_non_pad_next_tokens():
    V, pad = 9, 8
    model, params = tiny_model(V)
    rng = np.random.default_rng(2)
    rows = rng.integers(0, V - 2, size=(3, 12))
    rows[0, 7:] = pad  # a stream-style row ending in padding
    rows[2, 1:] = pad  # only one real token: contributes no target
    loss_sum, n = training.lm_loss(model, pad, train=False)(params, jnp.asarray(rows),
                                                            jax.random.PRNGKey(0))
    inputs, targets = rows[:, :-1], rows[:, 1:]
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(inputs),
                                    jnp.asarray(inputs != pad)))
    total, count = np_token_nll_sum(logits, targets, pad)
    assert count == 6 + 11 + 0 == float(n)
    np.testing.assert_allclose(float(loss_sum), total, rtol=1e-5)


def test_lm_loss_train_mode_without_dropout_equals_eval_mode():
    V, pad = 9, 8
    model, params = tiny_model(V)
    rows = jnp.asarray(np.random.default_rng(3).integers(0, V - 1, size=(2, 10)))
    a = training.lm_loss(model, pad, train=False)(params, rows, jax.random.PRNGKey(0))
    b = training.lm_loss(model, pad, train=True)(params, rows, jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# --- learning rate schedule and optimiser ---------------------------------------------------


def reference_lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if not cfg.decay_steps:
        return cfg.lr
    if step >= cfg.decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup, decay, min_lr", [
    (10, 110, 1e-3),  # warm-up, cosine, floor
    (0, 50, 2e-4),    # cosine from step 0
    (1, 40, 0.0),     # one warm-up step, decay to zero
])
def test_learning_rate_is_linear_warmup_then_cosine_to_min_lr(warmup, decay, min_lr):
    cfg = TrainConfig(lr=1e-2, warmup_steps=warmup, decay_steps=decay, min_lr=min_lr)
    schedule = training.learning_rate(cfg)
    for step in range(decay + 30):
        np.testing.assert_allclose(float(schedule(step)), reference_lr(cfg, step),
                                   rtol=1e-5, atol=1e-9, err_msg=f"step {step}")
    np.testing.assert_allclose(float(schedule(decay)), min_lr, atol=1e-9)
    if warmup:
        assert float(schedule(0)) == 0.0
        np.testing.assert_allclose(float(schedule(warmup)), cfg.lr, rtol=1e-6)


@pytest.mark.parametrize("warmup", [0, 8])
def test_learning_rate_is_constant_after_warmup_when_decay_steps_is_zero(warmup):
    cfg = TrainConfig(lr=3e-3, warmup_steps=warmup, decay_steps=0, min_lr=1e-4)
    schedule = training.learning_rate(cfg)
    for step in range(0, 500, 7):
        np.testing.assert_allclose(float(schedule(step)), reference_lr(cfg, step), rtol=1e-6,
                                   atol=1e-12, err_msg=f"step {step}")
    np.testing.assert_allclose(float(schedule(10_000)), 3e-3, rtol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_optimizer_steps_follow_the_schedule(weight_decay):
    """With a constant gradient Adam's normalised step is sign(g), so update t is exactly
    -lr(t) * (sign(g) + wd * param): the schedule (warm-up included) is what is applied."""
    cfg = TrainConfig(lr=0.1, warmup_steps=4, decay_steps=12, min_lr=0.01,
                      weight_decay=weight_decay)
    tx = training.optimizer(cfg)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, -1.0, 2.0])}
    state = tx.init(params)
    for t in range(14):
        updates, state = tx.update(grads, state, params)
        expected = -reference_lr(cfg, t) * (np.sign(np.asarray(grads["w"]))
                                            + weight_decay * np.asarray(params["w"]))
        np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-5, atol=1e-7,
                                   err_msg=f"step {t}")
        params = optax.apply_updates(params, updates)


def _polar(g: np.ndarray) -> np.ndarray:
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD): what Muon approximates."""
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    return u @ vt


def test_muon_orthogonalises_trunk_matrices_and_adam_updates_the_rest():
    cfg = TrainConfig(optimizer="muon", lr=0.01, muon_lr=0.05, warmup_steps=3, decay_steps=10,
                      min_lr=0.001)
    rng = np.random.default_rng(0)
    # Gradients with columns scaled over 10x, so neither their sign nor their scale is the
    # answer; wide, so that their singular values stay clear of 0 (3 Newton-Schulz steps do
    # not lift singular values far below a tenth of the largest).
    spread = lambda *shape: (rng.normal(size=shape) * np.geomspace(1, 10, shape[-1])
                             ).astype(np.float32)
    grads = {"embed": {"embedding": spread(5, 4)},
             "trunk": {"block_0": {"mlp": {"up": {"kernel": spread(4, 8),
                                                  "bias": spread(8)}}},
                       "blocks": {"attn": {"out": {"kernel": spread(3, 4, 8)}}}}}
    params = jax.tree.map(jnp.zeros_like, grads)
    tx = training.optimizer(cfg)
    state = tx.init(params)
    for t in range(4):
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        up = jax.tree.map(np.asarray, updates)
        params = optax.apply_updates(params, updates)
        if t == 0:  # the warm-up starts at a learning rate of 0
            assert not any(np.any(u) for u in jax.tree.leaves(up))
            continue
        # AdamW for the embedding and biases, with Nesterov momentum as optax's Muon uses: for
        # a constant gradient, -lr(t) sign(g) times b1 m_c / (1 - b1^(c+1)) + (1 - b1) /
        # (1 - b1^c) at update c, where m_c = 1 - b1^c.
        b1, c = cfg.beta1, t + 1
        nesterov = b1 * (1 - b1 ** c) / (1 - b1 ** (c + 1)) + (1 - b1) / (1 - b1 ** c)
        for path in (("embed", "embedding"), ("trunk", "block_0", "mlp", "up", "bias")):
            got, g = up, grads
            for k in path:
                got, g = got[k], g[k]
            np.testing.assert_allclose(got, -reference_lr(cfg, t) * nesterov * np.sign(g),
                                       rtol=1e-4)  # eps against the smallest gradients
        # Muon for trunk kernels: -muon_lr(t) sqrt(max(1, out/in)) times about polar(g), each
        # layer of a stacked (L, in, out) kernel on its own.
        scale = reference_lr(cfg, t) * cfg.muon_lr / cfg.lr
        pairs = [(up["trunk"]["block_0"]["mlp"]["up"]["kernel"] / (-scale * np.sqrt(2.0)),
                  grads["trunk"]["block_0"]["mlp"]["up"]["kernel"])]
        pairs += list(zip(up["trunk"]["blocks"]["attn"]["out"]["kernel"] / (-scale * np.sqrt(2.0)),
                          grads["trunk"]["blocks"]["attn"]["out"]["kernel"]))
        for got, g in pairs:
            singular = np.linalg.svd(got, compute_uv=False)
            assert singular.min() > 0.5 and singular.max() < 1.5, singular  # ~orthogonal
            cosine = (got * _polar(g)).sum() / np.linalg.norm(got) / np.linalg.norm(_polar(g))
            assert cosine > 0.95, cosine


def test_muon_matrices_are_the_trunks_kernels_only():
    cfg = TransformerConfig(vocab_size=11, d_model=16, layers=2, heads=2, d_ff=32, max_len=8,
                            tie_embeddings=False)
    params = init_params(cfg, jax.random.PRNGKey(0))
    flags = jax.tree_util.tree_flatten_with_path(training.muon_matrices(params))[0]
    muon = {"/".join(k.key for k in path) for path, flag in flags if flag}
    assert muon == {f"trunk/block_{i}/{name}/kernel" for i in range(2)
                    for name in ("attn/qkv", "attn/out", "mlp/up", "mlp/down")}


def test_optimizer_state_structure_does_not_depend_on_grad_clip():
    """grad_clip may change on resume, so the optimiser state must restore either way."""
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    on = training.optimizer(TrainConfig(grad_clip=1.0)).init(params)
    off = training.optimizer(TrainConfig(grad_clip=0.0)).init(params)
    assert jax.tree.structure(on) == jax.tree.structure(off)


# --- training actually learns ---------------------------------------------------------------


def test_tiny_model_overfits_200_characters_below_loss_0_1():
    assert len(TEXT_200) == 200
    tok = CharTokenizer.from_text(TEXT_200)
    steps = 600
    tcfg = TrainConfig(seq_len=96, batch_size=8, lr=3e-3, steps_per_call=steps, seed=0)
    mcfg = TransformerConfig(vocab_size=tok.vocab_size, d_model=32, layers=1, heads=2,
                             d_ff=64, max_len=96)
    model = Transformer(mcfg)
    mesh = parallel.data_mesh(jax.devices()[:1])
    batches = data.train_batches(tok, TEXT_200, tcfg)
    state = training.init_state(init_params(mcfg, jax.random.PRNGKey(0)), tcfg)
    chunk = training.compile_train_chunk(mesh, training.lm_loss(model, tok.pad_id),
                                         training.optimizer(tcfg), batches.row_len)
    state, metrics = chunk(state, jnp.asarray(batches.source),
                           jnp.asarray(batches.starts(0, steps)), None)
    losses = np.asarray(metrics["loss"])
    assert int(state.step) == steps
    assert losses[:10].mean() > 2.0  # it started out ignorant
    # The training objective exactly: the mean loss over every window training draws from.
    ids = tok.encode(TEXT_200)
    rows = np.stack([ids[s:s + batches.row_len] for s in range(len(ids) - batches.row_len + 1)])
    inputs, targets = rows[:, :-1], rows[:, 1:]
    logits = np.asarray(model.apply({"params": state.params}, jnp.asarray(inputs)))
    total, count = np_token_nll_sum(logits, targets, tok.pad_id)
    assert total / count < 0.1, f"loss on the training text {total / count:.4f}"


# --- evaluation -----------------------------------------------------------------------------


def test_evaluate_equals_lecture_totalavgloss():
    """totalavgloss: summed token loss over all batches divided by the number of (non-pad)
    target tokens -- not the mean of per-batch means."""
    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."
    tok = CharTokenizer.from_text(text)
    model, params = tiny_model(tok.vocab_size, max_len=17)
    n_dev = len(jax.devices())
    mesh = parallel.data_mesh() if 4 % n_dev == 0 else parallel.data_mesh(jax.devices()[:1])
    rows = data.stream_rows(tok, text, seq_len=16, streams=1)[0]  # 5 rows, the last short
    rows = data.pad_rows(rows, 4, tok.pad_id).reshape(-1, 4, rows.shape[1])  # (2, 4, 18)
    assert rows.shape[0] == 2 and (rows == tok.pad_id).all(axis=-1).any()
    evaluate = training.compile_evaluate(mesh, training.lm_loss(model, tok.pad_id, train=False))
    result = training.evaluate(evaluate, params, training.eval_groups(rows))
    total, count = 0.0, 0
    for batch in rows:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = np.asarray(model.apply({"params": params}, jnp.asarray(inputs),
                                        jnp.asarray(inputs != tok.pad_id)))
        t, c = np_token_nll_sum(logits, targets, tok.pad_id)
        total, count = total + t, count + c
    assert count == len(text) + 5  # every character once, and each of the 5 pieces' end
    np.testing.assert_allclose(result["loss"], total / count, rtol=1e-5)
    np.testing.assert_allclose(result["bpc"], total / count / math.log(2), rtol=1e-5)


def test_evaluation_in_groups_of_one_shape_equals_one_call():
    """Three batches in groups of two, the second filled up with a repeated batch that the sum
    leaves out: the loss of all three at once, from one compiled program for both groups."""
    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."
    tok = CharTokenizer.from_text(text)
    model, params = tiny_model(tok.vocab_size, max_len=17)
    mesh = parallel.data_mesh(jax.devices()[:2 if len(jax.devices()) > 1 else 1])
    rows = data.stream_rows(tok, text, seq_len=16, streams=1)[0]
    rows = data.pad_rows(rows, 2, tok.pad_id).reshape(-1, 2, rows.shape[1])  # (3, 2, 18)
    loss = training.lm_loss(model, tok.pad_id, train=False)
    whole = training.evaluate(training.compile_evaluate(mesh, loss), params,
                              training.eval_groups(rows))
    groups = training.eval_groups(rows, 2)
    assert [valid for _, valid in groups] == [2, 1]
    assert all(g.shape == (2, 2, 18) for g, _ in groups)
    assert np.shares_memory(groups[0][0], rows)  # a view, not a copy
    evaluate = training.compile_evaluate(mesh, loss)
    grouped = training.evaluate(evaluate, params, groups)
    assert evaluate._cache_size() == 1
    np.testing.assert_allclose(grouped["loss"], whole["loss"], rtol=1e-6)
    last = training.evaluate(evaluate, params, groups[1:])  # the filler batch left out
    alone = training.evaluate(training.compile_evaluate(mesh, loss), params,
                              training.eval_groups(rows[2:]))
    np.testing.assert_allclose(last["loss"], alone["loss"], rtol=1e-6)


# --- data parallelism: 8 host devices vs 1, float64 --------------------------------------------


@pytest.fixture(scope="module")
def dp_result() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(TESTS / "_dp_equivalence.py")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["x64"], result
    return result


def test_dp_batch_is_split_into_8_shards_of_2_rows(dp_result):
    shards = dp_result["shards"]
    assert len(shards) == 8
    assert len({s["device"] for s in shards}) == 8
    assert all(s["shape"] == [2, 17] for s in shards)
    assert sorted(s["row_start"] for s in shards) == list(range(0, 16, 2))
    assert all(s["matches"] for s in shards)
    # The compiled chunk itself takes its (K, B) starts split over the batch axis.
    assert dp_result["starts_num_devices"] == 8
    assert dp_result["starts_shard_shape"] == [3, 2]


def test_dp_step_compiles_a_gradient_all_reduce(dp_result):
    assert dp_result["all_reduce_8"]
    assert not dp_result["all_reduce_1"]


def test_dp_muon_split_over_8_devices_equals_1_device_in_float64(dp_result):
    """Muon's Newton-Schulz iterations shared out over the devices (and gathered: an
    all-gather the Adam chunk has none of) change nothing but the rounding."""
    assert dp_result["muon_param_change"] > 1e-3
    assert dp_result["max_muon_param_diff_8_vs_1"] < 1e-10
    assert dp_result["max_muon_opt_diff_8_vs_1"] < 1e-10
    assert dp_result["muon_all_gather_8"] and not dp_result["all_gather_8"]


def test_dp_three_adam_steps_on_8_devices_equal_1_device_in_float64(dp_result):
    assert dp_result["param_dtypes"] == dp_result["final_param_dtypes"] == ["float64"]
    assert dp_result["steps8"] == dp_result["steps1"] == 3
    assert dp_result["param_change"] > 1e-3  # the steps did move the parameters
    diff = dp_result["max_param_diff_8_vs_1"]
    assert diff < 1e-10, f"8 devices vs 1: max |param difference| {diff:.3g}"
    diff = dp_result["max_param_diff_step8_vs_1"]
    assert diff < 1e-10, f"jit(train_step) on 8 devices vs 1: max |param difference| {diff:.3g}"
    np.testing.assert_allclose(dp_result["losses8"], dp_result["losses1"], rtol=1e-12)


def test_dp_one_device_chunk_equals_plain_value_and_grad_reference(dp_result):
    diff = dp_result["max_param_diff_1_vs_ref"]
    assert diff < 1e-10, f"compiled chunk vs reference: max |param difference| {diff:.3g}"
    np.testing.assert_allclose(dp_result["losses1"], dp_result["losses_ref"], rtol=1e-12)


def test_micro_batches_give_the_same_loss_and_gradient_as_the_whole_batch():
    """Gradient accumulation over slices equals one pass, pad rows and uneven counts included."""
    V, pad = 9, 8
    model, params = tiny_model(V)
    rows = np.random.default_rng(4).integers(0, V - 1, size=(8, 12))
    rows[1, 5:] = pad
    rows[6, 2:] = pad
    loss_fn = training.lm_loss(model, pad, train=False)
    rng = jax.random.PRNGKey(0)
    whole = training.loss_and_grads(loss_fn, params, jnp.asarray(rows), rng, 1)
    sliced = training.loss_and_grads(loss_fn, params, jnp.asarray(rows), rng, 4)
    np.testing.assert_allclose(float(whole[0]), float(sliced[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(whole[1]), jax.tree.leaves(sliced[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # and the mean really is over counted targets: pad-heavy row 6 does not weigh as a full row
    total, count = loss_fn(params, jnp.asarray(rows), rng)
    np.testing.assert_allclose(float(whole[0]), float(total / count), rtol=1e-6)
