"""Corpus reading and encoding: MB/s and peak memory on a large ASCII corpus.

    python benchmarks/encode.py --data ../shared/data/tinyshakespeare.txt --size-mb 200

Repeats `--data` to `--size-mb` megabytes in a temporary file, then, in a fresh process, runs
what train.py runs on a corpus: `data.read_text`, `CharTokenizer.from_text` and `encode`. The
peak memory is that process's peak resident set size less the peak of a process that only
imports the same modules, as a multiple of the file's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(path: str | None) -> None:
    """Print, as JSON, the seconds each stage takes on `path` (nothing: only import) and this
    process's peak resident set size."""
    from transformer_jax import data
    from transformer_jax.tokenizer import CharTokenizer

    seconds = {}
    if path:
        t0 = time.perf_counter()
        text = data.read_text(path)
        t1 = time.perf_counter()
        tokenizer = CharTokenizer.from_text(text)
        t2 = time.perf_counter()
        ids = tokenizer.encode(text)
        t3 = time.perf_counter()
        assert len(ids) == len(text)
        seconds = {"read": t1 - t0, "vocabulary": t2 - t1, "encode": t3 - t2,
                   "dtype": str(ids.dtype)}
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    print(json.dumps({**seconds, "peak_bytes": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * scale}))


def in_fresh_process(path: str | None) -> dict:
    args = [sys.executable, __file__, "--measure", path or ""]
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ASCII text repeated to make the corpus")
    p.add_argument("--size-mb", type=float, default=200, help="corpus size in MB (10^6 bytes)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child process's corpus
    args = p.parse_args()
    if args.measure is not None:
        measure(args.measure)
        return
    if not args.data:
        p.error("--data is required")
    seed = Path(args.data).read_bytes()
    if not seed.isascii():
        p.error(f"--data {args.data} is not ASCII")
    size = int(args.size_mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        # Piece by piece: a child's peak RSS starts from this process's (vfork), so keep it
        # small. Like most text files the corpus ends with a newline.
        with corpus.open("wb") as f:
            for start in range(0, size - 1, len(seed)):
                f.write(seed[:size - 1 - start])
            f.write(b"\n")
        baseline = in_fresh_process(None)
        run = in_fresh_process(str(corpus))
    total = run["read"] + run["vocabulary"] + run["encode"]
    mb = size / 1e6
    print(f"{mb:,.0f} MB ASCII corpus: read {run['read']:.2f} s, vocabulary "
          f"{run['vocabulary']:.2f} s, encode {run['encode']:.2f} s; peak memory "
          f"{(run['peak_bytes'] - baseline['peak_bytes']) / 1e6:,.0f} MB above a process that "
          f"only imports ({baseline['peak_bytes'] / 1e6:,.0f} MB)")
    common.report(encode_mb_per_s=mb / total, encode_only_mb_per_s=mb / run["encode"],
                  peak_rss_ratio=(run["peak_bytes"] - baseline["peak_bytes"]) / size,
                  dtype=run["dtype"], size_mb=round(mb))


if __name__ == "__main__":
    main()
