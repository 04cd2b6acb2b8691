"""The lecture's first experiment: a character model trained from scratch on a corpus."""

from __future__ import annotations

import jax

from transformer_jax import data, training
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.model import Transformer, init_params, param_shapes
from transformer_jax.plot import CROSS_ENTROPY
from transformer_jax.tasks.base import Task, TaskKind, Trained
from transformer_jax.tokenizer import DEFAULT_SPECIALS, CharTokenizer, free_specials


def build(config: Config, text: str, mesh, *, say=print, quiet: bool = False) -> Task:
    """A character vocabulary of `text` (its four special symbols free of the corpus) and the
    model of `config` over it; `config.model.vocab_size` is set from the vocabulary."""
    specials = free_specials(text)
    if specials != DEFAULT_SPECIALS:
        say(f"the corpus uses some of the default special symbols {DEFAULT_SPECIALS}; "
            f"start, end, unknown and pad are {specials} instead")
    tokenizer = CharTokenizer.from_text(text, specials)
    config = config.replace(vocab_size=tokenizer.vocab_size)
    cfg, tcfg = config.model, config.train
    if tcfg.tokens_per_sequence - 1 > cfg.max_len:
        raise UserError(f"--seq-len {tcfg.seq_len} gives {tcfg.tokens_per_sequence - 1} input "
                        f"tokens per row, more than --max-len {cfg.max_len}; raise --max-len")
    batches, val_rows = data.datasets(tokenizer, text, tcfg, mesh.devices.size)
    model = Transformer(cfg)
    return Task(KIND, config, training.lm_loss(model, tokenizer.pad_id, train=True),
                training.lm_loss(model, tokenizer.pad_id, train=False),
                lambda: init_params(cfg, jax.random.PRNGKey(tcfg.seed)), batches, val_rows,
                {"config": config.to_dict(), "tokenizer": tokenizer.to_dict()})


def load(config: Config, meta: dict, restore, step: int) -> Trained:
    return Trained(KIND, config, restore(param_shapes(config.model)), step,
                   tokenizer=CharTokenizer.from_dict(meta["tokenizer"]))


KIND = TaskKind("char", unit="char", reader="sample", cross_entropy=True,
                loss_label=lambda config: CROSS_ENTROPY, build=build, load=load)
