"""Corpus encoding speed (MB/s, both tokenizers) and peak memory while training on a corpus
larger than one would like to hold in memory.

    python benchmarks/encode.py --data ../shared/data/tinyshakespeare.txt --size-mb 1000

Repeats `--data` to `--size-mb` megabytes in a temporary file (and to `--bpe-size-mb` for the
slower BPE). Then, each in a fresh process with an empty cache: for `--tokenizer char` and
`bpe`, what training does before its first step (`Corpus.scan`, the vocabulary: characters, or
a BPE trained on the training split, and the token file `tokens.token_ids` writes), timed by
phase; and `train.py --preset fast` (which writes its own token file: its split differs) for
`--steps` steps on the large corpus, whose peak resident memory is divided by the corpus's
size: the first time (the token file written, every program compiled: `train_peak_cold_ratio`)
and again (the token file and the compiled programs reused: `train_peak_ratio`). The same
training on a 1 MB corpus, after those, gives the memory a process needs without any corpus
(JAX, the model, the programs loaded), printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def peak_bytes(who=resource.RUSAGE_SELF) -> int:
    """Peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(who).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(path: str, tokenizer: str, vocab_size: int) -> None:
    """Print, as JSON, the seconds of each phase of encoding `path` into its token file, and
    this process's peak resident set size."""
    from transformer_jax import tokens
    from transformer_jax.bpe import TrainedBPE
    from transformer_jax.tokenizer import CharTokenizer, free_specials
    from transformer_jax.tokens import Corpus

    t0 = time.perf_counter()
    corpus = Corpus.scan(path)
    t1 = time.perf_counter()
    specials = free_specials(corpus.charset)
    tok = (CharTokenizer.from_text(corpus.charset, specials) if tokenizer == "char" else
           TrainedBPE.train(corpus.pieces(0, corpus.split(0.1)), vocab_size, specials))
    t2 = time.perf_counter()
    train, val = tokens.token_ids(corpus, tok, 0.1, say=lambda *a: None)
    t3 = time.perf_counter()
    print(json.dumps({"scan": t1 - t0, "vocabulary": t2 - t1, "encode": t3 - t2,
                      "tokens": len(train) + len(val), "dtype": str(train.dtype),
                      "peak_bytes": peak_bytes()}))


def fresh(args: list[str], env: dict) -> dict:
    """Run this script's `measure` in a new process; its JSON line."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def train_peak(corpus: Path, steps: int, val_fraction: float, env: dict, run_dir: Path) -> int:
    """Peak resident set size of `train.py --preset fast` for `steps` steps on `corpus`."""
    cmd = [sys.executable, "-c", "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
           "sys.argv[0] = 'train.py'\ntry:\n    runpy.run_path('train.py', run_name='__main__')\n"
           "finally:\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
           "train.py", "--preset", "fast", "--data", str(corpus), "--run-dir", str(run_dir),
           "--steps", str(steps), "--eval-every", str(steps), "--val-fraction", str(val_fraction),
           "--eval-batches", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"error: train.py failed on {corpus}:\n{proc.stdout}\n{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")][-1]
    if "on the host" not in proc.stdout and corpus.stat().st_size > 1 << 28:
        raise SystemExit("error: a large corpus was placed on the devices")
    return int(line.split()[1]) * (1 if sys.platform == "darwin" else 1024)


def write_corpus(seed: bytes, size: int, path: Path) -> None:
    """`seed` repeated to `size` bytes, ending in a newline (piece by piece: a child's peak
    resident set starts from this process's)."""
    with path.open("wb") as f:
        for start in range(0, size - 1, len(seed)):
            f.write(seed[:size - 1 - start])
        f.write(b"\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ASCII text repeated to make the corpus")
    p.add_argument("--size-mb", type=float, default=1000, help="corpus size in MB (10^6 bytes)")
    p.add_argument("--bpe-size-mb", type=float, default=100,
                   help="corpus size in MB for the BPE's timing (at most --size-mb)")
    p.add_argument("--vocab-size", type=int, default=1024, help="--tokenizer bpe's vocabulary")
    p.add_argument("--steps", type=int, default=200, help="training steps for the memory figure")
    p.add_argument("--val-fraction", type=float, default=0.001,
                   help="train.py --val-fraction for the memory figure: its whole validation "
                   "split is evaluated at the end (10%% of a gigabyte, 100 M tokens, would take "
                   "this CPU a quarter of an hour)")
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # a child: path, kind, vocab
    args = p.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1], int(args.measure[2]))
        return
    if not args.data or not Path(args.data).is_file():
        p.error("--data FILE (an ASCII text) is required")
    seed = Path(args.data).read_bytes()
    if not seed.isascii():
        p.error(f"--data {args.data} is not ASCII")
    size, figures = int(args.size_mb * 1e6), {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, small = tmp / "corpus.txt", tmp / "small.txt"
        bpe_size = int(min(args.bpe_size_mb, args.size_mb) * 1e6)
        for path, n in ((corpus, size), (tmp / "bpe.txt", bpe_size), (small, 1_000_000)):
            write_corpus(seed, n, path)
        for kind, path, n in (("char", corpus, size), ("bpe", tmp / "bpe.txt", bpe_size)):
            env = {**os.environ, "XDG_CACHE_HOME": str(tmp / f"cache-{kind}")}
            got = fresh(["--measure", str(path), kind, str(args.vocab_size)], env)
            mb = n / 1e6
            print(f"{kind}: {mb:,.0f} MB read in {got['scan']:.1f} s, vocabulary "
                  f"{got['vocabulary']:.1f} s, encoded into a token file in {got['encode']:.1f} s"
                  f" ({got['tokens']:,} {got['dtype']} ids); peak memory "
                  f"{got['peak_bytes'] / 1e6:,.0f} MB", flush=True)
            figures[f"{kind}_encode_mb_per_s"] = mb / got["encode"]
            figures[f"{kind}_scan_mb_per_s"] = mb / got["scan"]
            figures[f"{kind}_encode_peak_ratio"] = got["peak_bytes"] / n
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache-train"),
               "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla")}
        t = time.perf_counter()
        train = lambda path, run: train_peak(path, args.steps, args.val_fraction, env, tmp / run)
        cold = train(corpus, "run-cold")
        seconds = time.perf_counter() - t
        big = train(corpus, "run-big")
        train(small, "run-small-compiles")  # its rows are on the devices: other programs
        base = train(small, "run-small")
    print(f"train.py --preset fast, {args.steps} steps on the {size / 1e6:,.0f} MB corpus: "
          f"peak memory {cold / 1e6:,.0f} MB the first time (its token file written, every "
          f"program compiled) in {seconds:.0f} s, {big / 1e6:,.0f} MB when run again; on a 1 MB "
          f"corpus {base / 1e6:,.0f} MB")
    common.report(**figures, train_peak_ratio=big / size, train_peak_cold_ratio=cold / size,
                  train_peak_above_small_ratio=(big - base) / size, size_mb=round(size / 1e6))


if __name__ == "__main__":
    main()
