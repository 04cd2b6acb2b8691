"""The lecture's claim that RNNs beat transformers on characters and lose on word pieces.

    python benchmarks/lecture_claims.py --data ../shared/data/tinyshakespeare.txt --minutes 5

The lecture: "although transformers outperform RNNs when the tokens are words or word-fragments,
RNNs outperform transformers when the tokens are characters". This trains four models, each for
the same wall-clock budget (--minutes) on this machine: a character transformer, a character
LSTM, a BPE transformer and a BPE LSTM (a byte-level BPE of --vocab-size tokens trained on the
training split, as `train.py --tokenizer bpe` trains it), then prints each one's validation bits
per byte: the summed cross-entropy over every token of the same held-out text (the last
--val-fraction of the corpus, read as non-overlapping windows of --seq-len tokens after a start
symbol, so that every byte is predicted) over ln 2 and its UTF-8 bytes, a unit that does not
depend on the tokenizer.

The transformer is the library's, in the `default` preset's shape (d_model 128, 4 layers, 4
heads, d_ff 512, context --seq-len). The LSTM exists only here: an embedding of the
transformer's width, one `flax.linen.OptimizedLSTMCell` layer scanned over time (`nn.RNN`) and
a linear head, its hidden size chosen per vocabulary so that its parameter count is the nearest
(multiple of 8) to the transformer's; the script asserts they are within 20%. Both read the same
batches (`Batches.starts` of the same seed) through the library's loss (`training.lm_loss`,
`training.loss_and_grads`).

Both use the same optimizer: AdamW with the `default` preset's settings (beta2 0.99, weight
decay 0.1, gradient clipping at norm 1) and a schedule over the wall-clock budget, since the
number of steps a budget buys is not known in advance: linear warm-up over its first 5%, then
cosine decay to a tenth of the peak at its end. Peak learning rates: --lr-transformer (4e-3)
and --lr-lstm (5e-3).

Steps run as train.py runs them: --chunk steps per compiled call (a `lax.scan`), one XLA host
device per core (--cpu-devices), the batch split over them with `jax.shard_map` and the
gradients averaged once per step. Each model's programs are compiled, and one chunk timed,
before its clock starts, their updates thrown away; evaluation is after the budget and outside
it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = ("char-transformer", "char-lstm", "bpe-transformer", "bpe-lstm")
PEAK_LR = {"transformer": 4e-3, "lstm": 5e-3}
WARMUP_FRACTION = 0.05
MIN_LR_RATIO = 0.1
PARAM_TOLERANCE = 0.2


def tokenizer_of(kind: str, text: str, train_text: str, vocab_size: int):
    """As train.py builds it (`tasks/char.py`): the corpus's characters, or a byte-level BPE of
    `vocab_size` tokens trained on the training split; specials free of the corpus."""
    from transformer_jax.bpe import TrainedBPE
    from transformer_jax.tokenizer import CharTokenizer, free_specials

    specials = free_specials(text)
    if kind == "char":
        return CharTokenizer.from_text(text, specials)
    return TrainedBPE.train(train_text, vocab_size, specials)


def lstm_module(vocab_size: int, embed: int, hidden: int):
    """Ids (B, T) -> float32 logits (B, T, V): embedding, one LSTM layer scanned over time, a
    linear head. Takes (ids, valid, train=) as the library's loss calls a model; `valid` is not
    needed, since pads only ever end a row (the last evaluation window) and a recurrent model
    reads only what comes before."""
    from flax import linen as nn

    class LSTM(nn.Module):
        @nn.compact
        def __call__(self, ids_BxT, valid_BxT=None, *, train=False):
            x_BxTxE = nn.Embed(vocab_size, embed, name="embed")(ids_BxT)
            h_BxTxH = nn.RNN(nn.OptimizedLSTMCell(hidden), name="lstm")(x_BxTxE)
            return nn.Dense(vocab_size, name="head")(h_BxTxH).astype("float32")

    return LSTM()


def lstm_param_count(vocab_size: int, embed: int, hidden: int) -> int:
    import jax
    import jax.numpy as jnp

    from transformer_jax.model import count_params

    module = lstm_module(vocab_size, embed, hidden)
    return count_params(jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))))


def matched_hidden(vocab_size: int, embed: int, target: int) -> int:
    """The multiple of 8 whose LSTM has the parameter count nearest `target` (the count grows
    with the hidden size, so a bisection finds it)."""
    lo, hi = 1, 1024  # in units of 8
    while lo < hi:
        mid = (lo + hi) // 2
        if lstm_param_count(vocab_size, embed, 8 * mid) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [8 * k for k in (lo - 1, lo) if k >= 1]
    return min(candidates, key=lambda h: abs(lstm_param_count(vocab_size, embed, h) - target))


def matched_models(cfg, seed: int) -> dict:
    """{"transformer": (module, params), "lstm": (module, params)} over `cfg`'s vocabulary, the
    LSTM's hidden size matched to the transformer's parameter count; prints both counts."""
    import jax
    import jax.numpy as jnp

    from transformer_jax.model import Transformer, count_params, init_params

    transformer_params = init_params(cfg, jax.random.PRNGKey(seed))
    target = count_params(transformer_params)
    hidden = matched_hidden(cfg.vocab_size, cfg.d_model, target)
    lstm = lstm_module(cfg.vocab_size, cfg.d_model, hidden)
    lstm_params = jax.jit(lstm.init)(jax.random.PRNGKey(seed),
                                     jnp.zeros((1, 2), jnp.int32))["params"]
    n = count_params(lstm_params)
    print(f"  parameters: transformer {target:,}, LSTM (hidden {hidden}) {n:,} "
          f"({n / target - 1:+.1%})", flush=True)
    assert abs(n - target) <= PARAM_TOLERANCE * target, (n, target)
    return {"transformer": (Transformer(cfg), transformer_params), "lstm": (lstm, lstm_params)}


def lr_at(peak: float, fraction: float) -> float:
    """The learning rate after `fraction` of the budget: warm-up, then cosine decay."""
    if fraction < WARMUP_FRACTION:
        return peak * fraction / WARMUP_FRACTION
    progress = min((fraction - WARMUP_FRACTION) / (1 - WARMUP_FRACTION), 1.0)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, params, pad_id: int, batches, tcfg, peak_lr: float, seconds: float, mesh,
          name: str, chunk: int):
    """Steps of AdamW on `batches` until `seconds` of wall-clock have passed, `chunk` steps per
    compiled call (a `lax.scan`, as train.py runs them).

    The learning rate is an input of every step: each chunk's rates follow the schedule at the
    times its steps are expected to start (the elapsed time plus the last call's seconds per
    step); the budget's last steps, fewer than a chunk's time, run one at a time.

    Returns:
      (params, steps, seconds, mean training loss over the last 10% of steps).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    from transformer_jax import parallel, training
    from transformer_jax.data import gather

    # optax.adamw is scale_by_adam, add_decayed_weights, then the learning rate; here the rate
    # is a step argument so that the schedule can follow the clock.
    tx = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                     optax.scale_by_adam(tcfg.beta1, tcfg.beta2, eps=1e-8),
                     optax.add_decayed_weights(tcfg.weight_decay))
    loss_fn = training.lm_loss(model, pad_id, train=True)
    replicated = parallel.replicated(mesh)

    def local_grads(params, source, starts_b):
        """Each device's mean loss and gradient over its rows, averaged over the devices: the
        whole batch's, since training rows hold no pads (every device counts as many
        targets)."""
        rows_bxS = gather(source, starts_b, batches.row_len)
        return jax.lax.pmean(training.loss_and_grads(loss_fn, params, rows_bxS,
                                                     jax.random.PRNGKey(0)), parallel.AXIS)

    # Per device (shard_map) rather than one global-view jit: under the latter XLA sums the
    # LSTM's recurrent-weight gradient over the devices at every time step of the backward
    # scan (an all-reduce inside the loop of the compiled program), not once per step.
    # check_vma off: Flax's initial LSTM carry is not marked as varying over the devices.
    local_grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P(), P(parallel.AXIS)),
                                out_specs=P(), check_vma=False)

    def steps(params, opt_state, source, starts_KxB, lr_K):
        def body(carry, xs):
            params, opt_state = carry
            starts_B, lr = xs
            loss, grads = local_grads(params, source, starts_B)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
            return (params, opt_state), loss

        (params, opt_state), losses_K = jax.lax.scan(body, (params, opt_state),
                                                     (starts_KxB, lr_K))
        return params, opt_state, losses_K

    steps = jax.jit(steps, in_shardings=(replicated, replicated, replicated,
                                         parallel.split_batches(mesh), None),
                    out_shardings=(replicated, replicated, replicated))
    params = parallel.place(params, replicated)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    source = parallel.place(batches.source, replicated)
    starts = lambda done, k: parallel.place(batches.starts(done, k), parallel.split_batches(mesh))

    # Compile both chunk lengths (the full chunk, and one step for the budget's last steps)
    # before the clock, their results thrown away; a second, timed call of the full chunk
    # gives the seconds per step that the first chunk's rates are placed by.
    run = lambda k: jax.block_until_ready(
        steps(params, opt_state, source, starts(0, k), jnp.zeros((k,), jnp.float32)))
    run(1), run(chunk)
    t = time.perf_counter()
    run(chunk)
    step_seconds = (time.perf_counter() - t) / chunk

    losses, report_at, t0 = [], seconds / 4, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        k = chunk if (seconds - elapsed) / step_seconds >= chunk else 1
        lr_K = jnp.asarray([lr_at(peak_lr, (elapsed + i * step_seconds) / seconds)
                            for i in range(k)], jnp.float32)
        params, opt_state, losses_K = steps(params, opt_state, source, starts(len(losses), k),
                                            lr_K)
        losses.extend(np.asarray(losses_K).tolist())
        if not all(map(math.isfinite, losses[-k:])):
            raise SystemExit(f"{name}: non-finite loss by step {len(losses)}; lower its lr")
        step_seconds = (time.perf_counter() - t0 - elapsed) / k
        if time.perf_counter() - t0 >= report_at:
            print(f"  {name}: {len(losses)} steps, train loss {losses[-1]:.4f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            report_at += seconds / 4
    elapsed = time.perf_counter() - t0
    tail = float(np.mean(losses[-max(1, len(losses) // 10):]))
    return params, len(losses), elapsed, tail


def bits_per_byte(model, params, tokenizer, val_text: str, seq_len: int, batch_size: int,
                  mesh) -> float:
    """Summed nats over every token of `val_text`, over ln 2 and its UTF-8 bytes."""
    from transformer_jax import data, training

    ids = tokenizer.encode(val_text, add_start=True)
    rows = data.pad_rows(data.windows(ids, seq_len, tokenizer.pad_id), batch_size,
                         tokenizer.pad_id)
    evaluate = training.compile_evaluate(mesh, training.lm_loss(model, tokenizer.pad_id,
                                                                train=False))
    batches = rows.reshape(-1, batch_size, rows.shape[1])
    total, count = evaluate(params, batches, len(batches), None)
    assert int(count) == len(ids) - 1, (int(count), len(ids))
    return float(total) / math.log(2) / len(val_text.encode("utf-8"))


def run(args) -> None:
    import jax

    from transformer_jax import config as config_lib, data, parallel
    from transformer_jax.errors import UserError
    from transformer_jax.model import count_params

    only = tuple(args.only.split(","))
    if not only or set(only) - set(MODELS):
        raise UserError(f"--only {args.only!r} must name some of {', '.join(MODELS)}, "
                        "comma-separated")
    text = data.read_text(args.data)
    try:
        base = config_lib.preset("default").replace(
            optimizer="adamw", seq_len=args.seq_len, max_len=args.seq_len,
            batch_size=args.batch_size, seed=args.seed, val_fraction=args.val_fraction)
    except ValueError as e:
        raise UserError(str(e)) from None
    train_text, val_text = data.split_text(text, args.val_fraction)
    if not val_text:
        raise UserError(f"--val-fraction {args.val_fraction} holds out no text; raise it")
    mesh = parallel.data_mesh()
    eval_batch = data.eval_batch_size(base.train, mesh.devices.size)
    data.check_batch_size(base.train, mesh.devices.size)
    print(f"{len(train_text):,} training and {len(val_text):,} held-out characters "
          f"({len(val_text.encode('utf-8')):,} bytes); {args.minutes:g} min per model on "
          f"{mesh.devices.size} {jax.default_backend()} device(s), batch {args.batch_size} x "
          f"{args.seq_len}", flush=True)

    rows, figures = [], {}
    for kind in ("char", "bpe"):
        names = [n for n in MODELS if n.startswith(kind) and n in only]
        if not names:
            continue
        tokenizer = tokenizer_of(kind, text, train_text, args.vocab_size)
        config = base.replace(tokenizer=kind, vocab_size=tokenizer.vocab_size)
        batches = data.train_batches(tokenizer, train_text, config.train)
        print(f"{kind}: vocabulary {tokenizer.vocab_size:,}, {len(batches.source):,} training "
              "tokens", flush=True)
        models = matched_models(config.model, args.seed)
        for name in names:
            family = name.split("-")[1]
            model, params = models[family]
            params, steps, seconds, loss = train(
                model, params, tokenizer.pad_id, batches, config.train,
                vars(args)[f"lr_{family}"], args.minutes * 60, mesh, name,
                args.chunk)
            bpb = bits_per_byte(model, params, tokenizer, val_text, args.seq_len, eval_batch,
                                mesh)
            print(f"{name}: {steps} steps, train loss {loss:.4f} (last 10% of steps), "
                  f"{seconds:.1f} s; validation {bpb:.4f} bits/byte", flush=True)
            rows.append((name, kind if kind == "char" else f"bpe {tokenizer.vocab_size}",
                         count_params(params), steps, steps * batches.tokens_per_step / seconds,
                         bpb))
            figures[f"{name.replace('-', '_')}_bpb"] = round(bpb, 4)

    print("\n| model | tokenizer | parameters | steps | tokens/s | validation bits/byte |")
    print("|---|---|---|---|---|---|")
    for name, tok, n, steps, rate, bpb in rows:
        print(f"| {name} | {tok} | {n:,} | {steps:,} | {rate:,.0f} | {bpb:.4f} |")
    print()
    # The claim: the LSTM wins on characters, the transformer on BPE tokens.
    for kind, winner, loser in (("char", "lstm", "transformer"), ("bpe", "transformer", "lstm")):
        won, lost = figures.get(f"{kind}_{winner}_bpb"), figures.get(f"{kind}_{loser}_bpb")
        if None not in (won, lost):
            figures[f"{kind}_{winner}_wins"] = won < lost
    common.report(minutes=args.minutes, **figures)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, default=argparse.SUPPRESS,
                   help="UTF-8 text corpus (e.g. tinyshakespeare)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="wall-clock training budget of each model, compilation excluded")
    p.add_argument("--vocab-size", type=int, default=1024,
                   help="tokens of the BPE vocabulary, the four special symbols included")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens per training row and per evaluation window (the context)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per training step")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the corpus, at its end, held out for validation")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="XLA host devices, the batch split over them (default: one per core)")
    p.add_argument("--chunk", type=int, default=10, help="training steps per compiled call")
    for family in PEAK_LR:
        p.add_argument(f"--lr-{family}", type=float, default=PEAK_LR[family],
                       help=f"peak AdamW learning rate of the {family.replace('lstm', 'LSTM')}s")
    p.add_argument("--only", default=",".join(MODELS),
                   help="comma-separated models to run, among those of the default")
    args = p.parse_args()
    if args.minutes <= 0:
        p.error("--minutes must be positive")
    if args.cpu_devices is not None and args.cpu_devices <= 0:
        p.error("--cpu-devices must be positive")
    if args.chunk <= 0:
        p.error("--chunk must be positive")
    common.use_cpu_cores(args.cpu_devices)
    from transformer_jax.errors import UserError

    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
