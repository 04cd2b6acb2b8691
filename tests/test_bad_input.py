"""Bad input to train.py beyond tests/test_cli.py: corpora, config files, flags and run
directories. Each must end in exit code 2 and a single `error: ...` line on stderr that names
what to fix, never a traceback; a harmless oddity (one repeated character, a run directory
whose parents do not exist yet) must train.

The command line runs in this process (`cli.train_main`), much faster than a subprocess. The
number of XLA CPU devices can only be set before JAX starts, once per process, so these tests
leave it as it is (`use_cpu_devices` does nothing) and train on this process's devices.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from transformer_jax import cli, parallel

TINY = ["--preset", "fast", "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32",
        "--seq-len", "16", "--max-len", "16", "--batch-size", "4", "--steps", "2",
        "--eval-every", "2"]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 10


@pytest.fixture(autouse=True)
def _keep_devices(monkeypatch):
    monkeypatch.setattr(parallel, "use_cpu_devices", lambda n: None)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def train(*argv) -> int:
    """Exit code of `train.py argv` run in this process (0 when it returns)."""
    try:
        cli.train_main([*TINY, *map(str, argv)])
    except SystemExit as e:
        return e.code
    return 0


def assert_user_error(capsys, code: int, *needles) -> str:
    """Exit code 2 and exactly one stderr line, `error: ...`, mentioning every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# --- corpora -----------------------------------------------------------------------------------


@pytest.mark.parametrize("files, needles", [
    pytest.param({"c.txt": b"To be\0or not"}, ["c.txt", "binary"], id="binary"),
    pytest.param({"c.txt": b" \n\t\n  \n"}, ["empty"], id="whitespace-only"),
    pytest.param({"c.txt": b"To be, or not to be, caf\xc3"}, ["c.txt", "UTF-8"],
                 id="cut-mid-character"),
    pytest.param({"a.txt": TEXT.encode(), "b.txt": b"caf\xe9"}, ["b.txt", "UTF-8"],
                 id="directory-with-one-latin-1-file"),
    pytest.param({"notes.md": TEXT.encode()}, ["no .txt files"], id="directory-without-txt"),
])
def test_bad_corpus(tmp_path, capsys, files, needles):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    data = folder / "c.txt" if list(files) == ["c.txt"] else folder
    code = train("--data", data, "--run-dir", tmp_path / "run")
    assert_user_error(capsys, code, *needles)
    assert not (tmp_path / "run").exists()


def test_a_corpus_of_one_repeated_character_trains(tmp_path, capsys):
    """A degenerate corpus is still text: the vocabulary is that character and the four
    specials, and the loss is finite."""
    from transformer_jax.run import load_for_sampling

    data, run_dir = tmp_path / "a.txt", tmp_path / "run"
    data.write_text("a" * 2000, encoding="utf-8")
    assert train("--data", data, "--run-dir", run_dir) == 0, capsys.readouterr().err
    trained = load_for_sampling(run_dir)
    tokenizer, step = trained.tokenizer, trained.step
    assert step == 2 and tokenizer.chars == ("a",)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["val_loss"])


# --- config files ------------------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    pytest.param(b"", "not valid JSON", id="empty"),
    pytest.param(b'{"layers": null}', "'layers'", id="null-for-an-int"),
    pytest.param(b'{"activation": "tanh"}', "activation", id="unknown-choice"),
    pytest.param(b'{"d_model": -8}', "d_model=-8", id="negative-size"),
    pytest.param(b'{"d_model": 32, "heads": 3}', "heads=3", id="heads-not-dividing-d-model"),
    pytest.param(b'{"lr": "caf\xe9"}', "cannot read it", id="not-utf8"),
])
def test_bad_config_file(tmp_path, capsys, content, needle):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    assert_user_error(capsys, train("--config", path, "--run-dir", tmp_path / "run"), needle)


def test_a_directory_as_config_file(tmp_path, capsys):
    assert_user_error(capsys, train("--config", tmp_path, "--run-dir", tmp_path / "run"),
                      tmp_path, "cannot read it")


