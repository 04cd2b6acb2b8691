"""Frozen, validated configuration: the model's shape and the training recipe.

Every field carries a one-line help text in its metadata; the command line builds one flag per
field from it, and config files and checkpoints store the same fields as flat JSON objects.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
KINDS = ("char", "transfer", "series")
FINETUNES = ("head", "lora", "full")
TOKENIZERS = ("char", "bpe")
DEFAULT_BPE_VOCAB = 1024  # --tokenizer bpe without --vocab-size
# The weight matrices a LoRA adapter may adapt: the Dense layers of this name in every block.
LORA_TARGETS = ("qkv", "out", "up", "down")
_INT_LIMIT = 2**31


def _f(default: Any, help: str, *, fixed: bool = False, choices: tuple[str, ...] = (),
       pretrained: bool = False, series: bool = False, flag: bool = True) -> Any:
    """A config field and the facts about it, declared once:

    fixed: it fixes what a checkpoint's parameters or data order mean, so resuming with another
      value is refused; choices: the values it may take; pretrained: a model field that a run
      from a pretrained model may still set (its config.json fixes every other); series: it
      applies to series runs only (without columns, one that is off by default, None, is
      refused when set; the others are ignored); flag: train.py has a flag for it.
    """
    return field(default=default, metadata=dict(help=help, fixed=fixed, choices=choices,
                                                pretrained=pretrained, series=series,
                                                flag=flag))


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}={getattr(obj, name)} must be positive")


def _check_choices(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value, choices = getattr(obj, f.name), f.metadata["choices"]
        if choices and value not in choices:
            raise ValueError(f"{f.name}={value!r} must be one of {', '.join(choices)}")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a causal transformer language model."""

    vocab_size: int = _f(0, "tokens in the vocabulary, the four special symbols included: with "
                         f"--tokenizer bpe the size to train (0: {DEFAULT_BPE_VOCAB}); else set "
                         "from the tokenizer", fixed=True)
    d_model: int = _f(128, "model width: embedding and hidden-state size", fixed=True)
    layers: int = _f(4, "number of transformer blocks", fixed=True)
    heads: int = _f(4, "attention heads per block; must divide d_model", fixed=True)
    d_ff: int = _f(512, "hidden size of each block's feed-forward layer", fixed=True)
    activation: str = _f("gelu", "feed-forward activation", fixed=True, choices=ACTIVATIONS)
    norm: str = _f("pre", "layer norm placement: post (lecture, Vaswani) or pre (GPT-2)",
                   fixed=True, choices=("post", "pre"))
    positions: str = _f("learned", "position encoding: sinusoidal (Vaswani) or learned",
                        fixed=True, choices=("sinusoidal", "learned"))
    max_len: int = _f(256, "context window in tokens (size of the learned position table)",
                      fixed=True)
    tie_embeddings: bool = _f(True, "prediction layer shares the token embedding (logits = h E^T)",
                              fixed=True)
    dropout: float = _f(0.0, "dropout rate on embeddings, attention and residual branches",
                        pretrained=True)
    layer_norm_eps: float = _f(1e-5, "epsilon added to the variance inside layer norm", fixed=True)
    attn_scale_by_layer: bool = _f(False, "divide block i's attention scores by i + 1 as well "
                                   "(i from 0; GPT-2's scale_attn_by_inverse_layer_idx); set "
                                   "from a pretrained config.json, not a flag", fixed=True,
                                   flag=False)
    dtype: str = _f("float32", "compute dtype: float32, bfloat16 (parameters, softmax and loss "
                    "stay float32) or float64 (everything, with JAX_ENABLE_X64=1)",
                    choices=("float32", "bfloat16", "float64"), pretrained=True)
    remat: bool = _f(False, "recompute each block's activations in the backward pass instead of "
                     "keeping them (rematerialisation): compute traded for accelerator memory",
                     pretrained=True)
    scan_layers: bool = _f(False, "run the blocks as one lax.scan over parameters stacked on a "
                           "layer axis: compile time no longer grows with depth", fixed=True,
                           pretrained=True)
    head_size: int = _f(0, "outputs of an untied prediction layer (0: the vocabulary size); "
                        "set by transfer learning, not a flag", fixed=True, flag=False)
    head_bias: bool = _f(True, "an untied prediction layer has a bias; transfer learning's has "
                         "none, like GPT-2's lm_head, so that it exports exactly; not a flag",
                         fixed=True, flag=False)

    def __post_init__(self) -> None:
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size={self.vocab_size} must be positive")
        _positive(self, "d_model", "layers", "heads", "d_ff", "max_len", "layer_norm_eps")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        _check_choices(self)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.head_size < 0 or (self.head_size and self.tie_embeddings):
            raise ValueError(f"head_size={self.head_size} needs an untied prediction layer")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def outputs(self) -> int:
        """Logits per position: the head size, or the vocabulary."""
        return self.head_size or self.vocab_size


