"""Transfer learning from pretrained GPT-2: the lecture's second experiment.

A new prediction layer over only the tokens the corpus uses (the lecture's `tokens`) replaces
GPT-2's. It starts as GPT-2's own prediction layer restricted to those tokens (their rows of the
tied token embedding), so training starts from the pretrained model's predictions.

- `finetune="head"` (the lecture): the embedding and blocks stay fixed and only the new layer is
  trained, with Adam. The frozen trunk's hidden states are computed once, for a fixed pool of
  training windows (as many as cover the training tokens once, drawn like every other batch) and
  for the validation windows; each step then costs one (B·T, D) x (D, V') product instead of a
  forward pass through GPT-2 (the lecture caches its batches the same way).
- `finetune="full"`: every parameter is trained, the new layer included.

Checkpoints hold only what is trained (a head-only run: the head, with its Adam state); their
metadata names the base model and the sha256 of its weights, which resuming and sampling check.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from transformer_jax import data, gpt2, run, training
from transformer_jax.config import PRETRAINED_MODEL_FIELDS, Config
from transformer_jax.errors import UserError
from transformer_jax.model import Transformer, Trunk, count_params, layered, param_shapes

_NEVER = -1e9  # logit of a token outside the corpus's vocabulary, once mapped back to GPT-2's


def base_identity(name_or_path: str, directory: Path) -> dict:
    """What a run records of its base model: its name (a local one made absolute) and the
    sha256 of its weights."""
    local = Path(name_or_path).expanduser()
    digest = hashlib.sha256()
    with open(directory / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"model": str(local.absolute()) if local.exists() else name_or_path,
            "sha256": digest.hexdigest()}


def _load_base(name_or_path: str, expected: dict | None = None):
    """(model, params, tokenizer, identity) of the base GPT-2, checked against `expected`."""
    directory = gpt2.locate(name_or_path)
    identity = base_identity(name_or_path, directory)
    if expected is not None and identity["sha256"] != expected["sha256"]:
        raise UserError(f"the base model {name_or_path} has changed since the run was trained "
                        f"(sha256 {identity['sha256'][:12]}..., the run recorded "
                        f"{expected['sha256'][:12]}...); restore it, or train a new run")
    return (*gpt2.from_pretrained(directory), identity)


def restricted_head(embedding_VxD: np.ndarray, tokens: np.ndarray) -> dict:
    """GPT-2's tied prediction layer restricted to `tokens`: kernel (D, V'), zero bias (V',)."""
    return {"kernel": jnp.asarray(embedding_VxD[tokens].T),
            "bias": jnp.zeros(len(tokens), jnp.float32)}


def head_loss(params, rows, rng):
    """Cross-entropy of the new head on cached hidden states: rows {"h": (B, T, D), "y": (B, T)}
    with y the index of the next token among the corpus's tokens, -1 where there is none."""
    head = params["head"]
    logits_BxTxV = rows["h"] @ head["kernel"] + head["bias"]
    return training.token_losses(logits_BxTxV, jnp.maximum(rows["y"], 0), rows["y"] >= 0)


def hidden_states(config, params, rows_NxS: np.ndarray, pad_id: int, mesh, batch_size: int,
                  quiet: bool = True) -> np.ndarray:
    """The frozen trunk's output at every input position of `rows_NxS` (inputs rows[:, :-1]):
    float32 (N, S - 1, D), computed `batch_size` rows at a time across the mesh."""
    trunk = Trunk(config)

    def features(params, rows_BxS):
        ids_BxT = rows_BxS[:, :-1].astype(jnp.int32)
        valid_BxT = ids_BxT != pad_id
        x_BxTxD = jnp.take(params["embed"]["embedding"], jnp.where(valid_BxT, ids_BxT, 0), axis=0)
        return trunk.apply({"params": params["trunk"]}, x_BxTxD, valid_BxT).astype(jnp.float32)

    step = -(-batch_size // mesh.devices.size) * mesh.devices.size
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    compute = jax.jit(features, out_shardings=replicated)
    params = run.place(params, replicated)
    rows = data.pad_rows(rows_NxS, step, pad_id)
    out = [np.asarray(compute(params, run.place(rows[i:i + step], split)))
           for i in tqdm(range(0, len(rows), step), desc="hidden states", unit="batch",
                         disable=quiet, leave=False)]
    return np.concatenate(out)[:len(rows_NxS)]


def task(config: Config, text: str, mesh, *, say=print, quiet: bool = False) -> run.Task:
    """Transfer learning from the GPT-2 named by `config.train.init` on `text` (see module)."""
    tcfg = config.train
    model0, params0, tokenizer, identity = _load_base(tcfg.init)
    base_cfg = model0.config
    say(f"pretrained model: {identity['model']} ({count_params(params0):,} parameters, "
        f"{base_cfg.layers} layers, d_model {base_cfg.d_model}, context {base_cfg.max_len})")
    if tcfg.seq_len > base_cfg.max_len:
        raise UserError(f"--seq-len {tcfg.seq_len} exceeds the context of {tcfg.init} "
                        f"({base_cfg.max_len} tokens); lower --seq-len")
    batches, val_rows = run.datasets(tokenizer, text, tcfg, mesh.devices.size)
    pad = tokenizer.pad_id
    used = np.concatenate([batches.source, val_rows.ravel()])
    tokens = np.unique(used[used != pad])
    if tokens.max() >= base_cfg.vocab_size:
        raise UserError(f"the tokenizer of {tcfg.init} gives ids beyond its model's vocabulary "
                        f"({base_cfg.vocab_size})")
    cfg = dataclasses.replace(base_cfg, tie_embeddings=False, head_size=len(tokens),
                              **{k: getattr(config.model, k) for k in PRETRAINED_MODEL_FIELDS})
    params0 = layered(params0, cfg.scan_layers)
    config = Config(cfg, tcfg)
    meta = {"config": config.to_dict(), "base": identity, "tokens": tokens.tolist()}
    head = restricted_head(np.asarray(params0["embed"]["embedding"]), tokens)
    say(f"corpus: {len(tokens):,} distinct tokens of GPT-2's {tokenizer.vocab_size:,}; "
        f"fine-tuning: {tcfg.finetune}")
    index = np.zeros(max(base_cfg.vocab_size, pad + 1), np.int32)  # token id -> head output
    index[tokens] = np.arange(len(tokens))

    if tcfg.finetune == "full":
        model = Transformer(cfg)
        params = {**params0, "head": head}
        return run.Task(config, lambda train: training.lm_loss(model, pad, train=train,
                                                               target_ids=index),
                        lambda: params, batches, val_rows, meta, unit="token")

    features = lambda rows: hidden_states(cfg, params0, rows, pad, mesh, tcfg.batch_size, quiet)

    def cached(rows_NxS):
        """{"h": (N, S-1, D), "y": (N, S-1)}: hidden states and next-token head indices."""
        targets = rows_NxS[:, 1:]
        return {"h": features(rows_NxS), "y": np.where(targets != pad, index[targets], -1)}

    B, T = tcfg.batch_size, tcfg.seq_len
    pool_batches = max(1, -(-len(batches.source) // (T * B)))
    say(f"caching the frozen trunk's hidden states of {pool_batches * B:,} training windows "
        f"and {val_rows.shape[0] * val_rows.shape[1]:,} validation windows")
    starts = batches.starts(0, pool_batches).reshape(-1)
    pool = cached(batches.source[starts[:, None] + np.arange(batches.row_len)])
    val = cached(val_rows.reshape(-1, val_rows.shape[-1]))
    spans = np.stack([np.arange(len(starts)) * T, np.full(len(starts), T)], axis=1)
    cache = data.Batches({k: v.reshape(len(starts) * T, *v.shape[2:]) for k, v in pool.items()},
                             T, B, "random", tcfg.seed, docs=spans, predicts_last=True)
    val = {k: v.reshape(*val_rows.shape[:2], *v.shape[1:]) for k, v in val.items()}
    return run.Task(config, lambda train: head_loss, lambda: {"head": head}, cache, val, meta,
                    unit="token")


def for_sampling(config: Config, meta: dict, restore) -> tuple[Config, gpt2.BPETokenizer, dict]:
    """(config, tokenizer, params) of a transfer-learning run for `sampling.complete`.

    `restore(shapes)` reads the run's trained parameters. The head is mapped back onto GPT-2's
    whole vocabulary: tokens the corpus never used get a logit of -1e9, so they are never
    sampled and the sampler works with GPT-2's ids throughout.
    """
    _, params0, tokenizer, _ = _load_base(meta["base"]["model"], meta["base"])
    shapes = param_shapes(config.model)
    if config.train.finetune == "head":
        params = {**params0, **restore({"head": shapes["head"]})}
    else:
        params = restore(shapes)
    tokens = jnp.asarray(meta["tokens"])
    cfg = dataclasses.replace(config.model, head_size=0)
    head = params["head"]
    full = {"kernel": jnp.zeros((cfg.d_model, cfg.vocab_size)).at[:, tokens].set(head["kernel"]),
            "bias": jnp.full(cfg.vocab_size, _NEVER).at[tokens].set(head["bias"])}
    return Config(cfg, config.train), tokenizer, layered({**params, "head": full},
                                                         cfg.scan_layers)
