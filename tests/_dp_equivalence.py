"""Helper for tests/test_training.py: data-parallel training equals one-device training.

Run in a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=8 and
JAX_ENABLE_X64=1 (the device count is fixed when JAX starts, so this cannot run inside the
pytest process). Prints one JSON object on its last stdout line; the test checks it.

Three Adam steps on the same global batch of 16 rows, all in float64:
  mesh8   training.compile_train_chunk on an 8-device `data` mesh
  mesh1   the same on a 1-device mesh (parallel.data_mesh(jax.devices()[:1]))
  step8   jax.jit(training.train_step) fed a batch explicitly sharded over the 8 devices
  loop    an independent reference: value_and_grad + optax update, no mesh
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from transformer_jax import data, parallel, training
from transformer_jax.config import TrainConfig, TransformerConfig
from transformer_jax.model import Transformer, init_params
from transformer_jax.tokenizer import CharTokenizer

STEPS = 3
BATCH = 16


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main() -> None:
    out: dict = {"devices": len(jax.devices()), "x64": bool(jax.config.jax_enable_x64)}
    if out["devices"] != 8 or not out["x64"]:
        print(json.dumps(out))
        return

    text = ("The quick brown fox jumps over the lazy dog; pack my box with five dozen "
            "liquor jugs. ") * 12
    tok = CharTokenizer.from_text(text)
    tcfg = TrainConfig(seq_len=16, batch_size=BATCH, lr=1e-2, seed=3)
    mcfg = TransformerConfig(vocab_size=tok.vocab_size, d_model=16, layers=2, heads=2, d_ff=32,
                             max_len=16, dtype="float64")
    model = Transformer(mcfg)
    params = jax.tree.map(lambda p: np.asarray(p, np.float64),
                          init_params(mcfg, jax.random.PRNGKey(0)))
    out["param_dtypes"] = sorted({str(p.dtype) for p in jax.tree.leaves(params)})
    state0 = jax.tree.map(np.asarray, training.init_state(params, tcfg))
    tx = training.optimizer(tcfg)
    loss_fn = training.lm_loss(model, tok.pad_id)

    batches = data.train_batches(tok, text, tcfg, row_multiple=8)
    starts_KxB = batches.starts(0, STEPS)
    row_len = batches.row_len

    def run_chunk(mesh, tx=tx, state0=state0):
        replicated = NamedSharding(mesh, P())
        state = jax.device_put(state0, replicated)
        source = jax.device_put(batches.source, replicated)
        fn = training.compile_train_chunk(mesh, loss_fn, tx, row_len)
        starts = jnp.asarray(starts_KxB)
        compiled = fn.lower(state, source, starts, None).compile()
        new, metrics = compiled(state, source, starts, None)
        return new, np.asarray(metrics["loss"]).tolist(), compiled

    mesh8 = parallel.data_mesh(jax.devices())
    mesh1 = parallel.data_mesh(jax.devices()[:1])
    s8, losses8, compiled8 = run_chunk(mesh8)
    s1, losses1, compiled1 = run_chunk(mesh1)
    out["losses8"], out["losses1"] = losses8, losses1
    out["steps8"], out["steps1"] = int(s8.step), int(s1.step)
    out["final_param_dtypes"] = sorted({str(p.dtype) for p in jax.tree.leaves(s8.params)})
    out["max_param_diff_8_vs_1"] = max_diff(s8.params, s1.params)
    out["max_opt_diff_8_vs_1"] = max_diff(s8.opt_state, s1.opt_state)
    out["param_change"] = max_diff(s1.params, state0.params)

    # How the compiled chunk splits its batch: the starts (K, B) are sharded over B.
    starts_sharding = compiled8.input_shardings[0][2]
    out["starts_shard_shape"] = list(starts_sharding.shard_shape(starts_KxB.shape))
    out["starts_num_devices"] = len(starts_sharding.device_set)
    hlo8, hlo1 = compiled8.as_text(), compiled1.as_text()
    out["all_reduce_8"] = "all-reduce" in hlo8
    out["all_reduce_1"] = "all-reduce" in hlo1

    # Muon: its Newton-Schulz iterations split over the 8 devices (stacks of 2 and 4 matrices
    # padded to 8) against the same on one device.
    muon_cfg = TrainConfig(seq_len=16, batch_size=BATCH, lr=1e-2, seed=3, optimizer="muon")
    muon0 = jax.tree.map(np.asarray, training.init_state(params, muon_cfg))
    m8, _, muon_compiled8 = run_chunk(mesh8, training.optimizer(muon_cfg, mesh8), muon0)
    m1, _, _ = run_chunk(mesh1, training.optimizer(muon_cfg, mesh1), muon0)
    out["muon_param_change"] = max_diff(m1.params, muon0.params)
    out["max_muon_param_diff_8_vs_1"] = max_diff(m8.params, m1.params)
    out["max_muon_opt_diff_8_vs_1"] = max_diff(m8.opt_state, m1.opt_state)
    out["muon_all_gather_8"] = "all-gather" in muon_compiled8.as_text()
    out["all_gather_8"] = "all-gather" in hlo8

    # An explicitly sharded batch through jit(train_step): 8 shards of 2 rows each.
    rows_sharding = NamedSharding(mesh8, P("data", None))
    replicated8 = NamedSharding(mesh8, P())
    step = jax.jit(lambda st, rows: training.train_step(st, rows, loss_fn=loss_fn, tx=tx),
                   in_shardings=(replicated8, rows_sharding), out_shardings=replicated8)
    state = jax.device_put(state0, replicated8)
    shards = []
    for k in range(STEPS):
        rows_np = np.asarray(data.gather(jnp.asarray(batches.source), jnp.asarray(starts_KxB[k]),
                                         row_len))
        rows = jax.device_put(rows_np, rows_sharding)
        if k == 0:
            for sh in rows.addressable_shards:
                shards.append({"device": sh.device.id, "shape": list(sh.data.shape),
                               "matches": bool(np.array_equal(np.asarray(sh.data),
                                                              rows_np[sh.index]))})
                shards[-1]["row_start"] = sh.index[0].start or 0
        state, _ = step(state, rows)
    out["shards"] = shards
    out["max_param_diff_step8_vs_1"] = max_diff(state.params, s1.params)

    # Independent reference: value_and_grad and optax on the default device, no mesh.
    params_ref, opt_ref = state0.params, tx.init(state0.params)

    @jax.jit
    def ref_step(params, opt_state, rows, rng):
        (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rows, rng)
        loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = jnp.asarray(state0.rng)
    src = np.asarray(batches.source)
    ref_losses = []
    for k in range(STEPS):
        rows = jnp.asarray(np.stack([src[s:s + row_len] for s in starts_KxB[k]]).astype(np.int32))
        params_ref, opt_ref, loss = ref_step(params_ref, opt_ref, rows,
                                             jax.random.fold_in(rng, k))
        ref_losses.append(float(loss))
    out["losses_ref"] = ref_losses
    out["max_param_diff_1_vs_ref"] = max_diff(s1.params, params_ref)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
