"""Losses, evaluation, the data-parallel train step and the compiled multi-step chunk.

Data parallelism is written the way JAX recommends in place of `jax.pmap`: one `jax.jit` over
global arrays, the batch sharded along the `data` axis of a device mesh and the state
replicated. XLA splits the computation per device and inserts the all-reduce that averages the
gradients, which a pmap'd step spells `lax.pmean(grads, "data")`. One device is the same code
with a mesh of one.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from transformer_jax import muon, parallel
from transformer_jax.config import TrainConfig
from transformer_jax.data import gather
from transformer_jax.model import series_inputs

# (params, batch, rng) -> (summed loss, number of counted targets)
LossFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
_LOG_2PI = float(np.log(2 * np.pi))


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, plus the base key that dropout keys are folded from."""

    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw key, so checkpoints hold it as a plain array


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `decay_steps` (or constant)."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.decay_steps:
        after = optax.cosine_decay_schedule(cfg.lr, cfg.decay_steps - cfg.warmup_steps,
                                            alpha=cfg.min_lr / cfg.lr)
    else:
        after = optax.constant_schedule(cfg.lr)
    if not cfg.warmup_steps:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def optimizer(cfg: TrainConfig, mesh=None) -> optax.GradientTransformation:
    """Global-norm clipping (inf when off, so the state's structure never depends on it), then
    Adam with decoupled weight decay (plain Adam at weight_decay 0) or, for `muon`, Muon for
    the weight matrices of the trunk's blocks (`muon_matrices`) and AdamW for the rest.

    Muon (Jordan et al. 2024) replaces each matrix's Nesterov momentum by the nearest
    semi-orthogonal matrix, found by Newton-Schulz iterations: here 3 after AOL preconditioning
    (Boissin et al. 2025), which on CPUs cost a quarter of a 5-iteration step; with `mesh`
    (the step's device mesh) the iterations are split over its devices (`muon.orthogonalize`).
    The state does not depend on `mesh`.
    """
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    schedule = learning_rate(cfg)
    if cfg.optimizer == "muon":
        update = muon.muon(lambda step: schedule(step) * (cfg.muon_lr / cfg.lr), schedule,
                           muon_matrices, weight_decay=cfg.weight_decay, adam_b1=cfg.beta1,
                           adam_b2=cfg.beta2, mesh=mesh)
    else:
        update = optax.adamw(schedule, cfg.beta1, cfg.beta2, eps=1e-8,
                             weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip), update)


