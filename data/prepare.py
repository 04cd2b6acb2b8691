"""Fetches the default training corpus (Shakespeare) into data/ or the user cache.

Usage: python data/prepare.py [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Let the script run from a checkout without installing the package first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformer_jax.corpus import CorpusDownloadError, prepare_default_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None,
        help="where to write the corpus (default: data/ in a checkout, else the user cache)",
    )
    args = parser.parse_args(argv)
    try:
        path = prepare_default_corpus(args.out)
    except CorpusDownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_chars = len(path.read_text(encoding="utf-8"))
    print(f"{path}: {n_chars:,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
