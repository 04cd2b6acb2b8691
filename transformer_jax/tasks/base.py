"""The contract between the training loop and a kind of run.

Each module of this package (`char`, `transfer`, `series`) defines one `TaskKind`: how to build
the `Task` the loop trains from a config and a corpus, how to rebuild a `Trained` model from a
checkpoint's metadata for inference, and what the loop prints about it. `tasks.kind_of` is the
one dispatch from a config to its kind; nothing above this package names a kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformer_jax.config import Config
from transformer_jax.data import Batches
from transformer_jax.training import LossFn


@dataclass(frozen=True)
class Task:
    """What a run trains, everything but the loop.

    `train_loss` and `eval_loss` are the loss with and without dropout; `init_params()` returns
    fresh trained parameters; `val_rows` is every validation row as (N, B, S, ...) batches;
    `meta` (JSON) identifies the model and data and is saved with every checkpoint; `frozen`
    (a dict, or None) holds parameters the losses read but nothing trains or saves (LoRA's
    base model): they see `{**frozen, **params}`.
    """

    kind: TaskKind
    config: Config
    train_loss: LossFn
    eval_loss: LossFn
    init_params: Callable[[], Any]
    batches: Batches
    val_rows: Any
    meta: dict
    frozen: dict | None = None


@dataclass(frozen=True)
class Trained:
    """A checkpoint's model, ready for inference.

    `tokenizer` for a text model (`sampling.complete`), `scaler` for a series model
    (`forecast.forecast`): the other is None. `step` is the checkpoint's step; `targets` the
    token ids its prediction layer covers (a transfer run's corpus tokens; None: every id);
    `corpus` what the run recorded of its corpus (`data.corpus_record`), if anything.
    """

    kind: TaskKind
    config: Config
    params: Any
    step: int
    tokenizer: Any = None
    scaler: Any = None
    targets: Any = None
    corpus: dict | None = None


# (config, checkpoint metadata, restore) -> Trained, where restore(shapes) reads the params
Load = Callable[[Config, dict, Callable[[Any], Any], int], Trained]


@dataclass(frozen=True)
class TaskKind:
    """One kind of run.

    name: its `Config.kind`; unit(config): what one loss term is (char, token, value); reader: the
    program that reads its checkpoints (sample, or forecast); cross_entropy: whether the loss is
    a cross-entropy (then also shown in bits per unit); loss_label(config): the loss curve's
    axis label; build(config, text, mesh, *, say, quiet) -> Task; load: see `Load`.
    """

    name: str
    unit: Callable[[Config], str]
    reader: str
    cross_entropy: bool
    loss_label: Callable[[Config], str]
    build: Callable[..., Task]
    load: Load
