"""Sampling speed: streamed chunks versus one call, and the key/value cache versus recomputing
the whole context for every token; with --memory, sample.py's peak memory against the length.

    python benchmarks/sampling.py --data ../shared/data/tinyshakespeare.txt [--memory]

Every decoder runs the `default` preset's model (context 256, random weights: speed does not
depend on them), from a 1-token prompt to 1,000 new tokens, so the window slides several
times. `cache` is one compiled call for the whole continuation (what sample.py did before it
streamed); `stream` is sample.py's decoder as it is, compiled chunks of steps in a host loop,
the tokens of each chunk brought to the host; `stream_cost` is the share of throughput that
streaming costs (target <= 0.10). Recompute is what the lecture and nanoGPT do: a full forward
pass over the last `max_len` tokens per new token.

--memory trains a one-step `default` run and prints sample.py's peak resident memory for
1,000 and for --memory-tokens (1,000,000) new tokens, and their ratio.

--latency trains a one-step `default` run (the shape is what counts: 4 layers, 4 heads, d 128,
context 256) and times whole processes of `sample.py --max-new-tokens 500` from launch to exit,
with an empty compilation cache (`cold`) and then with the one that run left (`warm`, as a
user's later calls find it); with PyTorch installed, also nanoGPT's sampling loop on a model of
the same shape (`torch_reference.py sample`), whole process too. `latency_ratio` is the
reference's seconds over our warm seconds (target >= 1: no slower). Each is the median of
--repeats processes.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


@functools.partial(jax.jit, static_argnames=("model", "n"))
def recompute(params, window_1xW, length, *, model, n):
    """Greedy tokens by full forward passes over a sliding window of the last W tokens."""
    W = window_1xW.shape[1]

    def body(carry, _):
        window, length = carry
        logits = model.apply({"params": params}, window)[0, length - 1]
        token = jnp.argmax(logits).astype(jnp.int32)
        full = length >= W
        window = jnp.where(full, jnp.roll(window, -1, axis=1), window)
        at = jnp.where(full, W - 1, length)
        window = jax.lax.dynamic_update_slice(window, token[None, None], (0, at))
        return (window, jnp.minimum(length + 1, W)), token

    return jax.lax.scan(body, (window_1xW, length), None, length=n)[1]


def train_one_step(data: str, run_dir: Path) -> None:
    """A `default` preset run of one step: a checkpoint of that shape for sample.py."""
    subprocess.run([sys.executable, str(REPO / "train.py"), "--data", data, "--run-dir",
                    str(run_dir), "--steps", "1", "--eval-every", "1", "--eval-batches", "1"],
                   stdout=subprocess.DEVNULL, check=True)


def process_seconds(cmd: list[str], env: dict) -> float:
    """Wall time of one whole process, launch to exit."""
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - t0


def latency(data: str, tokens: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, cache = Path(tmp) / "run", Path(tmp) / "xla"
        train_one_step(data, run_dir)
        ours = [sys.executable, str(REPO / "sample.py"), "--run-dir", str(run_dir),
                "--max-new-tokens", str(tokens), "--ignore-eos"]
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
        cold = []
        for _ in range(repeats):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(process_seconds(ours, env))
        warm = [process_seconds(ours, env) for _ in range(repeats)]
    figures = {"cold_seconds": statistics.median(cold), "warm_seconds": statistics.median(warm)}
    if importlib.util.find_spec("torch") is not None:
        reference = [sys.executable, str(REPO / "benchmarks" / "torch_reference.py"), "sample",
                     "--data", data, "--tokens", str(tokens)]
        ref = [process_seconds(reference, env) for _ in range(repeats)]
        figures["reference_seconds"] = statistics.median(ref)
        figures["latency_ratio"] = figures["reference_seconds"] / figures["warm_seconds"]
    print(f"sample.py --max-new-tokens {tokens}, default preset's shape, whole process "
          f"(median of {repeats})")
    common.report(**{k: round(v, 3) for k, v in figures.items()})


_PEAK_RSS = """
import resource, sys
from transformer_jax.cli import sample_main
sample_main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def peak_rss_mb(run_dir: Path, tokens: int) -> float:
    """sample.py's peak resident memory (MB) for `tokens` new tokens, its text thrown away."""
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, "--run-dir", str(run_dir),
                           "--max-new-tokens", str(tokens), "--ignore-eos"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return int(proc.stderr.split()[-1]) / 1024


def memory(data: str, tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        train_one_step(data, run_dir)
        short, long = peak_rss_mb(run_dir, 1000), peak_rss_mb(run_dir, tokens)
    print(f"sample.py, default preset run: peak RSS for 1,000 and {tokens:,} new tokens")
    common.report(peak_rss_mb_1000=round(short), peak_rss_mb_long=round(long),
                  memory_ratio=long / short)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (sets the vocabulary)")
    p.add_argument("--new-tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="measure sample.py's peak memory")
    p.add_argument("--memory-tokens", type=int, default=1_000_000)
    p.add_argument("--latency", action="store_true",
                   help="time whole sample.py processes of --latency-tokens new tokens "
                   "(against nanoGPT's loop where PyTorch is installed)")
    p.add_argument("--latency-tokens", type=int, default=500)
    args = p.parse_args()
    if args.memory:
        memory(args.data, args.memory_tokens)
        return
    if args.latency:
        latency(args.data, args.latency_tokens, args.repeats)
        return
    from transformer_jax import config as config_lib
    from transformer_jax.model import Transformer, init_params
    from transformer_jax.sampling import FREE, Decoder
    from transformer_jax.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(Path(args.data).read_text(encoding="utf-8"))
    cfg = config_lib.preset("default").replace(vocab_size=tok.vocab_size).model
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    n, prompt = args.new_tokens, [tok.start_id]

    best = lambda fn: common.best_seconds(fn, args.repeats)

    def decode(**chunks) -> int:
        """Tokens brought to the host by a decoder of these chunk settings, greedy."""
        decoder = Decoder(model, params, rows=1, **chunks)
        decoder.place([0], prompt, jax.random.split(jax.random.PRNGKey(0), 1),
                      max_new_tokens=n, temperature=0.0)
        count = 0
        while decoder.left.any():
            count += int((decoder.advance() != FREE).sum())
        assert count == n
        return count

    cached = best(lambda: decode(max_chunk=n, chunk_seconds=None))
    streamed = best(lambda: decode())
    window = jnp.zeros((1, cfg.max_len), jnp.int32).at[0, 0].set(tok.start_id)
    full = best(lambda: recompute(params, window, jnp.int32(1), model=model,
                                  n=n).block_until_ready())
    print(f"default preset: context {cfg.max_len}, {n} new tokens, batch 1, greedy")
    common.report(stream_tokens_per_s=round(n / streamed), cache_tokens_per_s=round(n / cached),
                  stream_cost=1 - cached / streamed, recompute_tokens_per_s=round(n / full),
                  cache_speedup=full / cached)


if __name__ == "__main__":
    main()
