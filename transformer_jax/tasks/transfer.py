"""Transfer learning from a pretrained GPT-2 (see `transformer_jax.transfer` for the method):
the trunk frozen under a new head over the corpus's tokens (alone, or with LoRA adapters), or
every parameter fine-tuned."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from transformer_jax import data, lora, tokens, training
from transformer_jax.config import PRETRAINED_MODEL_FIELDS, Config
from transformer_jax.errors import UserError
from transformer_jax.model import Transformer, count_params, layered, param_shapes
from transformer_jax.plot import CROSS_ENTROPY
from transformer_jax.tasks.base import Task, TaskKind, Trained
from transformer_jax.tokens import Corpus
from transformer_jax.transfer import (
    full_vocabulary_head,
    head_loss,
    hidden_states,
    load_base,
    restricted_head,
)


def build(config: Config, corpus: Corpus, mesh, *, say=print, quiet: bool = False) -> Task:
    """Transfer learning from the GPT-2 named by `config.train.init` on `corpus`."""
    tcfg = config.train
    model0, params0, tokenizer, identity = load_base(tcfg.init)
    base_cfg = model0.config
    say(f"pretrained model: {identity['model']} ({count_params(params0):,} parameters, "
        f"{base_cfg.layers} layers, d_model {base_cfg.d_model}, context {base_cfg.max_len})")
    if tcfg.seq_len > base_cfg.max_len:
        raise UserError(f"--seq-len {tcfg.seq_len} exceeds the context of {tcfg.init} "
                        f"({base_cfg.max_len} tokens); lower --seq-len")
    batches, val_rows = tokens.datasets(tokenizer, corpus, tcfg, mesh.devices.size, say=say)
    pad = tokenizer.pad_id
    used = np.concatenate([batches.source, val_rows.ravel()])
    used_ids = np.unique(used[used != pad])
    if used_ids.max() >= base_cfg.vocab_size:
        raise UserError(f"the tokenizer of {tcfg.init} gives ids beyond its model's vocabulary "
                        f"({base_cfg.vocab_size})")
    cfg = dataclasses.replace(base_cfg, tie_embeddings=False, head_size=len(used_ids),
                              head_bias=False,
                              **{k: getattr(config.model, k) for k in PRETRAINED_MODEL_FIELDS})
    params0 = layered(params0, cfg.scan_layers)
    config = Config(cfg, tcfg)
    meta = {"config": config.to_dict(), "base": identity, "tokens": used_ids.tolist()}
    new_head = restricted_head(np.asarray(params0["embed"]["embedding"]), used_ids)
    say(f"corpus: {len(used_ids):,} distinct tokens of GPT-2's {tokenizer.vocab_size:,}; "
        f"fine-tuning: {tcfg.finetune}")
    index = np.zeros(max(base_cfg.vocab_size, pad + 1), np.int32)  # token id -> head output
    index[used_ids] = np.arange(len(used_ids))
    if tcfg.finetune != "head":
        model = Transformer(cfg)
        lm_loss = lambda train: training.lm_loss(model, pad, train=train, target_ids=index)
        if tcfg.finetune == "full":
            return Task(KIND, config, lm_loss(True), lm_loss(False),
                        lambda: {**params0, "head": new_head}, batches, val_rows, meta)
        scale = _lora_scale(tcfg)
        loss = lambda train: lambda params, rows, rng: lm_loss(train)(
            lora.merged(params, scale), rows, rng)
        adapters = lambda: lora.init_adapters(params0, _lora_targets(tcfg), tcfg.lora_rank,
                                              jax.random.PRNGKey(tcfg.seed))
        return Task(KIND, config, loss(True), loss(False),
                    lambda: {"head": new_head, "lora": adapters()}, batches, val_rows, meta,
                    frozen=params0)
    features = lambda rows: hidden_states(cfg, params0, rows, pad, mesh, tcfg.batch_size, quiet)
    pool, val = _cached_rows(features, batches, val_rows, index, pad, tcfg, say)
    return Task(KIND, config, head_loss, head_loss, lambda: {"head": new_head}, pool, val, meta)


def _cached_rows(features, batches: data.Batches, val_rows: np.ndarray, index: np.ndarray,
                 pad: int, tcfg, say) -> tuple[data.Batches, dict]:
    """A head-only run's data: the frozen trunk's hidden states of a fixed pool of training
    windows (as many as cover the training tokens once, drawn like every other batch), as
    batches of rows {"h": (T, D), "y": (T,)}, and of every validation row, (N, B, S - 1, ...)."""

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
    flat = {k: v.reshape(len(starts) * T, *v.shape[2:]) for k, v in pool.items()}
    return (data.Batches(flat, T, B, "random", tcfg.seed, docs=spans, predicts_last=True),
            {k: v.reshape(*val_rows.shape[:2], *v.shape[1:]) for k, v in val.items()})


def load(config: Config, meta: dict, restore, step: int) -> Trained:
    """The run's model over GPT-2's whole vocabulary (`full_vocabulary_head`), with GPT-2's
    tokenizer; the base model is loaded again and checked against the recorded sha256."""
    _, params0, tokenizer, _ = load_base(meta["base"]["model"], meta["base"])
    tcfg, shapes = config.train, param_shapes(config.model)
    if tcfg.finetune == "head":
        params = {**params0, **restore({"head": shapes["head"]})}
    elif tcfg.finetune == "lora":
        adapters = jax.eval_shape(lambda: lora.init_adapters(
            params0, _lora_targets(tcfg), tcfg.lora_rank, jax.random.PRNGKey(0)))
        trained = restore({"head": shapes["head"], "lora": adapters})
        params = lora.merged({**params0, **trained}, _lora_scale(tcfg))
    else:
        params = restore(shapes)
    cfg = dataclasses.replace(config.model, head_size=0, head_bias=True)
    head = full_vocabulary_head(params["head"], np.asarray(meta["tokens"]), cfg.vocab_size)
    return Trained(KIND, Config(cfg, config.train),
                   layered({**params, "head": head}, cfg.scan_layers), step, tokenizer=tokenizer,
                   targets=np.asarray(meta["tokens"]))


def _lora_targets(tcfg) -> tuple[str, ...]:
    return tuple(tcfg.lora_targets.split(","))


def _lora_scale(tcfg) -> float:
    """alpha / r: the adapters' update is scaled so that its size does not depend on r."""
    return tcfg.lora_alpha / tcfg.lora_rank


KIND = TaskKind("transfer", unit=lambda config: "token", reader="sample", cross_entropy=True,
                loss_label=lambda config: CROSS_ENTROPY, build=build, load=load)