@dataclass(frozen=True)
class TrainConfig:
    """Data batching, optimiser and bookkeeping of a training run."""

    batching: str = _f("random", "random: nanoGPT windows; stream: the lecture's contiguous chunks",
                       fixed=True, choices=("random", "stream"))
    tokenizer: str = _f("char", "a model from scratch reads char: the corpus's characters, or "
                        "bpe: a byte-level BPE trained on the training split (--vocab-size "
                        "tokens), which reads any text", fixed=True, choices=TOKENIZERS)
    seq_len: int = _f(256, "tokens per training sequence", fixed=True)
    batch_size: int = _f(16, "sequences per step (random batching) and per evaluation batch",
                        fixed=True)
    streams: int = _f(10, "stream batching: contiguous chunks of the text, one batch each",
                     fixed=True)
    steps: int | None = _f(None, "total optimiser steps of the run (resume continues up to it)")
    epochs: int | None = _f(None, "stream batching: passes over the text "
                            "(steps = epochs * streams)")
    optimizer: str = _f("adamw", "adamw: Adam with decoupled weight decay for every parameter; "
                        "muon: Muon (momentum orthogonalised by Newton-Schulz iterations) for "
                        "the blocks' weight matrices and AdamW for the rest", fixed=True,
                        choices=("adamw", "muon"))
    lr: float = _f(1e-3, "peak learning rate (with --optimizer muon: of the AdamW part)")
    muon_lr: float = _f(0.02, "peak learning rate of the Muon part (--optimizer muon); it "
                        "follows the same warm-up and decay as --lr")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    weight_decay: float = _f(0.0, "decoupled weight decay (AdamW); 0 is plain Adam")
    grad_clip: float = _f(0.0, "clip gradients to this global norm; 0 disables")
    warmup_steps: int = _f(0, "linear warm-up steps from 0 to lr")
    decay_steps: int = _f(0, "cosine decay to min_lr ends at this step; 0 keeps lr constant")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine decay")
    eval_every: int = _f(250, "evaluate on the validation split every N steps")
    eval_batches: int = _f(0, "batches per evaluation during training; 0 = whole split (always "
                           "with --keep-best or --early-stop)")
    target_loss: float | None = _f(None, "stop early once the whole validation split's loss "
                                   "is at most this (checked when an evaluation reaches it)")
    save_every: int = _f(1000, "write a checkpoint every N steps (and always at the end)")
    keep: int = _f(3, "checkpoints to keep")
    keep_best: bool = _f(False, "keep the checkpoint of the lowest validation loss in addition to "
                         "the last --keep (sample.py --step best); every evaluation then uses "
                         "the whole validation split, so that their losses compare")
    early_stop: int = _f(0, "end the run after N evaluations without an improvement of at least "
                         "--min-delta; 0: never; every evaluation then uses the whole validation "
                         "split, so that their losses compare")
    min_delta: float = _f(0.0, "with --keep-best or --early-stop: how far below the best "
                          "validation loss so far a loss must be to count as an improvement")
    tensorboard: bool = _f(False, "also write the scalars of metrics.jsonl as TensorBoard event "
                           "files in RUN_DIR/tensorboard (needs the tensorboard extra: pip "
                           "install 'transformer-jax[tensorboard]')")
    steps_per_call: int = _f(50, "optimiser steps per compiled call (lax.scan)")
    micro_batches: int = _f(1, "split each batch into this many sequential forward/backward "
                            "passes (gradient accumulation): same result, less memory")
    on_nan: str = _f("stop", "on a non-finite loss or gradient: stop (the last good checkpoint "
                     "is kept) or skip that step's update", choices=("stop", "skip"))
    val_fraction: float = _f(0.1, "fraction of the text, at its end, held out for validation",
                             fixed=True)
    split_docs: str | None = _f(None, "cut the corpus into documents with this regular "
                                "expression: its matches' first group if it has one (e.g. "
                                "'<body>(.*?)</body>'), else the text between matches; each "
                                "training window then lies inside one random document", fixed=True)
    min_len: int = _f(2, "with --split-docs: skip documents shorter than this many tokens",
                      fixed=True)
    init: str = _f("scratch", "scratch (random initialisation), or the pretrained GPT-2 to "
                   "start from: a Hugging Face hub name (gpt2, gpt2-medium, ...) or a local "
                   "directory in its layout; the model's shape then comes from its config.json",
                   fixed=True)
    finetune: str = _f("head", "with a pretrained --init: head trains only a new prediction "
                       "layer over the corpus's tokens on the frozen trunk; lora trains it with "
                       "low-rank adapters of the trunk's weight matrices (the trunk frozen); "
                       "full trains every parameter", fixed=True, choices=FINETUNES)
    lora_rank: int = _f(8, "--finetune lora: rank r of each adapter (W + alpha/r * A B, A of "
                        "shape (in, r), B (r, out))", fixed=True)
    lora_alpha: float = _f(16.0, "--finetune lora: the adapters' scale numerator alpha (their "
                           "update is scaled by alpha / r)", fixed=True)
    lora_targets: str = _f("qkv,out", "--finetune lora: comma-separated weight matrices that get "
                           "adapters, among " + ", ".join(LORA_TARGETS) + " (the attention's "
                           "query/key/value and output projections, the feed-forward's up and "
                           "down)", fixed=True)
    columns: str | None = _f(None, "series model: comma-separated columns of a CSV --data to "
                             "forecast (instead of a character model of its text)", fixed=True)
    covariates: str | None = _f(None, "series model: comma-separated CSV columns of known "
                                "covariates, model inputs at the predicted time, not forecast",
                                fixed=True, series=True)
    time_column: str | None = _f(None, "series model: CSV column of time labels; rows must be "
                                 "in time order", fixed=True, series=True)
    head: str = _f("point", "series model's prediction layer: point (mean squared error) or "
                   "gaussian (mean and log-variance per series, negative log-likelihood)",
                   fixed=True, choices=("point", "gaussian"), series=True)
    ar_order: int = _f(4, "series model: lags p of the least-squares AR(p) baseline it is "
                       "compared with on the validation split", series=True)
    seed: int = _f(0, "random seed for initialisation, batches and dropout", fixed=True)

    def __post_init__(self) -> None:
        _check_choices(self)
        _positive(self, "seq_len", "batch_size", "streams", "lr", "muon_lr", "eval_every",
                  "save_every", "keep", "steps_per_call", "micro_batches", "ar_order",
                  "lora_rank", "lora_alpha")
        self._check_kind()
        if self.min_len < 2:
            raise ValueError(f"min_len={self.min_len} must be at least 2 (a document needs a "
                             "token to predict)")
        if self.split_docs is not None:
            if self.batching != "random":
                raise ValueError("split_docs needs batching 'random' (windows from documents)")
            try:
                re.compile(self.split_docs)
            except re.error as e:
                raise ValueError(f"split_docs={self.split_docs!r} is not a regular expression "
                                 f"({e})") from None
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must not be negative")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.epochs is not None and self.batching != "stream":
            raise ValueError(f"epochs={self.epochs} applies to stream batching only "
                             f"(batching={self.batching!r}); use steps")
        for name in ("warmup_steps", "decay_steps", "eval_batches", "min_lr", "weight_decay",
                     "grad_clip", "seed", "early_stop", "min_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")
        targets = self.lora_targets.split(",")
        if not targets or set(targets) - set(LORA_TARGETS) or len(set(targets)) < len(targets):
            raise ValueError(f"lora_targets={self.lora_targets!r} must name distinct weight "
                             f"matrices among {', '.join(LORA_TARGETS)}, comma-separated")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.decay_steps and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps={self.decay_steps} must exceed warmup_steps")

    @property
    def kind(self) -> str:
        """The kind of run, one of KINDS: a series model when CSV columns are named, transfer
        learning from a pretrained --init, else a character model trained from scratch."""
        if self.columns is not None:
            return "series"
        return "char" if self.init == "scratch" else "transfer"

    def _check_kind(self) -> None:
        """What each kind of run requires of the other settings."""
        if self.kind != "char" and self.tokenizer != "char":
            raise ValueError(f"tokenizer={self.tokenizer!r} applies to models trained from "
                             "scratch (a pretrained --init brings its own, a series model has "
                             "none)")
        if self.kind != "series":
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                if f.metadata["series"] and f.default is None and value is not None:
                    raise ValueError(f"{f.name}={value!r} needs columns (the CSV columns of a "
                                     "series model)")
            if self.kind == "transfer" and self.batching != "random":
                raise ValueError(f"init={self.init!r} needs batching 'random'")
            return
        named = [n for n in (self.columns, self.covariates, self.time_column) if n is not None]
        names = [n.strip() for n in ",".join(named).split(",")]
        if "" in names or len(set(names)) < len(names):
            raise ValueError(f"columns={self.columns!r}, covariates and time_column must name "
                             "distinct, non-empty CSV columns")
        if self.init != "scratch" or self.batching != "random" or self.split_docs is not None:
            raise ValueError(f"columns={self.columns!r} (a series model) needs init 'scratch', "
                             "batching 'random' and no split_docs")

    @property
    def tracks_best(self) -> bool:
        """Whether the run follows its best validation loss (--keep-best, --early-stop): then
        every evaluation is on the whole validation split, so that any two compare."""
        return self.keep_best or self.early_stop > 0

    @property
    def tokens_per_sequence(self) -> int:
        """Tokens in one training row: stream rows carry start and end symbols."""
        return self.seq_len + (2 if self.batching == "stream" else 1)

    def total_steps(self) -> int:
        """The run's total step count (epochs are whole passes of `streams` batches)."""
        if self.epochs is not None:
            return self.epochs * self.streams
        return self.steps or 0


