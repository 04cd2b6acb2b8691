"""Tests for transformer_jax.transfer: fine-tuning the tiny GPT-2 fixture's head or all of it.

References: the pretrained model's own logits (the new head starts as its prediction layer
restricted to the corpus's tokens), the full model's loss (the cached hidden states give the
same loss), an uninterrupted run (resuming), and the untouched fixture (a frozen trunk stays
bit for bit what was loaded).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from transformer_jax import cli, parallel, run, training, transfer
from transformer_jax.config import Config, preset
from transformer_jax.errors import UserError
from transformer_jax.gpt2 import from_pretrained
from transformer_jax.model import Transformer, layered
from transformer_jax.sampling import generate

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "gpt2-tiny"
PROMPT = "They say economics is the dismal science"


def songs(n: int = 40, seed: int = 0) -> str:
    """A corpus of `n` lecture-style documents between <body> tags, with headers between."""
    rnd = random.Random(seed)
    words = ("the market economics science dismal money price trade labour capital value "
             "growth interest rate bank").split()
    return "".join(f"<body>{' '.join(rnd.choice(words) for _ in range(rnd.randint(3, 60)))}"
                   f"</body>\nheader {i}\n" for i in range(n))


def config(finetune: str, steps: int = 20, **changes) -> Config:
    return preset("default").replace(**{
        **dict(init=str(FIXTURE), finetune=finetune, optimizer="adamw",  # as train.py does
               split_docs="<body>(.*?)</body>",
               min_len=5, seq_len=24, batch_size=4, steps=steps, lr=1e-2, warmup_steps=0,
               decay_steps=0, weight_decay=0.0, eval_every=10, save_every=10, steps_per_call=5),
        **changes})


def val_losses(run_dir: Path) -> list[float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def pretrained():
    return from_pretrained(FIXTURE)


def restricted(pretrained, tokens):
    """The pretrained model with the head restricted to `tokens`: (model, params)."""
    model0, params0, _ = pretrained
    cfg = dataclasses.replace(model0.config, tie_embeddings=False, head_size=len(tokens),
                              head_bias=False)
    head = transfer.restricted_head(np.asarray(params0["embed"]["embedding"]), tokens)
    return Transformer(cfg), {**params0, "head": head}


def test_new_head_starts_as_the_pretrained_prediction_layer_on_the_corpus_tokens(pretrained):
    model0, params0, tok = pretrained
    ids = jnp.asarray([tok.encode(PROMPT)])
    tokens = np.array([3, 17, 40, 250, 399])
    model, params = restricted(pretrained, tokens)
    np.testing.assert_allclose(model.apply({"params": params}, ids),
                               model0.apply({"params": params0}, ids)[..., tokens],
                               rtol=1e-5, atol=1e-5)


def test_cached_hidden_states_give_the_full_model_loss(pretrained):
    _, _, tok = pretrained
    pad = tok.pad_id
    rows = np.full((4, 13), pad, np.int32)
    for r, text in enumerate(["the market price", "dismal science of money and trade value",
                              "bank", "labour capital growth interest rate and price"]):
        ids = tok.encode(text)[:13]
        rows[r, :len(ids)] = ids
    tokens = np.unique(rows[rows != pad])
    index = np.zeros(pad + 1, np.int32)
    index[tokens] = np.arange(len(tokens))
    model, params = restricted(pretrained, tokens)
    mesh = parallel.data_mesh(jax.devices()[:1])
    h = transfer.hidden_states(model.config, params, rows, pad, mesh, batch_size=3)
    targets = rows[:, 1:]
    cached = transfer.head_loss({"head": params["head"]},
                                {"h": jnp.asarray(h), "y": np.where(targets != pad,
                                                                    index[targets], -1)}, None)
    full = training.lm_loss(model, pad, train=False, target_ids=index)(params, rows,
                                                                      jax.random.key(0))
    assert float(cached[1]) == float(full[1]) == int((targets != pad).sum())
    np.testing.assert_allclose(float(cached[0]), float(full[0]), rtol=1e-5)


@pytest.mark.parametrize("finetune", ["head", "full"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, finetune):
    one = dict(quiet=True, devices=jax.devices()[:1])
    run.train(config(finetune, steps=10), songs(), tmp_path / "resumed", **one)
    run.train(config(finetune), songs(), tmp_path / "resumed", **one)
    run.train(config(finetune), songs(), tmp_path / "straight", **one)
    a, b = (run.load_for_sampling(tmp_path / name).params for name in ("resumed", "straight"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("finetune", ["head", "full"])
def test_scanned_layers_fine_tune_like_the_unrolled_model(tmp_path, finetune):
    one = dict(quiet=True, devices=jax.devices()[:1])
    run.train(config(finetune, steps=10, scan_layers=True), songs(), tmp_path / "scanned", **one)
    run.train(config(finetune, steps=10), songs(), tmp_path / "unrolled", **one)
    scanned, unrolled = (run.load_for_sampling(tmp_path / name)
                         for name in ("scanned", "unrolled"))
    cfg, tok, a, cfg0, b = (scanned.config, scanned.tokenizer, scanned.params, unrolled.config,
                            unrolled.params)
    assert cfg.model.scan_layers and "blocks" in a["trunk"]
    assert jax.tree.structure(layered(a, False)) == jax.tree.structure(b)
    # Compared as functions, loosely: Adam's first steps move every weight by about lr
    # whatever its gradient's size, so float32 rounding that flips the sign of a near-zero
    # gradient moves a weight by 2 lr (lr 1e-2 here; logits differ by ~2e-4 after one step).
    ids = jnp.asarray([tok.encode(PROMPT)])
    np.testing.assert_allclose(Transformer(cfg.model).apply({"params": a}, ids),
                               Transformer(cfg0.model).apply({"params": b}, ids),
                               rtol=1e-3, atol=3e-3)
    np.testing.assert_allclose(val_losses(tmp_path / "scanned"),
                               val_losses(tmp_path / "unrolled"), rtol=1e-4)
    new = generate(Transformer(cfg.model), a, tok.encode(PROMPT), max_new_tokens=8,
                   rng=jax.random.PRNGKey(3))
    assert new.shape == (1, 8)


def test_full_fine_tuning_trains_the_trunk_and_lowers_the_loss(tmp_path, pretrained):
    result = run.train(config("full", steps=30), songs(), tmp_path, quiet=True)
    assert result["val_loss"] < val_losses(tmp_path)[0]
    params = run.load_for_sampling(tmp_path).params
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         params["trunk"], pretrained[1]["trunk"])
    assert all(jax.tree.leaves(moved))


def test_sampling_params_map_the_head_back_onto_the_whole_vocabulary(tmp_path, pretrained):
    run.train(config("head", steps=10), songs(), tmp_path, quiet=True)
    meta = json.loads((tmp_path / "checkpoints" / "10" / "meta" / "metadata").read_text())
    tokens = np.asarray(meta["tokens"])
    trained = run.load_for_sampling(tmp_path)
    cfg, tok, params = trained.config, trained.tokenizer, trained.params
    assert cfg.model.outputs == cfg.model.vocab_size == pretrained[0].config.vocab_size
    ids = jnp.asarray([tok.encode(PROMPT)])
    logits = np.asarray(Transformer(cfg.model).apply({"params": params}, ids))
    others = np.setdiff1d(np.arange(cfg.model.vocab_size), tokens)
    assert (logits[..., others] < -1e8).all()
    new = generate(Transformer(cfg.model), params, tok.encode(PROMPT), max_new_tokens=40,
                   rng=jax.random.PRNGKey(3), num_samples=4)
    assert np.isin(new, tokens).all()


def test_a_changed_base_model_is_refused(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(FIXTURE, base)
    run.train(config("head", steps=5).replace(init=str(base)), songs(), tmp_path / "run",
              quiet=True)
    tensors = load_file(str(base / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("h.0.ln_1.bias"))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(base / "model.safetensors"))
    with pytest.raises(UserError, match="has changed since the run was trained"):
        run.load_for_sampling(tmp_path / "run")


def test_seq_len_beyond_the_pretrained_context_is_refused(tmp_path):
    with pytest.raises(UserError, match="exceeds the context"):
        run.train(config("head", seq_len=65), songs(), tmp_path, quiet=True)


def test_shape_flags_do_not_apply_to_a_pretrained_model():
    args = cli.train_parser().parse_args(["--init", "gpt2", "--d-model", "64"])
    with pytest.raises(UserError, match="--d-model does not apply with --init gpt2"):
        cli.resolve_config(args)
    args = cli.train_parser().parse_args(["--init", "gpt2", "--dropout", "0.1", "--remat",
                                          "--scan-layers"])
    model = cli.resolve_config(args).model
    assert (model.dropout, model.remat, model.scan_layers) == (0.1, True, True)


def test_a_pretrained_model_is_fine_tuned_with_adamw_unless_told_otherwise(tmp_path):
    assert preset("default").train.optimizer == "muon"  # a recipe for training from scratch
    resolve = lambda *argv: cli.resolve_config(cli.train_parser().parse_args(list(argv)))
    assert resolve("--init", "gpt2").train.optimizer == "adamw"
    assert resolve("--init", "gpt2", "--optimizer", "muon").train.optimizer == "muon"
    file = tmp_path / "muon.json"
    file.write_text(json.dumps({"optimizer": "muon"}))
    assert resolve("--init", "gpt2", "--config", str(file)).train.optimizer == "muon"
    assert resolve().train.optimizer == "muon"


# --- the command lines, as the issue asks: head fine-tuning, then sampling ------------------


def script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_head_fine_tuning_then_sampling(tmp_path, pretrained):
    corpus = tmp_path / "songs.txt"
    corpus.write_text(songs(), encoding="utf-8")
    run_dir = tmp_path / "run"
    proc = script("train.py", "--init", FIXTURE, "--finetune", "head", "--data", corpus,
                  "--split-docs", "<body>(.*?)</body>", "--min-len", "5", "--seq-len", "24",
                  "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0", "--steps", "40",
                  "--eval-every", "10", "--cpu-devices", "2", "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr
    losses = val_losses(run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3
    meta = json.loads((run_dir / "checkpoints" / "40" / "meta" / "metadata").read_text())
    V, D = len(meta["tokens"]), pretrained[0].config.d_model
    assert f"trained parameters: {D * V:,} " in proc.stdout  # the head alone (no bias)
    params = run.load_for_sampling(run_dir).params
    for a, b in zip(jax.tree.leaves({k: v for k, v in params.items() if k != "head"}),
                    jax.tree.leaves({k: v for k, v in pretrained[1].items() if k != "head"})):
        np.testing.assert_array_equal(a, b)  # the trunk, bit for bit

    proc = script("sample.py", "--run-dir", run_dir, "--prompt", PROMPT,
                  "--max-new-tokens", "30", "--seed", "9")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.startswith(PROMPT) and len(proc.stdout) > len(PROMPT) + 10


def test_cli_samples_from_the_untouched_pretrained_model(pretrained):
    reference = json.loads((FIXTURE / "reference.json").read_text(encoding="utf-8"))
    prompt, new_ids = reference["greedy_prompts"][0], reference["greedy_new_ids"][0]
    proc = script("sample.py", "--model", FIXTURE, "--prompt", prompt, "--temperature", "0",
                  "--max-new-tokens", len(new_ids))
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.rstrip("\n") == prompt + pretrained[2].decode(new_ids)