def muon_matrices(params: Any) -> Any:
    """Which parameters Muon updates (a tree of booleans): every Dense kernel inside the trunk,
    a (D_in, D_out) matrix, or (L, D_in, D_out) for scanned layers; AdamW the rest."""
    def is_matrix(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        return names[0] == "trunk" and names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy of the targets where `mask_BxT` is true, and how many there are.

    Returns:
      (loss_sum, count), float32 (or wider) scalars.
    """
    logits_BxTxV = logits_BxTxV.astype(jnp.promote_types(logits_BxTxV.dtype, jnp.float32))
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return (jnp.sum(jnp.where(mask_BxT, nll_BxT, 0.0)),
            jnp.sum(mask_BxT).astype(logp_BxTxV.dtype))


def lm_loss(model: flax.linen.Module, pad_id: int, *, train: bool = True,
            target_ids: np.ndarray | None = None) -> LossFn:
    """The lecture's loss: cross-entropy of each next token given the ones before.

    The returned function maps (params, rows_BxS, rng) to (loss_sum, count): rows are input and
    target at once (inputs rows[:, :-1], targets rows[:, 1:]); pad targets are not counted and
    pad inputs are never attended (a pad id outside the embedding is fine). `target_ids` maps
    token ids to output indices (a head over part of the vocabulary). Sums rather than means,
    so that micro-batches and devices add up to exactly the mean over the whole batch.
    """

    def loss(params, rows_BxS, rng):
        rows_BxS = rows_BxS.astype(jnp.int32)
        inputs_BxT, targets_BxT = rows_BxS[:, :-1], rows_BxS[:, 1:]
        valid_BxT = inputs_BxT != pad_id
        logits = model.apply({"params": params}, jnp.where(valid_BxT, inputs_BxT, 0), valid_BxT,
                             train=train, rngs={"dropout": rng})
        mask_BxT = targets_BxT != pad_id
        if target_ids is not None:
            targets_BxT = jnp.asarray(target_ids)[jnp.where(mask_BxT, targets_BxT, 0)]
        return token_losses(logits, targets_BxT, mask_BxT)

    return loss


def value_losses(out_BxTxO: jax.Array, y_BxTxK: jax.Array, head: str) -> jax.Array:
    """Loss of each target value of a series head, (B, T, K): squared error (`point`), or the
    Gaussian negative log-likelihood 0.5 (log 2 pi + log var + (y - mean)^2 / var)."""
    if head == "point":
        return (out_BxTxO - y_BxTxK) ** 2
    mean_BxTxK, logvar_BxTxK = jnp.split(out_BxTxO, 2, axis=-1)
    return 0.5 * (_LOG_2PI + logvar_BxTxK
                  + (y_BxTxK - mean_BxTxK) ** 2 * jnp.exp(-logvar_BxTxK))


def series_loss(model: flax.linen.Module, k: int, head: str, *, train: bool) -> LossFn:
    """A series model's loss of rows {"x": (B, S + 1, F) standardised times, the K forecast
    series first, "w": (B, S + 1) weight of each time as a target (the first is never one)}:
    (summed loss, weighted count of values)."""

    def loss(params, rows, rng):
        x_BxRxF = rows["x"]
        out_BxTxO = model.apply({"params": params}, series_inputs(x_BxRxF, k), train=train,
                                rngs={"dropout": rng})
        w_BxTx1 = rows["w"][:, 1:, None]
        losses = value_losses(out_BxTxO, x_BxRxF[:, 1:, :k], head)
        return jnp.sum(w_BxTx1 * losses), jnp.sum(w_BxTx1) * k

    return loss


def init_state(params: Any, cfg: TrainConfig) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer(cfg).init(params),
                      rng=jax.random.PRNGKey(cfg.seed + 1))


def fresh_state(params: Any, cfg: TrainConfig, mesh) -> TrainState:
    """A new training state for `params` (host or device arrays), replicated over `mesh` as the
    compiled chunk takes it: laid out once, not re-laid out on every call."""
    replicated = parallel.replicated(mesh)
    return jax.jit(lambda p: init_state(p, cfg), out_shardings=replicated)(
        parallel.place(params, replicated))


def loss_and_grads(loss_fn: LossFn, params: Any, rows_BxS: jax.Array, rng: jax.Array,
                   micro_batches: int = 1) -> tuple[jax.Array, Any]:
    """Mean loss over the batch's counted targets and its gradient.

    With `micro_batches` > 1 the batch is processed in that many sequential slices (gradient
    accumulation), bounding activation memory; the result is the same. Slice i takes rows
    i, i + M, i + 2M, ... so that every slice is still spread over all devices.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (total, count), grads = grad_fn(params, rows_BxS, rng)
    else:
        rows_MxbxS = jax.tree.map(lambda r: r.reshape(-1, micro_batches, *r.shape[1:])
                                  .swapaxes(0, 1), rows_BxS)

        def accumulate(carry, xs):
            rows_bxS, i = xs
            (total, count), grads = grad_fn(params, rows_bxS, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        dtype = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
        (total, count, grads), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), dtype), jnp.zeros((), dtype), zeros),
            (rows_MxbxS, jnp.arange(micro_batches)))
    count = jnp.maximum(count, 1.0)
    return total / count, jax.tree.map(lambda g: g / count, grads)