@dataclass(frozen=True)
class Config:
    """A whole run: the model and how it is trained."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def kind(self) -> str:
        """The kind of run (see `TrainConfig.kind`)."""
        return self.train.kind

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return cls(TransformerConfig(**data["model"]), TrainConfig(**data["train"]))

    def replace(self, **flat: Any) -> Config:
        """A copy with fields changed by their flat names (`d_model=`, `lr=`, ...), validated.

        Setting one of `steps`/`epochs` clears the other; setting both at once is an error.
        """
        check_fields(flat)
        if "steps" in flat and "epochs" in flat and None not in (flat["steps"], flat["epochs"]):
            raise ValueError("give steps or epochs, not both")
        if flat.get("steps") is not None:
            flat.setdefault("epochs", None)
        if flat.get("epochs") is not None:
            flat.setdefault("steps", None)
        model = {k: v for k, v in flat.items() if k in MODEL_FIELDS}
        train = {k: v for k, v in flat.items() if k in TRAIN_FIELDS}
        return Config(dataclasses.replace(self.model, **model),
                      dataclasses.replace(self.train, **train))


MODEL_FIELDS = {f.name: f for f in dataclasses.fields(TransformerConfig)}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELDS = {**MODEL_FIELDS, **TRAIN_FIELDS}
FIELD_TYPES = {**typing.get_type_hints(TransformerConfig), **typing.get_type_hints(TrainConfig)}
# Derived from the fields' declarations (see `_f`).
FIXED_ON_RESUME = tuple(name for name, f in FIELDS.items() if f.metadata["fixed"])
PRETRAINED_MODEL_FIELDS = tuple(name for name, f in MODEL_FIELDS.items()
                                if f.metadata["pretrained"])


def check_fields(flat: dict[str, Any]) -> None:
    """Raise ValueError for an unknown field name, a value of the wrong JSON type (3.5 for an
    integer field, a string for a number), or a number that no setting takes: NaN, infinity, or
    an integer beyond 32 bits (JAX's shapes, steps and seeds)."""
    for name, value in flat.items():
        if name not in FIELDS:
            raise ValueError(f"unknown config field {name!r}")
        expected = FIELD_TYPES[name]
        allowed = typing.get_args(expected) or (expected,)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if float in allowed and number:
            ok = True
        elif int in allowed and isinstance(value, bool):
            ok = False
        else:
            ok = isinstance(value, tuple(t for t in allowed if t is not type(None))) or (
                value is None and type(None) in allowed)
        if not ok:
            names = "/".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"config field {name!r} must be {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value} must be a finite number")
        if number and isinstance(value, int) and not -_INT_LIMIT < value < _INT_LIMIT:
            raise ValueError(f"{name}={value} is out of range (below 2^31 in magnitude)")


