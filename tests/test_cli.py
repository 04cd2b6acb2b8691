"""End-to-end tests of train.py and sample.py (subprocesses), and of flag precedence.

One tiny run is trained once per module and reused by the sampling tests. Every bad input
must end in exit code 2 and a single `error: ...` line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import option_strings

from transformer_jax import cli, config as config_lib

REPO = Path(__file__).resolve().parents[1]

# --cpu-devices 2 pins the data-parallel split, so batch size 4 divides it on any machine.
TINY = ["--preset", "fast", "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32",
        "--seq-len", "16", "--max-len", "16", "--batch-size", "4", "--cpu-devices", "2"]

CORPUS = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to "
          "suffer the slings and arrows of outrageous fortune, or to take arms against a sea "
          "of troubles and by opposing end them. To die, to sleep; no more.\n") * 8


def run_script(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and exactly one stderr line, `error: ...`, mentioning every needle."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _steps_in(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run_script("train.py", *TINY, "--steps", "20", "--eval-every", "10",
                      "--save-every", "10", "--data", corpus, "--run-dir", run_dir)
    return run_dir, proc


# --- training and sampling end to end --------------------------------------------------------


def test_train_cli_trains_and_reports_parameters_and_checkpoint(trained):
    run_dir, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "parameters:" in proc.stdout
    assert str(run_dir / "checkpoints" / "20") in proc.stdout
    assert _steps_in(run_dir) == [10, 20]
    records = [json.loads(line) for line in
               (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    assert records[-1]["step"] == 20
    for r in records:
        assert r["train_loss"] > 0
    # The config echoed at the start is the resolved one: flags over the fast preset.
    config = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith('{"model"')))
    assert config["model"]["d_model"] == 16 and config["model"]["d_ff"] == 32
    assert config["train"]["lr"] == config_lib.PRESETS["fast"]["lr"]


@pytest.fixture(scope="module")
def sampled(trained) -> subprocess.CompletedProcess:
    return run_script("sample.py", "--run-dir", trained[0], "--prompt", "To be",
                      "--max-new-tokens", "30", "--seed", "1")


def test_sample_cli_prints_the_prompt_and_its_continuation(sampled):
    proc = sampled
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    text = proc.stdout[:-1]  # print's newline
    assert text.startswith("To be")
    assert 5 < len(text) <= 5 + 30
    assert set(text) <= set(CORPUS)


def test_sample_cli_writes_nothing_to_stderr_when_all_is_well(sampled):
    assert sampled.returncode == 0
    assert sampled.stderr == ""


def test_sample_cli_is_deterministic_for_a_seed(trained):
    run_dir, _ = trained
    args = ("--run-dir", run_dir, "--prompt", "To be", "--max-new-tokens", "30")
    first = run_script("sample.py", *args, "--seed", "1", "--num-samples", "2")
    again = run_script("sample.py", *args, "--seed", "1", "--num-samples", "2")
    other = run_script("sample.py", *args, "--seed", "2", "--num-samples", "2")
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout
    assert first.stdout.count("--- sample") == 2


def test_sample_cli_samples_the_checkpoint_of_a_given_step(trained, sampled):
    """The newest step by default; an older one with --step; a step not kept is named with
    those that are."""
    run_dir, _ = trained
    args = ("--run-dir", run_dir, "--prompt", "To be", "--max-new-tokens", "30", "--seed", "1")
    newest, older = (run_script("sample.py", *args, "--step", step) for step in ("20", "10"))
    assert newest.returncode == older.returncode == 0, older.stderr
    assert newest.stdout == sampled.stdout
    assert older.stdout != newest.stdout and older.stdout.startswith("To be")
    assert_user_error(run_script("sample.py", *args, "--step", "15"), "--step", "10, 20")
    assert_user_error(run_script("sample.py", "--model", run_dir, "--step", "10"), "--step",
                      "--model")


def _sample_proc(run_dir, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "sample.py", "--run-dir", str(run_dir), *args],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


def _read_until(stream, wanted: str, timeout: float = 120) -> str:
    """What `stream` gives until `wanted` appears (bounded by `timeout` seconds)."""
    got, deadline = "", time.monotonic() + timeout
    while wanted not in got:
        assert time.monotonic() < deadline, f"no {wanted!r} after {timeout} s: {got!r}"
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            char = stream.read(1)
            assert char, f"the stream ended before {wanted!r}: {got!r}"
            got += char
    return got


def test_sample_cli_streams_text_long_before_it_is_done(trained):
    """A million tokens take minutes; their first ones show within seconds of start-up."""
    proc = _sample_proc(trained[0], "--prompt", "To be", "--max-new-tokens", "1000000",
                        "--ignore-eos")
    try:
        shown = _read_until(proc.stdout, "To be")
        shown += proc.stdout.read(40)
        assert proc.poll() is None and len(shown) >= 45
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_sample_cli_stops_at_a_stop_string_it_does_not_print(trained):
    run_dir, _ = trained
    args = ("--run-dir", run_dir, "--prompt", "To be", "--max-new-tokens", "60", "--seed", "1",
            "--ignore-eos")
    whole = run_script("sample.py", *args).stdout[:-1]
    stop = whole[len("To be") + 10:][:2]
    cut = run_script("sample.py", *args, "--stop", "qqq", "--stop", stop)
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout == whole[:whole.index(stop, len("To be"))] + "\n"


def test_sample_cli_interactive_answers_each_piped_line_as_a_seeded_run(trained):
    """--interactive reads one prompt per line until the input ends; the i-th answer is what
    sample.py prints for that prompt with --seed + i."""
    run_dir, _ = trained
    args = ("--run-dir", run_dir, "--max-new-tokens", "25", "--seed", "4")
    proc = subprocess.run([sys.executable, "sample.py", *map(str, args), "--interactive"],
                          cwd=REPO, input="To be\nthe\n", capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    want = "".join(run_script("sample.py", *args[:-1], str(4 + i), "--prompt", prompt).stdout
                   for i, prompt in enumerate(["To be", "the"]))
    assert proc.stdout == want


def test_sample_cli_interactive_ctrl_c_ends_the_answer_and_the_next_prompt_is_answered(trained):
    proc = _sample_proc(trained[0], "--interactive", "--max-new-tokens", "1000000",
                        "--ignore-eos")
    try:
        proc.stdin.write("To be\nXYZ\n")
        proc.stdin.flush()
        _read_until(proc.stdout, "To be")
        proc.send_signal(signal.SIGINT)
        _read_until(proc.stdout, "\nXYZ")  # the first answer ended, the next one began
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # closes the input: it exits
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_sample_cli_warns_about_an_unseen_prompt_character(trained):
    run_dir, _ = trained
    proc = run_script("sample.py", "--run-dir", run_dir, "--prompt", "To be ☃",
                      "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("To be ☃")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'☃'" in warnings[0], proc.stderr


def test_fresh_restarts_from_step_zero(trained, tmp_path, corpus):
    run_dir = tmp_path / "again"
    shutil.copytree(trained[0], run_dir)
    proc = run_script("train.py", *TINY, "--steps", "10", "--eval-every", "10",
                      "--save-every", "10", "--data", corpus, "--run-dir", run_dir, "--fresh",
                      "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert [name.split(":")[0] for _, name in _phases(proc.stderr)] == [
        "imports", "corpus scanned", "task built", "state initialised",
        "data placed on the devices", "steps 1-10 compiled (or loaded from the compilation "
        "cache) and run", "first evaluation"]
    assert "resuming" not in proc.stdout and "nothing to do" not in proc.stdout
    assert str(run_dir / "checkpoints" / "10") in proc.stdout
    assert _steps_in(run_dir) == [10]  # the old steps 10 and 20 are gone
    records = [json.loads(line) for line in
               (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10]


def _phases(stderr: str) -> list[tuple[float, str]]:
    """The --verbose lines of `stderr` as (seconds since the start, phase), checked: each
    names its own seconds, and the times add up."""
    lines = re.findall(r"^\[ *([\d.]+) s\] (.*) \(\+([\d.]+) s\)$", stderr, re.MULTILINE)
    assert lines, stderr
    times = [float(t) for t, _, _ in lines]
    assert times == sorted(times) and 0 < times[0] < 120
    for (t0, _, _), (t1, _, own) in zip(lines, lines[1:]):
        assert abs(float(t1) - float(t0) - float(own)) <= 0.011
    return [(float(t), name) for t, name, _ in lines]


def test_sample_cli_verbose_times_its_phases_up_to_the_first_new_tokens(trained):
    proc = run_script("sample.py", "--run-dir", trained[0], "--max-new-tokens", "5",
                      "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert [name.split(":")[0] for _, name in _phases(proc.stderr)] == [
        "imports", "model loaded", "first new tokens"]


def test_default_cpu_devices_accept_a_batch_size_the_core_count_does_not_divide(tmp_path,
                                                                               corpus):
    """Without --cpu-devices the batch is split over the cores; a batch size they do not
    divide (cores + 1) must still train instead of failing on this machine's core count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args = list(TINY[:-2])  # no --cpu-devices
    args[args.index("--batch-size") + 1] = str(cores + 1)
    proc = run_script("train.py", *args, "--steps", "2", "--eval-every", "2", "--data", corpus,
                      "--run-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert _steps_in(tmp_path / "run") == [2]


# --- bad input: exit 2, one line ---------------------------------------------------------------


def test_missing_corpus(tmp_path):
    missing = tmp_path / "missing.txt"
    proc = run_script("train.py", *TINY, "--steps", "5", "--data", missing,
                      "--run-dir", tmp_path / "run")
    assert_user_error(proc, str(missing))


@pytest.mark.parametrize("content, needle", [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"caf\xe9 au lait, " * 20, "UTF-8", id="not-utf8"),
    pytest.param(b"To be.", "--seq-len", id="shorter-than-one-sequence"),
])
def test_bad_corpus(tmp_path, content, needle):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    proc = run_script("train.py", *TINY, "--steps", "5", "--data", path,
                      "--run-dir", tmp_path / "run")
    assert_user_error(proc, needle)


