"""The lecture's first experiment: a language model trained from scratch on a corpus, over its
characters (the lecture's vocabulary) or over a byte-level BPE trained on its training split."""

from __future__ import annotations

import jax

from transformer_jax import tokens, training
from transformer_jax.bpe import TrainedBPE
from transformer_jax.config import DEFAULT_BPE_VOCAB, Config
from transformer_jax.errors import UserError
from transformer_jax.model import Transformer, init_params, param_shapes
from transformer_jax.plot import CROSS_ENTROPY
from transformer_jax.tasks.base import Task, TaskKind, Trained
from transformer_jax.tokenizer import DEFAULT_SPECIALS, CharTokenizer, free_specials
from transformer_jax.tokens import Corpus


def tokenizer_of(config: Config, corpus: Corpus, *, say=print):
    """The vocabulary `config` asks for, of `corpus`: its characters, or a BPE trained on its
    training split; either way the four special symbols are free of the corpus."""
    specials = free_specials(corpus.charset)
    if specials != DEFAULT_SPECIALS:
        say(f"the corpus uses some of the default special symbols {DEFAULT_SPECIALS}; "
            f"start, end, unknown and pad are {specials} instead")
    asked, tcfg = config.model.vocab_size, config.train
    if tcfg.tokenizer == "char":
        tokenizer = CharTokenizer.from_text(corpus.charset, specials)
        if asked not in (0, tokenizer.vocab_size):
            raise UserError(f"--vocab-size {asked} applies to --tokenizer bpe; the corpus's "
                            f"characters give {tokenizer.vocab_size} tokens")
        return tokenizer
    cut = corpus.split(tcfg.val_fraction)
    tokenizer = TrainedBPE.train(corpus.pieces(0, cut), asked or DEFAULT_BPE_VOCAB, specials)
    say(f"tokenizer: a byte-level BPE of {tokenizer.vocab_size:,} tokens, trained on the "
        f"training split ({cut:,} characters)")
    return tokenizer


def build(config: Config, corpus: Corpus, mesh, *, say=print, quiet: bool = False) -> Task:
    """The vocabulary of `corpus` (`tokenizer_of`) and the model of `config` over it;
    `config.model.vocab_size` is set from the vocabulary."""
    tokenizer = tokenizer_of(config, corpus, say=say)
    config = config.replace(vocab_size=tokenizer.vocab_size)
    cfg, tcfg = config.model, config.train
    if tcfg.tokens_per_sequence - 1 > cfg.max_len:
        raise UserError(f"--seq-len {tcfg.seq_len} gives {tcfg.tokens_per_sequence - 1} input "
                        f"tokens per row, more than --max-len {cfg.max_len}; raise --max-len")
    batches, val_rows = tokens.datasets(tokenizer, corpus, tcfg, mesh.devices.size, say=say)
    model = Transformer(cfg)
    return Task(KIND, config, training.lm_loss(model, tokenizer.pad_id, train=True),
                training.lm_loss(model, tokenizer.pad_id, train=False),
                lambda: init_params(cfg, jax.random.PRNGKey(tcfg.seed)), batches, val_rows,
                {"config": config.to_dict(), "tokenizer": tokenizer.to_dict()})


def tokenizer_from_dict(data: dict):
    """The tokenizer a checkpoint's metadata records (`to_dict` of either kind)."""
    return TrainedBPE.from_dict(data) if data.get("kind") == "bpe" else \
        CharTokenizer.from_dict(data)


def load(config: Config, meta: dict, restore, step: int) -> Trained:
    return Trained(KIND, config, restore(param_shapes(config.model)), step,
                   tokenizer=tokenizer_from_dict(meta["tokenizer"]))


KIND = TaskKind("char", unit=lambda config: "char" if config.train.tokenizer == "char" else
                "token", reader="sample", cross_entropy=True,
                loss_label=lambda config: CROSS_ENTROPY, build=build, load=load)