PRESETS: dict[str, dict[str, Any]] = {
    # What the lecture's Julia code builds: create_transformer(16, 6, heads=2) ignores its
    # feedforwardsize argument and uses 4*d; createdata(text, 500, 10); Flux's Adam() at 1e-3.
    "lecture": dict(d_model=16, layers=6, heads=2, d_ff=64, activation="relu", norm="post",
                    positions="sinusoidal", tie_embeddings=True, max_len=501, dropout=0.0,
                    batching="stream", seq_len=500, streams=10, epochs=20, lr=1e-3,
                    micro_batches=16, eval_every=10, save_every=50),
    # A stronger character model that trains on a 2-core CPU in about a quarter of an hour;
    # Muon for the blocks' matrices (3,000 steps on the default corpus: 1.455 against AdamW's
    # 1.559; see benchmarks/RESULTS.md).
    "default": dict(d_model=128, layers=4, heads=4, d_ff=512, activation="gelu", norm="pre",
                    positions="learned", max_len=256, dropout=0.0, batching="random",
                    seq_len=256, batch_size=16, steps=3000, optimizer="muon", lr=4e-3,
                    muon_lr=0.04, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                    warmup_steps=100, decay_steps=3000, min_lr=4e-4, eval_every=250,
                    eval_batches=50, save_every=500),
    # The speed recipe: shallow and narrow, Muon for the blocks' matrices at a high learning
    # rate, a short schedule; it reaches a given loss soonest (see benchmarks/RESULTS.md).
    "fast": dict(d_model=96, layers=2, heads=4, d_ff=384, activation="gelu", norm="pre",
                 positions="learned", max_len=64, dropout=0.0, batching="random", seq_len=64,
                 batch_size=12, steps=750, optimizer="muon", lr=1e-2, muon_lr=0.04,
                 beta2=0.99, weight_decay=0.1, grad_clip=1.0, warmup_steps=50,
                 decay_steps=750, min_lr=6e-4, eval_every=100, eval_batches=20,
                 save_every=750),
    # Series models of a few hundred rows (quarterly macro data): tiny, dropout, few steps;
    # chosen on the first 80% of macrodata's training part, the rest of it as validation.
    "series": dict(d_model=16, layers=2, heads=4, d_ff=32, activation="gelu", norm="pre",
                   positions="learned", max_len=16, dropout=0.2, batching="random", seq_len=16,
                   batch_size=32, steps=300, lr=1e-3, beta2=0.99, weight_decay=0.1,
                   grad_clip=1.0, warmup_steps=50, decay_steps=300, min_lr=1e-4, eval_every=50,
                   eval_batches=0, save_every=300, val_fraction=0.2),
}


def preset(name: str) -> Config:
    """The named preset (`lecture`, `default`, `fast`, `series`) as a Config with vocab_size
    unset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Config().replace(**PRESETS[name])