def train_step(state: TrainState, rows_BxS: jax.Array, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, micro_batches: int = 1, frozen: Any = None
               ) -> tuple[TrainState, dict]:
    """One optimiser step on one batch. Pure; jit it with the batch sharded over `data`.

    `frozen` (a dict, or None) holds parameters the loss reads but nothing trains (LoRA's base
    model): the loss sees them merged with the trained ones, `{**frozen, **state.params}`.

    A non-finite loss or gradient leaves the parameters and optimizer state as they were (the
    step count still advances, as the data position does); `finite` reports it.

    Returns:
      the new state and metrics {"loss", "grad_norm", "finite"} (scalars).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = loss_and_grads(with_frozen(loss_fn, frozen), state.params, rows_BxS, rng,
                                 micro_batches)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state))
    return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def with_frozen(loss_fn: LossFn, frozen: Any) -> LossFn:
    """`loss_fn` of the trained parameters alone, the `frozen` ones (a dict, or None) merged in."""
    return loss_fn if frozen is None else lambda p, rows, rng: loss_fn({**frozen, **p}, rows, rng)


def compile_train_chunk(mesh, loss_fn: LossFn, tx: optax.GradientTransformation, row_len: int,
                        micro_batches: int = 1):
    """A jit-compiled function running len(starts) steps in one call (`lax.scan`).

    (state, source, starts_KxB, frozen) -> (state, metrics of shape (K,)). The batches are
    gathered on device from the replicated `source` (an (N, ...) array or a pytree of them);
    their rows are split across the mesh. `frozen`: see `train_step` (None for none), an
    argument so that a large base model is an input of the program, never a constant in it.
    The old state is donated, so parameters are updated in place.
    """
    replicated, rows_sharding = parallel.replicated(mesh), parallel.split_rows(mesh)

    def chunk(state, source, starts_KxB, frozen):
        step = functools.partial(train_step, loss_fn=loss_fn, tx=tx,
                                 micro_batches=micro_batches, frozen=frozen)

        def body(state, starts_B):
            rows_BxS = jax.lax.with_sharding_constraint(
                gather(source, starts_B, row_len), rows_sharding)
            return step(state, rows_BxS)

        return jax.lax.scan(body, state, starts_KxB)

    return jax.jit(chunk, in_shardings=(replicated, replicated, parallel.split_batches(mesh),
                                        replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def compile_evaluate(mesh, loss_fn: LossFn):
    """A jit-compiled (params, rows_GxBxS, valid, frozen) -> (loss_sum, count) over the first
    `valid` of G batches of rows (a pytree of such arrays; the others fill a last group up to
    the shape of the rest: see `eval_groups`), for an evaluation-mode loss such as
    `lm_loss(model, pad_id, train=False)`; `frozen` as for `compile_train_chunk`."""
    def evaluate(params, rows_GxBxS, valid, frozen):
        rng = jax.random.PRNGKey(0)  # unused: no dropout in evaluation mode
        loss = with_frozen(loss_fn, frozen)
        sums_G, counts_G = jax.lax.map(lambda rows: loss(params, rows, rng), rows_GxBxS)
        kept_G = jnp.arange(sums_G.shape[0]) < valid
        return jnp.sum(jnp.where(kept_G, sums_G, 0)), jnp.sum(jnp.where(kept_G, counts_G, 0))

    replicated = parallel.replicated(mesh)
    return jax.jit(evaluate, in_shardings=(replicated, parallel.split_batches(mesh), replicated,
                                           replicated))


def eval_groups(rows_NxBxS: Any, group: int | None = None) -> list[tuple[Any, int]]:
    """Host batches `rows_NxBxS` (a pytree of (N, B, ...) arrays) as (rows_GxBxS, valid)
    groups of `group` = G batches (default: all N in one): views of the batches, but the last
    group, which is filled up by repeating its last batch, whose `valid` counts only its own.
    One shape for every group: one compiled evaluation serves a part of the split and all."""
    n = len(jax.tree.leaves(rows_NxBxS)[0])
    group = group or n
    groups = []
    for lo in range(0, n, group):
        if lo + group <= n:
            take = lambda a, lo=lo: a[lo:lo + group]
        else:
            take = lambda a, lo=lo: a[np.minimum(np.arange(lo, lo + group), n - 1)]
        groups.append((jax.tree.map(take, rows_NxBxS), min(group, n - lo)))
    return groups


def evaluate(evaluate_fn, params, groups: Iterable[tuple[Any, int]], frozen=None) -> dict:
    """The lecture's `totalavgloss` (summed token loss over token count) and bits per token,
    over `groups` of batches (see `eval_groups`)."""
    total = count = 0.0
    running = None  # the group in flight while the next one is placed and dispatched
    for rows, valid in itertools.chain(groups, [(None, 0)]):
        done, running = running, (evaluate_fn(params, rows, valid, frozen) if valid else None)
        if done is not None:
            total, count = total + float(done[0]), count + float(done[1])
    loss = total / max(count, 1.0)
    return {"loss": loss, "bpc": loss / np.log(2.0)}
