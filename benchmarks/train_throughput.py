"""Training tokens/s and model-FLOPs utilisation for nanoGPT's baby shape and a larger one.

    python benchmarks/train_throughput.py --data ../shared/data/tinyshakespeare.txt

Runs the library's own compiled multi-step chunk (the code train.py runs) on all CPU cores.
With PyTorch installed (`pip install torch==2.13.0`), also trains a nanoGPT-style PyTorch
model of each shape in the same run and prints our speed over its speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = {  # name: (layers, heads, d_model, seq_len, batch_size)
    "baby": (4, 4, 128, 64, 12),
    "large": (6, 6, 384, 256, 16),
}


def measure(text: str, layers: int, heads: int, d_model: int, seq_len: int, batch: int,
            seconds: float) -> tuple[float, float]:
    """(tokens/s, FLOPs/token) of steady-state training at this shape."""
    import jax

    from transformer_jax import data, parallel, training
    from transformer_jax.config import Config
    from transformer_jax.model import Transformer, flops_per_token, init_params
    from transformer_jax.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(text)
    config = Config().replace(vocab_size=tok.vocab_size, d_model=d_model, layers=layers,
                              heads=heads, d_ff=4 * d_model, max_len=seq_len, seq_len=seq_len,
                              batch_size=batch, steps=1, steps_per_call=20, lr=1e-3)
    mesh = parallel.data_mesh()
    batches = data.train_batches(tok, text, config.train, row_multiple=mesh.devices.size)
    model = Transformer(config.model)
    tx = training.optimizer(config.train, mesh)
    chunk = training.compile_train_chunk(mesh, training.lm_loss(model, tok.pad_id), tx,
                                         batches.row_len)
    # Inputs laid out as train.py lays them out (run.fit): arrays the chunk would otherwise
    # re-lay out on every call, which halved the measured speed.
    replicated = parallel.replicated(mesh)
    state = training.fresh_state(init_params(config.model, jax.random.PRNGKey(0)), config.train,
                            mesh)
    source = parallel.place(batches.source, replicated)
    starts = lambda step: parallel.place(batches.starts(step, k), parallel.split_batches(mesh))
    k = config.train.steps_per_call
    state, out = chunk(state, source, starts(0), None)  # compile + warm up
    jax.block_until_ready(out)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 2 * k:
        state, out = chunk(state, source, starts(steps), None)
        jax.block_until_ready(out)
        steps += k
    elapsed = time.perf_counter() - t0
    return steps * batch * seq_len / elapsed, flops_per_token(config.model, seq_len)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per shape")
    p.add_argument("--cpu-devices", type=int, default=None, help="default: one per core")
    args = p.parse_args()
    devices = common.use_cpu_cores(args.cpu_devices)
    text = Path(args.data).read_text(encoding="utf-8")
    try:
        import torch_reference
    except ImportError:
        torch_reference = None
        print("PyTorch not installed: no same-run reference (pip install torch==2.13.0)")
    peak = common.matmul_peak()
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {devices} CPU devices")
    figures = {}
    for name, shape in SHAPES.items():
        tok_s, flops = measure(text, *shape, seconds=args.seconds)
        figures[f"tokens_per_s_{name}"] = round(tok_s)
        figures[f"mfu_{name}"] = tok_s * flops / peak
        print(f"{name}: {tok_s:,.0f} tokens/s, {tok_s * flops / 1e9:.1f} GFLOP/s", flush=True)
        if torch_reference is not None:
            from transformer_jax.tokenizer import CharTokenizer

            tok = CharTokenizer.from_text(text)
            ref = torch_reference.tokens_per_second(tok.encode(text), tok.vocab_size, *shape,
                                                    seconds=args.seconds)
            figures[f"torch_tokens_per_s_{name}"] = round(ref)
            figures[f"speedup_vs_torch_{name}"] = tok_s / ref
            print(f"{name}: PyTorch (nanoGPT-style) {ref:,.0f} tokens/s", flush=True)
    figures["peak_gflops"] = peak / 1e9
    common.report(**figures)


if __name__ == "__main__":
    main()