# --- flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [
    ("--d-model", 0), ("--layers", -1), ("--heads", 0), ("--d-ff", -64), ("--max-len", 0),
    ("--seq-len", 0), ("--batch-size", 0), ("--steps", -3), ("--lr", -1e-3),
    ("--dropout", 1.5), ("--keep", 0), ("--save-every", 0), ("--eval-every", 0),
    ("--steps-per-call", 0), ("--layer-norm-eps", 0), ("--val-fraction", 1.0),
])
def test_a_size_or_rate_out_of_range_names_its_flag(tmp_path, capsys, corpus, flag, value):
    code = train("--data", corpus, "--run-dir", tmp_path / "run", flag, value)
    line = assert_user_error(capsys, code, f"{flag[2:].replace('-', '_')}={value}")
    assert line.startswith(f"error: {flag}:"), line


def test_zero_steps(tmp_path, capsys, corpus):
    code = train("--data", corpus, "--run-dir", tmp_path / "run", "--steps", 0)
    assert_user_error(capsys, code, "--steps")


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_seq_len_over_max_len(tmp_path, capsys, corpus, positions):
    code = train("--data", corpus, "--run-dir", tmp_path / "run", "--positions", positions,
                 "--seq-len", 64)
    assert_user_error(capsys, code, "--seq-len 64", "--max-len 16")


# --- run directories ---------------------------------------------------------------------------


def test_a_run_directory_whose_parents_do_not_exist_is_created(tmp_path, capsys, corpus):
    run_dir = tmp_path / "a" / "b" / "run"
    assert train("--data", corpus, "--run-dir", run_dir) == 0, capsys.readouterr().err
    assert (run_dir / "checkpoints" / "2").is_dir()


def _unwritable(tmp_path: Path, existing: bool) -> Path:
    """A run directory this process cannot write in (`existing`) or create. Permissions do not
    stop root, so root gets one in sysfs, which refuses new files and directories to all."""
    if os.geteuid() != 0:
        parent = tmp_path / "read-only"
        (parent / "run").mkdir(parents=True)
        parent.chmod(0o555)
        (parent / "run").chmod(0o555)
        return parent / "run" if existing else parent / "new"
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no directory refuses writes")
    return Path("/sys/kernel") if existing else Path("/sys/kernel/transformer-jax-run")


@pytest.mark.parametrize("existing", [True, False], ids=["existing", "to-be-created"])
def test_an_unwritable_run_directory(tmp_path, capsys, corpus, existing):
    run_dir = _unwritable(tmp_path, existing)
    try:
        code = train("--data", corpus, "--run-dir", run_dir)
    finally:
        for path in (tmp_path / "read-only", tmp_path / "read-only" / "run"):
            if path.exists():
                path.chmod(0o755)
    assert_user_error(capsys, code, run_dir, "not writable")


def test_a_file_as_run_directory(tmp_path, capsys, corpus):
    path = tmp_path / "run"
    path.write_text("not a directory")
    assert_user_error(capsys, train("--data", corpus, "--run-dir", path), path)
    assert path.read_text() == "not a directory"


def test_a_file_as_checkpoints_directory(tmp_path, capsys, corpus):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("mine")
    code = train("--data", corpus, "--run-dir", tmp_path / "run")
    assert_user_error(capsys, code, tmp_path / "run" / "checkpoints", "is a file")


@pytest.mark.parametrize("files, needles", [
    pytest.param({"model.pt": "weights"}, ["did not write", "model.pt"], id="other-files"),
    pytest.param({"1/model.pt": "weights"}, ["step 1"], id="numbered-directory"),
])
def test_another_programs_checkpoints_are_refused_and_left_alone(tmp_path, capsys, corpus,
                                                                files, needles):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for name, content in files.items():
        (ckpt_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / name).write_text(content)
    code = train("--data", corpus, "--run-dir", tmp_path / "run")
    assert_user_error(capsys, code, *needles)
    assert sorted(p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob("*")
                  if p.is_file()) == sorted(files)


def test_an_orbax_checkpoint_of_another_program_is_refused(tmp_path, capsys, corpus):
    """Same layout as ours (a `state` and a `meta` item), but not our metadata."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    theirs = ocp.CheckpointManager(tmp_path.absolute() / "run" / "checkpoints",
                                   item_names=("state", "meta"))
    theirs.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)}),
                                           meta=ocp.args.JsonSave({"project": "other"})))
    theirs.wait_until_finished()
    theirs.close()
    code = train("--data", corpus, "--run-dir", tmp_path / "run")
    assert_user_error(capsys, code, "step 7", "not a transformer-jax checkpoint")


@pytest.mark.parametrize("argv", [["--d-model", "abc"], ["--no-such-flag"], ["--cpu-devices", "0"]],
                         ids=["not-an-int", "unknown-flag", "zero-devices"])
def test_unparsable_flags_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.train_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
