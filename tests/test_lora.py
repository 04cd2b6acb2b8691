"""Tests for transformer_jax.lora and LoRA fine-tuning runs on the tiny GPT-2 fixture.

References: the base model itself (fresh adapters change nothing, bit for bit), an unmerged
forward pass (each adapted Dense computes x W + b + s (x A) B, intercepted in the real model)
against the merged weights, numpy for the merge, and uninterrupted runs for resuming.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time

import fault_injection as fi
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_transfer import FIXTURE, PROMPT, config, songs, val_losses

from transformer_jax import lora, parallel, run, tasks, training
from transformer_jax.gpt2 import from_pretrained
from transformer_jax.model import Transformer, layered
from transformer_jax.tokens import Corpus

TARGETS = ("qkv", "out", "up", "down")


@pytest.fixture(scope="module")
def base():
    model, params, tok = from_pretrained(FIXTURE)
    return model, params, jnp.asarray([tok.encode(PROMPT)])


def trained_adapters(params, targets=TARGETS, rank=3, seed=1):
    """Adapters with non-zero A and B (a trained-looking state)."""
    adapters = lora.init_adapters(params, targets, rank, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 100))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters)


def test_fresh_adapters_leave_the_model_exactly_the_base_model(base):
    model, params, ids = base
    adapters = lora.init_adapters(params, ("qkv", "out"), 8, jax.random.PRNGKey(0))
    assert set(adapters["trunk"]["block_0"]["attn"]) == {"qkv", "out"}
    assert "mlp" not in adapters["trunk"]["block_0"]
    merged = lora.merged({**params, "lora": adapters}, 2.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.apply({"params": merged}, ids),
                                  model.apply({"params": params}, ids))


def test_adapter_shapes_and_the_merge_equal_numpy(base):
    _, params, _ = base
    adapters = trained_adapters(params)
    qkv = params["trunk"]["block_1"]["attn"]["qkv"]["kernel"]  # (D, 3D)
    a, b = (np.asarray(adapters["trunk"]["block_1"]["attn"]["qkv"][k], np.float64)
            for k in ("a", "b"))
    assert a.shape == (qkv.shape[0], 3) and b.shape == (3, qkv.shape[1])
    merged = lora.merged({**params, "lora": adapters}, 0.5)
    np.testing.assert_allclose(merged["trunk"]["block_1"]["attn"]["qkv"]["kernel"],
                               np.asarray(qkv, np.float64) + 0.5 * a @ b, rtol=1e-5, atol=1e-6)
    assert "lora" not in merged


def test_merged_and_unmerged_forward_passes_agree(base):
    """The unmerged pass: every adapted Dense of the real model, intercepted, computes
    x W + b + s (x A) B from the base weights and the adapters separately."""
    model, params, ids = base
    adapters, scale = trained_adapters(params), 0.7

    def unmerged(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dense) or module.name not in TARGETS:
            return next_fun(*args, **kwargs)
        path = module.scope.path  # ("trunk", "block_i", "attn" | "mlp", name)
        ab = adapters
        for key in path:
            ab = ab[key]
        x = args[0]
        return next_fun(*args, **kwargs) + scale * (x @ ab["a"]) @ ab["b"]

    with nn.intercept_methods(unmerged):
        want = model.apply({"params": params}, ids)
    got = model.apply({"params": lora.merged({**params, "lora": adapters}, scale)}, ids)
    assert np.abs(np.asarray(want) - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_stacked_layers_get_stacked_adapters_that_merge_like_the_unrolled_ones(base):
    model, params, ids = base
    adapters = trained_adapters(params)
    fresh = lora.init_adapters(layered(params, True), TARGETS, 3, jax.random.key(0))
    assert fresh["trunk"]["blocks"]["attn"]["qkv"]["a"].shape[0] == 2  # (L, D, r)
    unrolled = lora.merged({**params, "lora": adapters}, 0.5)
    stacked_params = layered(params, True)
    stacked_ad = {"trunk": {"blocks": jax.tree.map(
        lambda *xs: jnp.stack(xs), *(adapters["trunk"][f"block_{i}"] for i in range(2)))}}
    merged = lora.merged({**stacked_params, "lora": stacked_ad}, 0.5)
    for a, b in zip(jax.tree.leaves(layered(merged, False)), jax.tree.leaves(unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    cfg = dataclasses.replace(model.config, scan_layers=True)
    np.testing.assert_allclose(Transformer(cfg).apply({"params": merged}, ids),
                               model.apply({"params": unrolled}, ids), rtol=1e-4, atol=1e-4)


def test_only_the_adapters_and_the_head_are_trained_and_saved(tmp_path, base):
    _, params0, _ = base
    run.train(config("lora", steps=10, lora_rank=4), songs(), tmp_path, quiet=True,
              devices=jax.devices()[:1])
    metadata = (tmp_path / "checkpoints" / "10" / "state" / "_METADATA").read_text()
    assert "'lora'" in metadata and "'head'" in metadata
    assert "'embed'" not in metadata and "'ln_1'" not in metadata and "'ln1'" not in metadata
    trained = run.load_for_sampling(tmp_path)
    moved = lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b)))
    p = trained.params
    # the merged kernels moved (B left zero), everything else is the base model's
    assert moved(p["trunk"]["block_0"]["attn"]["qkv"]["kernel"],
                 params0["trunk"]["block_0"]["attn"]["qkv"]["kernel"])
    for frozen in (("embed", "embedding"), ("trunk", "block_0", "mlp", "up", "kernel"),
                   ("trunk", "block_1", "ln1", "scale"), ("trunk", "positions")):
        a, b = p, params0
        for k in frozen:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(a, b)


def test_the_gradient_is_the_adapters_and_the_heads_and_reaches_every_one_of_them():
    """The LoRA task's loss differentiates only what it trains: the head and the adapters,
    every leaf non-zero once B is (at initialisation B = 0 leaves A's gradient zero, as it must:
    dA = s x^T (dy B^T)); the base weights come in as `frozen`, outside the gradient."""
    cfg = config("lora", lora_targets="qkv,out,up,down")
    task = tasks.kind_of(cfg).build(cfg, Corpus.of_text(songs()),
                                    parallel.data_mesh(jax.devices()[:1]), say=lambda *a: None,
                                    quiet=True)
    params = task.init_params()
    assert sorted(params) == ["head", "lora"] and "lora" not in task.frozen
    params = {**params, "lora": jax.tree.map(lambda x: x + 0.01, params["lora"])}
    loss = training.with_frozen(task.train_loss, task.frozen)
    rows = jnp.asarray(task.val_rows[0])
    grads = jax.grad(lambda p: loss(p, rows, jax.random.PRNGKey(0))[0])(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_a_lora_run_lowers_the_loss_and_resumes_like_an_uninterrupted_one(tmp_path):
    one = dict(quiet=True, devices=jax.devices()[:1])
    run.train(config("lora", steps=10), songs(), tmp_path / "resumed", **one)
    run.train(config("lora"), songs(), tmp_path / "resumed", **one)
    result = run.train(config("lora"), songs(), tmp_path / "straight", **one)
    losses = val_losses(tmp_path / "straight")
    assert result["val_loss"] == losses[-1] < losses[0]
    a, b = (run.load_for_sampling(tmp_path / name).params for name in ("resumed", "straight"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_a_killed_lora_run_resumes_to_the_uninterrupted_parameters(tmp_path):
    """SIGKILL just after the checkpoint of step 8; the same command again resumes there and
    ends, bit for bit, where a run that was never killed does."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(songs(), encoding="utf-8")
    flags = ["--init", str(FIXTURE), "--finetune", "lora", "--lora-rank", "4", "--split-docs",
             "<body>(.*?)</body>", "--min-len", "5", "--seq-len", "24", "--batch-size", "4",
             "--steps", "12", "--save-every", "4", "--eval-every", "4", "--steps-per-call", "1",
             "--cpu-devices", "1", "--keep", "100", "--dropout", "0.1", "--data", str(corpus)]
    command = lambda run_dir: [sys.executable, "train.py", *flags, "--run-dir", str(run_dir)]
    straight = subprocess.run(command(tmp_path / "straight"), cwd=fi.REPO, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=fi.REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while 8 not in fi.step_dirs(killed):
            assert proc.poll() is None and time.monotonic() < deadline, "ended before step 8"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    rerun = subprocess.run(command(killed), cwd=fi.REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from step" in rerun.stdout
    (s1, a), (s2, b) = fi.final_params(killed), fi.final_params(tmp_path / "straight")
    assert s1 == s2 == 12
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_lora_flags_are_checked():
    with pytest.raises(ValueError, match="lora_targets='qkv,mlp'"):
        config("lora", lora_targets="qkv,mlp")
    with pytest.raises(ValueError, match="lora_rank=0 must be positive"):
        config("lora", lora_rank=0)