def test_corpus_containing_a_special_symbol_gives_no_traceback(tmp_path):
    """The lecture's start/pad symbols α and δ are ordinary letters in Greek text: training
    must either work or end in a one-line error naming them."""
    path = tmp_path / "greek.txt"
    path.write_text("αβγ δέκα λόγοι, and some English too. " * 20, encoding="utf-8")
    proc = run_script("train.py", *TINY, "--steps", "2", "--eval-every", "2", "--data", path,
                      "--run-dir", tmp_path / "run")
    if proc.returncode == 0:
        assert "parameters:" in proc.stdout and "Traceback" not in proc.stderr
    else:
        assert_user_error(proc, "α")


@pytest.mark.parametrize("make_checkpoints_dir", [False, True],
                         ids=["no-run-dir", "empty-checkpoints-dir"])
def test_sample_without_checkpoint(tmp_path, make_checkpoints_dir):
    run_dir = tmp_path / "run"
    if make_checkpoints_dir:  # e.g. training was interrupted before its first save
        (run_dir / "checkpoints").mkdir(parents=True)
    proc = run_script("sample.py", "--run-dir", run_dir, "--prompt", "To be")
    assert_user_error(proc, str(run_dir), "checkpoint")


def test_resume_with_a_contradicting_model_flag(trained, tmp_path, corpus):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained[0], run_dir)
    args = list(TINY)
    args[args.index("--d-model") + 1] = "32"
    proc = run_script("train.py", *args, "--steps", "40", "--data", corpus,
                      "--run-dir", run_dir)
    assert_user_error(proc, "d_model", "16", "32")
    assert _steps_in(run_dir) == [10, 20]


