"""Evaluation speed beside training speed for the same model, and memory on a long file.

    python benchmarks/evaluate.py --data ../shared/data/tinyshakespeare.txt

1. The `default` preset's shape (4 layers, d 128, 256-token windows, batches of 16), random
   weights: training tokens/s (the compiled multi-step chunk train.py runs) and evaluation
   tokens/s (`evaluate.evaluate_text`, what evaluate.py runs: no backward pass), measured in
   the same run; their ratio should be at least 2.
2. A small model judges a file of --memory-mb MB (the corpus repeated, written to a temporary
   directory) and one of a tenth of that: the peak resident memory of the process during
   each. Streaming keeps them equal (ratio near 1) and far below the file's size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_throughput  # noqa: E402

DEFAULT_SHAPE = (4, 4, 128, 256, 16)  # layers, heads, d_model, seq_len, batch_size


def _trained(text: str, layers: int, heads: int, d_model: int, seq_len: int, batch: int):
    import jax

    from transformer_jax import tasks
    from transformer_jax.config import Config
    from transformer_jax.model import init_params
    from transformer_jax.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(text)
    config = Config().replace(vocab_size=tok.vocab_size, d_model=d_model, layers=layers,
                              heads=heads, d_ff=4 * d_model, max_len=seq_len, seq_len=seq_len,
                              batch_size=batch)
    params = init_params(config.model, jax.random.PRNGKey(0))
    return tasks.Trained(tasks.KINDS["char"], config, params, 0, tokenizer=tok)


def _judge(trained, pieces, *, page_tokens: int = 0):
    from transformer_jax import evaluate, parallel

    return evaluate.evaluate_text(trained, [pieces], evaluate.windows_for(trained),
                                  mesh=parallel.data_mesh(),
                                  batch_size=trained.config.train.batch_size,
                                  page_tokens=page_tokens, quiet=True)[0]


def evaluation_tokens_per_s(text: str, seconds: float) -> float:
    """Steady-state evaluation tokens/s of the default shape on `text`, repeated as needed."""
    trained = _trained(text, *DEFAULT_SHAPE)
    _judge(trained, [text[:50_000]])  # compile
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += _judge(trained, [text[:400_000]]).tokens
    return done / (time.perf_counter() - t0)


class _PeakMemory:
    """The peak resident set size of this process while in the `with` block, sampled."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    """Resident bytes of this process (Linux)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_on_long_files(text: str, megabytes: int) -> dict:
    """Peak resident memory judging a file of `megabytes` MB and of a tenth of it."""
    from transformer_jax import data

    trained = _trained(text, 1, 2, 32, 64, 64)
    _judge(trained, [text[:20_000]])  # compile before measuring
    figures = {"rss_before_mb": _rss() / 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("tenth", megabytes * 100_000), ("full", megabytes * 1_000_000)):
            path = Path(tmp) / f"{label}.txt"
            with open(path, "w", encoding="utf-8") as f:
                written = 0
                while written < size:
                    f.write(text)
                    written += len(text)
            t0 = time.perf_counter()
            with _PeakMemory() as peak:
                report = _judge(trained, data.iter_text(path))
            seconds = time.perf_counter() - t0
            figures[f"{label}_file_mb"] = path.stat().st_size / 1e6
            figures[f"{label}_peak_rss_mb"] = peak.peak / 1e6
            figures[f"{label}_tokens_per_s"] = report.tokens / seconds
            print(f"{path.stat().st_size / 1e6:,.0f} MB file: {report.tokens:,} tokens in "
                  f"{seconds:.0f} s, peak resident memory {peak.peak / 1e6:,.0f} MB",
                  flush=True)
            path.unlink()
    figures["peak_ratio_full_over_tenth"] = figures["full_peak_rss_mb"] / figures[
        "tenth_peak_rss_mb"]
    figures["peak_growth_over_file"] = (figures["full_peak_rss_mb"] - figures[
        "rss_before_mb"]) / figures["full_file_mb"]
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text corpus (tinyshakespeare)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per speed")
    p.add_argument("--memory-mb", type=int, default=100, help="size of the long file (0: skip)")
    p.add_argument("--cpu-devices", type=int, default=None, help="default: one per core")
    args = p.parse_args()
    devices = common.use_cpu_cores(args.cpu_devices)
    text = Path(args.data).read_text(encoding="utf-8")
    train_tok_s, _ = train_throughput.measure(text, *DEFAULT_SHAPE, seconds=args.seconds)
    print(f"training: {train_tok_s:,.0f} tokens/s on {devices} CPU devices", flush=True)
    eval_tok_s = evaluation_tokens_per_s(text, args.seconds)
    print(f"evaluation: {eval_tok_s:,.0f} tokens/s", flush=True)
    figures = {"train_tokens_per_s": round(train_tok_s), "eval_tokens_per_s": round(eval_tok_s),
               "eval_over_train": eval_tok_s / train_tok_s}
    if args.memory_mb:
        figures.update(memory_on_long_files(text, args.memory_mb))
    common.report(**figures)


if __name__ == "__main__":
    main()
