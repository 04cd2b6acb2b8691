"""Transfer learning from pretrained GPT-2 (the lecture's second experiment): its pieces.

A new prediction layer over only the tokens the corpus uses (the lecture's `tokens`) replaces
GPT-2's. It starts as GPT-2's own prediction layer restricted to those tokens (their rows of the
tied token embedding), so training starts from the pretrained model's predictions.

- `finetune="head"` (the lecture): the embedding and blocks stay fixed and only the new layer is
  trained, with Adam. The frozen trunk's hidden states are computed once, for a fixed pool of
  training windows (as many as cover the training tokens once, drawn like every other batch) and
  for the validation windows; each step then costs one (B·T, D) x (D, V') product instead of a
  forward pass through GPT-2 (the lecture caches its batches the same way).
- `finetune="lora"`: the trunk stays fixed too, but low-rank adapters of its weight matrices
  (`lora`) are trained with the new layer; each step is a forward and backward pass through
  GPT-2, with Adam state for the adapters and the head only.
- `finetune="full"`: every parameter is trained, the new layer included.

Checkpoints hold only what is trained (a head-only run: the head, with its Adam state; a LoRA
run: the adapters and the head); their metadata names the base model and the sha256 of its
weights, which resuming and sampling check.
The task itself (what is trained, and how a checkpoint is read back) is `tasks.transfer`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from transformer_jax import data, gpt2, parallel, training
from transformer_jax.errors import UserError
from transformer_jax.model import Trunk

_NEVER = -1e9  # logit of a token outside the corpus's vocabulary, once mapped back to GPT-2's


def base_identity(name_or_path: str, directory: Path) -> dict:
    """What a run records of its base model: its name (a local one made absolute) and the
    sha256 of its weights."""
    local = Path(name_or_path).expanduser()
    digest = hashlib.sha256()  # of the one weights file, or of the index and its shards
    for path in gpt2.weight_files(directory):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return {"model": str(local.absolute()) if local.exists() else name_or_path,
            "sha256": digest.hexdigest()}


def load_base(name_or_path: str, expected: dict | None = None):
    """(model, params, tokenizer, identity) of the base GPT-2, checked against `expected`."""
    directory = gpt2.locate(name_or_path)
    identity = base_identity(name_or_path, directory)
    if expected is not None and identity["sha256"] != expected["sha256"]:
        raise UserError(f"the base model {name_or_path} has changed since the run was trained "
                        f"(sha256 {identity['sha256'][:12]}..., the run recorded "
                        f"{expected['sha256'][:12]}...); restore it, or train a new run")
    return (*gpt2.from_pretrained(directory), identity)


def restricted_head(embedding_VxD: np.ndarray, tokens: np.ndarray) -> dict:
    """GPT-2's tied prediction layer restricted to `tokens`: kernel (D, V'), no bias (GPT-2's
    lm_head has none, so the trained head exports as one)."""
    return {"kernel": jnp.asarray(embedding_VxD[tokens].T)}


def full_vocabulary_head(head: dict, tokens: np.ndarray, vocab_size: int) -> dict:
    """A restricted head (kernel (D, V'), and a bias (V',) in runs trained before heads lost
    theirs) mapped back onto the whole vocabulary: tokens outside `tokens` get a logit of -1e9,
    so they are never sampled and the sampler works with GPT-2's ids throughout."""
    tokens = jnp.asarray(tokens)
    d_model = head["kernel"].shape[0]
    return {"kernel": jnp.zeros((d_model, vocab_size)).at[:, tokens].set(head["kernel"]),
            "bias": jnp.full(vocab_size, _NEVER).at[tokens].set(head.get("bias", 0.0))}


def head_loss(params, rows, rng):
    """Cross-entropy of the new head on cached hidden states: rows {"h": (B, T, D), "y": (B, T)}
    with y the index of the next token among the corpus's tokens, -1 where there is none."""
    head = params["head"]
    logits_BxTxV = rows["h"] @ head["kernel"] + head.get("bias", 0.0)
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
    replicated, split = parallel.replicated(mesh), parallel.split_rows(mesh)
    compute = jax.jit(features, out_shardings=replicated)
    params = parallel.place(params, replicated)
    rows = data.pad_rows(rows_NxS, step, pad_id)
    out = [np.asarray(compute(params, parallel.place(rows[i:i + step], split)))
           for i in tqdm(range(0, len(rows), step), desc="hidden states", unit="batch",
                         disable=quiet, leave=False)]
    return np.concatenate(out)[:len(rows_NxS)]