def test_heads_not_dividing_d_model(tmp_path):
    proc = run_script("train.py", *TINY, "--heads", "3", "--run-dir", tmp_path)
    assert_user_error(proc, "heads=3", "d_model=16")


@pytest.mark.parametrize("content, needle", [
    pytest.param('{"d_model": 32,', "not valid JSON", id="malformed"),
    pytest.param('{"d_modle": 32}', "'d_modle'", id="unknown-key"),
    pytest.param('{"d_model": "32"}', "d_model", id="wrong-type"),
    pytest.param('{"tie_embeddings": 1}', "tie_embeddings", id="int-for-bool"),
    pytest.param('[["d_model", 32]]', "JSON object", id="not-an-object"),
])
def test_bad_config_file(tmp_path, content, needle):
    path = tmp_path / "config.json"
    path.write_text(content)
    proc = run_script("train.py", "--config", path, "--run-dir", tmp_path / "run")
    assert_user_error(proc, str(path), needle)


def test_missing_config_file(tmp_path):
    proc = run_script("train.py", "--config", tmp_path / "nope.json")
    assert_user_error(proc, "nope.json")


def test_steps_and_epochs_together(tmp_path):
    proc = run_script("train.py", "--preset", "lecture", "--steps", "10", "--epochs", "2",
                      "--run-dir", tmp_path)
    assert_user_error(proc, "steps", "epochs")


