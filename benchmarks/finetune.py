"""Head-only, LoRA and full fine-tuning at GPT-2 124M's shapes: step time, memory, checkpoint.

    python benchmarks/finetune.py [--batch-size 8 --seq-len 256 --head-size 5000] [--remat]

Random weights (speed and memory do not depend on them), one device. Each kind runs the
training chunk that train.py compiles for it (AdamW; head-only on the frozen trunk's cached
hidden states; LoRA with rank 8 on qkv and out, the base model an input, not trained; full:
every parameter), and prints its seconds per step (best of --repeats, after compiling), its
peak memory as XLA's analysis of the compiled chunk gives it (arguments + outputs - donated +
temporaries) and the size of its checkpoint (the arrays train.py saves: the trained parameters
and AdamW's moments of them), with the ratios of LoRA's to full fine-tuning's. `--remat`
recomputes each block's activations in the backward pass (train.py's --remat) for LoRA and
full fine-tuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(mesh, chunk, state, source, starts, frozen, repeats: int
            ) -> tuple[float, int, object]:
    """(best seconds of a one-step chunk, peak bytes of XLA's memory analysis of it, the state
    after the steps)."""
    import jax

    from transformer_jax import parallel

    replicated = parallel.replicated(mesh)
    source, frozen = parallel.place(source, replicated), parallel.place(frozen, replicated)
    compiled = chunk.lower(state, source, starts, frozen).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)

    def step():
        nonlocal state
        state, out = compiled(state, source, starts, frozen)
        jax.block_until_ready(out)

    return common.best_seconds(step, repeats), peak, state


def checkpoint_bytes(state) -> int:
    """Bytes of the arrays a run's checkpoint of `state` holds (orbax may compress them on
    disk: after a few steps Adam's moments of rows no batch touched are still zero)."""
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(state))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--head-size", type=int, default=5000, help="tokens the corpus uses")
    p.add_argument("--layers", type=int, default=12, help="GPT-2 124M: 12")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--remat", action="store_true", help="recompute block activations")
    args = p.parse_args()

    import jax
    import numpy as np

    from transformer_jax import lora, parallel, training, transfer
    from transformer_jax.config import TrainConfig, TransformerConfig
    from transformer_jax.model import Transformer, count_params, init_params

    base_cfg = TransformerConfig(vocab_size=50257, d_model=768, layers=args.layers, heads=12,
                                 d_ff=3072, activation="gelu_tanh", max_len=1024)
    cfg = dataclasses.replace(base_cfg, tie_embeddings=False, head_size=args.head_size,
                              head_bias=False, remat=args.remat)
    B, T, V = args.batch_size, args.seq_len, args.head_size
    tcfg = TrainConfig(batch_size=B, seq_len=T, lr=1e-4)
    mesh = parallel.data_mesh(jax.devices()[:1])
    base = init_params(base_cfg, jax.random.PRNGKey(0))
    head = transfer.restricted_head(np.asarray(base["embed"]["embedding"]), np.arange(V))
    index = np.arange(base_cfg.vocab_size, dtype=np.int32) % V  # token id -> head output
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, base_cfg.vocab_size, size=(64 * T,), dtype=np.int32)
    features = {"h": rng.standard_normal((64 * T, 768), dtype=np.float32),
                "y": rng.integers(0, V, size=(64 * T,), dtype=np.int32)}
    lm_loss = training.lm_loss(Transformer(cfg), pad_id=-1, target_ids=index)
    scale = tcfg.lora_alpha / tcfg.lora_rank
    adapters = lora.init_adapters(base, ("qkv", "out"), tcfg.lora_rank, jax.random.PRNGKey(1))
    kinds = {  # name: (loss, trained params, frozen params, source, row length)
        "head": (transfer.head_loss, {"head": head}, None, features, T),
        "lora": (lambda p, rows, key: lm_loss(lora.merged(p, scale), rows, key),
                 {"head": head, "lora": adapters}, base, tokens, T + 1),
        "full": (lm_loss, {**base, "head": head}, None, tokens, T + 1),
    }
    tx = training.optimizer(tcfg, mesh)
    starts = parallel.place(np.arange(B, dtype=np.int32)[None] * T, parallel.split_batches(mesh))
    figures = {}
    for name, (loss, params, frozen, source, row_len) in kinds.items():
        seconds, peak, state = measure(
            mesh, training.compile_train_chunk(mesh, loss, tx, row_len),
            training.fresh_state(params, tcfg, mesh), source, starts, frozen, args.repeats)
        size = checkpoint_bytes(state)
        del state
        print(f"{name}: {count_params(params):,} trained parameters, {seconds:.2f} s/step, "
              f"peak memory {peak / 2**30:.2f} GiB, checkpoint {size / 2**20:,.1f} MiB",
              flush=True)
        figures[f"{name}_seconds_per_step"] = round(seconds, 3)
        figures[f"{name}_peak_gib"] = round(peak / 2**30, 3)
        figures[f"{name}_checkpoint_mib"] = round(size / 2**20, 1)
    print(f"GPT-2 shapes: {count_params(base):,} parameters, batch {B} x {T}, head over {V} "
          f"tokens, remat {args.remat}")
    common.report(**figures,
                  lora_to_full_peak_memory=round(figures["lora_peak_gib"]
                                                 / figures["full_peak_gib"], 3),
                  lora_to_full_step_time=round(figures["lora_seconds_per_step"]
                                               / figures["full_seconds_per_step"], 3))


if __name__ == "__main__":
    main()
