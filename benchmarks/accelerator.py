"""Accelerator benchmark: training tokens/s, step time and model-FLOPs utilisation of GPT-2
small's shape and the core's large shape in float32 and bfloat16, then GPT-2 sampling speed.

    python benchmarks/accelerator.py            # on a GPU, one go
    python benchmarks/accelerator.py --small    # everything tiny: a smoke run on a CPU

Training runs the library's compiled multi-step chunk (the code train.py runs) on all of
`jax.devices()`, from random weights on random tokens generated on the device: one call of
--steps steps compiles and warms up, then the faster of two timed calls of --steps steps
counts. MFU is model FLOPs (`flops_per_token`) per second over the rate of a large matmul in
the same dtype, measured in the same run with JAX's default matmul precision, as training
uses. Sampling is `benchmarks/gpt2.py`'s measurement of a random GPT-2 small in the first of
--dtypes. A part that fails (out of memory, say) is reported and the run goes on.

Target: GPT-2 small's shape in bfloat16 at MFU >= 0.50 (`MFU_TARGET`) on an NVIDIA GPU; the
last line says whether it is met (`gpt2_small_bfloat16_mfu_met`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gpt2  # noqa: E402
from train_throughput import SHAPES as CORE_SHAPES  # noqa: E402

from transformer_jax import parallel, training  # noqa: E402
from transformer_jax.config import TrainConfig, TransformerConfig  # noqa: E402
from transformer_jax.model import Transformer, flops_per_token, init_params  # noqa: E402

CORE_VOCAB = 65  # tinyshakespeare's characters
DTYPES = ("float32", "bfloat16")
MFU_TARGET = 0.50  # GPT-2 small's shape, bfloat16


def shapes(small: bool) -> dict[str, tuple[TransformerConfig, int]]:
    """name: (model, training sequence length), each `shrink`-ed with `small`."""
    layers, heads, d_model, seq_len, _ = CORE_SHAPES["large"]
    gpt2_small = gpt2.random_init_config("gpt2-small")
    found = {
        "gpt2_small": (gpt2_small, gpt2_small.max_len),
        "core_large": (TransformerConfig(vocab_size=CORE_VOCAB, d_model=d_model, layers=layers,
                                         heads=heads, d_ff=4 * d_model, max_len=seq_len),
                       seq_len),
    }
    return {name: shrink(*shape) for name, shape in found.items()} if small else found


def shrink(config: TransformerConfig, seq_len: int) -> tuple[TransformerConfig, int]:
    """The same kind of model, tiny: 2 layers, width 32, context and vocabulary capped."""
    config = dataclasses.replace(config, layers=2, heads=4, d_model=32, d_ff=128,
                                 max_len=min(config.max_len, 64),
                                 vocab_size=min(config.vocab_size, 512))
    return config, min(seq_len, config.max_len)


def train_speed(config: TransformerConfig, seq_len: int, batch: int, steps: int
                ) -> tuple[float, float]:
    """(tokens/s, seconds/step) of steady-state training."""
    train = TrainConfig(seq_len=seq_len, batch_size=batch)
    pad_id = config.vocab_size  # outside the vocabulary: no random token is padding
    mesh = parallel.data_mesh()
    chunk = training.compile_train_chunk(
        mesh, training.lm_loss(Transformer(config), pad_id), training.optimizer(train, mesh),
        seq_len + 1)
    # Laid out once as train.py lays them out, so that no call re-lays out its inputs.
    replicated = parallel.replicated(mesh)
    state = training.fresh_state(init_params(config, jax.random.PRNGKey(0)), train, mesh)
    data_key, starts_key = jax.random.split(jax.random.PRNGKey(1))
    tokens = steps * batch * (seq_len + 1)
    source = jax.device_put(
        jax.random.randint(data_key, (tokens,), 0, config.vocab_size, jnp.int32), replicated)
    starts = jax.device_put(jax.random.randint(starts_key, (steps, batch), 0,
                                               tokens - seq_len - 1),
                            parallel.split_batches(mesh))

    def one_call():
        nonlocal state
        state, metrics = chunk(state, source, starts, None)
        jax.block_until_ready(metrics)

    seconds = common.best_seconds(one_call, repeats=2) / steps
    return batch * seq_len / seconds, seconds


def attempt(label: str, fn):
    """fn() or, if it raises, None after printing why: one failed part (out of memory, an
    unsupported kernel) must not cost the rest of a one-off run."""
    try:
        return fn()
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:300]
        print(f"{label}: FAILED ({type(e).__name__}: {first})", flush=True)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny models and few steps (CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per call (default 10; 3 "
                   "with --small)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step, every "
                   "shape (default 16; 4 with --small)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    p.add_argument("--remat", action="store_true", help="train with rematerialised blocks")
    p.add_argument("--scan-layers", action="store_true", help="train with scanned blocks")
    args = p.parse_args()
    steps = args.steps or (3 if args.small else 10)
    batch = args.batch_size or (4 if args.small else 16)
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPES):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    matmul_n = 512 if args.small else 8192  # large enough to reach a GPU's peak
    models = shapes(args.small)
    start = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)
    device = jax.devices()[0].device_kind
    say(f"{jax.device_count()} x {device}, JAX {jax.__version__}; batch {batch}, {steps} steps "
        f"per call; remat {args.remat}, scanned layers {args.scan_layers}")
    figures = {"device": device.replace(" ", "_"), "batch_size": batch}
    for dtype in dtypes:
        peak = attempt(f"{dtype} matmul", lambda dtype=dtype: common.matmul_peak(matmul_n, dtype))
        if peak is None:
            continue
        figures[f"peak_tflops_{dtype}"] = peak / 1e12
        say(f"{dtype} matmul peak ({matmul_n}^3): {peak / 1e12:.1f} TFLOP/s")
        for name, (config, seq_len) in models.items():
            config = dataclasses.replace(config, dtype=dtype, remat=args.remat,
                                         scan_layers=args.scan_layers)
            label = f"{name} {dtype} (seq {seq_len})"
            measured = attempt(label, lambda c=config, t=seq_len: train_speed(c, t, batch, steps))
            if measured is None:
                continue
            tokens_per_s, seconds = measured
            mfu = tokens_per_s * flops_per_token(config, seq_len) / peak
            figures.update({f"{name}_{dtype}_tokens_per_s": round(tokens_per_s),
                            f"{name}_{dtype}_step_ms": 1e3 * seconds,
                            f"{name}_{dtype}_mfu": mfu})
            say(f"{label}: {tokens_per_s:,.0f} tokens/s, {1e3 * seconds:.1f} ms/step, "
                f"MFU {mfu:.2f}")
    if "gpt2_small_bfloat16_mfu" in figures:
        met = figures["gpt2_small_bfloat16_mfu"] >= MFU_TARGET
        figures.update(mfu_target=MFU_TARGET, gpt2_small_bfloat16_mfu_met=met)
        say(f"gpt2_small bfloat16 MFU target {MFU_TARGET:.2f}: {'met' if met else 'NOT met'}")
    config = dataclasses.replace(models["gpt2_small"][0], dtype=dtypes[0])
    sampled = attempt("gpt2 sampling", lambda: gpt2.measure(
        Transformer(config), init_params(config, jax.random.PRNGKey(0))))
    if sampled is not None:
        figures.update({f"sample_{k}": round(v) if k.endswith("tokens_per_s") else v
                        for k, v in sampled.items()})
        say(f"gpt2_small {dtypes[0]} sampling, batch 1, {sampled['prompt_tokens']}-token "
            f"prompt: prompt {sampled['prompt_tokens_per_s']:,.0f} tokens/s; new tokens "
            f"{sampled['cache_tokens_per_s']:,.0f}/s with the cache, "
            f"{sampled['recompute_tokens_per_s']:,.0f}/s recomputing")
    common.report(**figures)


if __name__ == "__main__":
    main()