def test_epochs_with_random_batching_names_the_epochs_flag(tmp_path):
    proc = run_script("train.py", *TINY, "--epochs", "2", "--run-dir", tmp_path)
    line = assert_user_error(proc, "stream")
    assert line.startswith("error: --epochs"), line


# --- help ---------------------------------------------------------------------------------


def test_train_help_lists_every_flag():
    proc = run_script("train.py", "--help")
    assert proc.returncode == 0 and not proc.stderr
    flags = {"--data", "--run-dir", "--preset", "--config", "--fresh"}
    for name, f in config_lib.FIELDS.items():  # every config field has its flag
        if f.metadata.get("flag", True):
            flags.add("--" + name.replace("_", "-"))
    assert {"--d-model", "--lr", "--eval-every", "--epochs", "--tie-embeddings"} <= flags
    flags |= option_strings(cli.train_parser())
    missing = sorted(flag for flag in flags if flag not in proc.stdout)
    assert not missing
    assert "--no-tie-embeddings" in proc.stdout
    assert "--head-size" not in proc.stdout  # set from the corpus, never a flag


@pytest.mark.parametrize("script,parser,flags", [
    ("sample.py", cli.sample_parser, {"--run-dir", "--step", "--prompt", "--prompt-file",
                                      "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                                      "--seed", "--num-samples", "--stop", "--ignore-eos",
                                      "--interactive"}),
    ("forecast.py", cli.forecast_parser, {"--run-dir", "--step", "--data", "--horizon",
                                          "--origin", "--samples", "--interval", "--seed"}),
    ("evaluate.py", cli.evaluate_parser, {"--run-dir", "--model", "--step", "--data",
                                          "--context", "--stride", "--json", "--html"}),
])
def test_sample_forecast_and_evaluate_help_list_every_flag(script, parser, flags):
    proc = run_script(script, "--help")
    assert proc.returncode == 0 and not proc.stderr
    missing = sorted(flag for flag in flags | option_strings(parser()) if flag not in proc.stdout)
    assert not missing


# --- precedence: preset < --config file < flags ---------------------------------------------


def resolve(*argv: str) -> config_lib.Config:
    return cli.resolve_config(cli.train_parser().parse_args(list(argv)))


def test_preset_alone_gives_the_preset():
    for name in config_lib.PRESETS:
        assert resolve("--preset", name) == config_lib.preset(name)
    assert resolve() == config_lib.preset("default")


def test_config_file_overrides_preset_and_flags_override_both(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"d_model": 48, "heads": 3, "lr": 0.01, "seq_len": 32,
                                "tie_embeddings": True, "batching": "random"}))
    fast = config_lib.preset("fast")
    from_file = resolve("--preset", "fast", "--config", str(path))
    assert (from_file.model.d_model, from_file.model.heads) == (48, 3)
    assert from_file.train.lr == 0.01 and from_file.train.seq_len == 32
    assert from_file.model.d_ff == fast.model.d_ff  # untouched preset fields stay
    assert from_file.train.steps == fast.train.steps

    both = resolve("--preset", "fast", "--config", str(path), "--lr", "0.02",
                   "--no-tie-embeddings", "--d-ff", "100")
    assert both.train.lr == 0.02
    assert both.model.tie_embeddings is False
    assert both.model.d_ff == 100
    assert both.model.d_model == 48 and both.train.seq_len == 32  # file values not flagged


def test_steps_or_epochs_from_a_later_layer_replaces_the_other(tmp_path):
    lecture = resolve("--preset", "lecture")
    assert lecture.train.epochs == 20 and lecture.train.steps is None
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 100}))
    by_file = resolve("--preset", "lecture", "--config", str(path))
    assert by_file.train.steps == 100 and by_file.train.epochs is None
    by_flag = resolve("--preset", "lecture", "--config", str(path), "--epochs", "3")
    assert by_flag.train.epochs == 3 and by_flag.train.steps is None
    assert by_flag.train.total_steps() == 3 * by_flag.train.streams
