"""Training runs that stop early on purpose: signals, non-finite losses, --early-stop."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer_jax import data, run, training
from transformer_jax.checkpoint import RunCheckpoints
from transformer_jax.config import Config
from transformer_jax.errors import RunStopped
from transformer_jax.tokens import Corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "fast", "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32",
        "--seq-len", "16", "--max-len", "16", "--batch-size", "4", "--eval-every", "1000",
        "--save-every", "1000", "--steps-per-call", "5", "--cpu-devices", "2"]


def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question. " * 60, encoding="utf-8")
    return path


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_saves_a_checkpoint_exits_143_and_the_resumed_run_matches(tmp_path):
    data, run_dir = corpus(tmp_path), tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, "--steps", "100000", "--data", str(data),
           "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 120), "never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("interrupted at step ") and "resume with python train.py" in message
    step = int(message.split()[3].rstrip(","))
    assert (run_dir / "checkpoints" / str(step)).is_dir()
    assert "--fresh" not in message

    # Resume to a fixed total, and compare with an uninterrupted run of the same total.
    total = step + 10
    for directory in (run_dir, tmp_path / "straight"):
        done = subprocess.run([*cmd[:-4], "--steps", str(total), "--data", str(data),
                               "--run-dir", str(directory)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    resumed = run.load_for_sampling(run_dir).params
    straight = run.load_for_sampling(tmp_path / "straight").params
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_train_step_skips_a_non_finite_update_and_reports_it():
    params = {"w": jnp.ones(3)}
    tx = optax.adam(0.1)
    state = training.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                rng=jax.random.PRNGKey(0))

    def loss_fn(params, rows, rng):  # NaN whenever the batch holds a negative number
        total = jnp.sum(params["w"] * rows) + jnp.where(rows.min() < 0, jnp.nan, 0.0)
        return total, jnp.float32(rows.size)

    good, out = training.train_step(state, jnp.ones((2, 3)), loss_fn=loss_fn, tx=tx)
    assert bool(out["finite"]) and not np.allclose(good.params["w"], 1.0)
    bad, out = training.train_step(good, -jnp.ones((2, 3)), loss_fn=loss_fn, tx=tx)
    assert not bool(out["finite"]) and int(bad.step) == 2
    np.testing.assert_array_equal(bad.params["w"], good.params["w"])
    for a, b in zip(jax.tree.leaves(bad.opt_state), jax.tree.leaves(good.opt_state)):
        np.testing.assert_array_equal(a, b)


def diverging_config(on_nan: str) -> Config:
    return Config().replace(d_model=16, layers=1, heads=2, d_ff=32, seq_len=16, max_len=16,
                            batch_size=4, steps=20, steps_per_call=5, save_every=5,
                            eval_every=1000, lr=1e30, on_nan=on_nan)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_good_checkpoints(tmp_path):
    text = "To be, or not to be, that is the question. " * 60
    with pytest.raises(RunStopped, match=r"not finite at step \d+.*last good checkpoint") as e:
        run.train(diverging_config("stop"), text, tmp_path, quiet=True,
                  devices=jax.devices()[:1])
    assert e.value.exit_code == 1
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad_step for s in saved)


def test_on_nan_skip_finishes_with_finite_parameters(tmp_path):
    text = "To be, or not to be, that is the question. " * 60
    run.train(diverging_config("skip"), text, tmp_path, quiet=True, devices=jax.devices()[:1])
    params = run.load_for_sampling(tmp_path).params
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 20


def test_same_seed_config_and_data_give_the_same_losses_and_samples(tmp_path):
    from transformer_jax.sampling import complete

    text = "To be, or not to be, that is the question. " * 60
    config = Config().replace(d_model=16, layers=1, heads=2, d_ff=32, seq_len=16, max_len=16,
                              batch_size=4, steps=15, steps_per_call=5, eval_every=5,
                              save_every=15, dropout=0.1)
    outputs = []
    for name in ("a", "b"):
        run.train(config, text, tmp_path / name, quiet=True, devices=jax.devices()[:1])
        losses = [(r["train_loss"], r.get("val_loss"))
                  for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open())]
        trained = run.load_for_sampling(tmp_path / name)
        cfg, tok, params = trained.config, trained.tokenizer, trained.params
        outputs.append((losses, complete(cfg, tok, params, "To be", max_new_tokens=20, seed=3)))
    assert outputs[0] == outputs[1]


def test_a_bpe_run_resumes_with_its_tokenizer_and_samples_any_text(tmp_path):
    from transformer_jax.sampling import complete

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 40
    config = Config().replace(tokenizer="bpe", vocab_size=280, d_model=16, layers=1, heads=2,
                              d_ff=32, seq_len=16, max_len=16, batch_size=4, steps=5,
                              steps_per_call=5, eval_every=5, save_every=5)
    run.train(config, text, tmp_path, quiet=True, devices=jax.devices()[:1])
    first = run.load_for_sampling(tmp_path).tokenizer
    run.train(config.replace(steps=10), text, tmp_path, quiet=True, devices=jax.devices()[:1])
    trained = run.load_for_sampling(tmp_path)
    assert trained.step == 10 and trained.tokenizer.to_dict() == first.to_dict()
    assert trained.config.model.vocab_size == first.vocab_size == 280
    prompt = "Zebras 🙂 αΩ"  # nothing the corpus holds is needed: bytes are the alphabet
    [sample] = complete(trained.config, trained.tokenizer, trained.params, prompt,
                        max_new_tokens=12, seed=1)
    assert sample.startswith(prompt) and len(sample) > len(prompt)


def test_a_corpus_on_disk_trains_from_its_token_file_exactly_as_from_memory(tmp_path,
                                                                             monkeypatch):
    """The rows gathered on the host a chunk ahead (as for a corpus over data.ON_DEVICE_BYTES)
    train exactly as rows gathered on the devices, the validation split held on the host
    gives the same losses, and a second run maps the same file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = corpus(tmp_path)
    config = Config().replace(d_model=16, layers=1, heads=2, d_ff=32, seq_len=16, max_len=16,
                              batch_size=4, steps=12, steps_per_call=4, eval_every=6,
                              save_every=12)
    devices = jax.devices()[:2]
    run.train(config, path.read_text(encoding="utf-8"), tmp_path / "memory", quiet=True,
              devices=devices)
    monkeypatch.setattr(data, "ON_DEVICE_BYTES", 0)
    for name in ("disk", "again"):
        run.train(config, Corpus.scan(path), tmp_path / name, quiet=True, devices=devices)
    records = [list(map(json.loads, (tmp_path / name / "metrics.jsonl").open()))
               for name in ("memory", "disk", "again")]
    train = [[r["train_loss"] for r in runs] for runs in records]
    assert train[0] == train[1] == train[2]
    # Validation too is held on the host there, evaluated a batch at a time: summed in
    # another order than in one call.
    val = [[r["val_loss"] for r in runs if "val_loss" in r] for runs in records]
    assert len(val[0]) == 2
    np.testing.assert_allclose(val[1], val[0], rtol=1e-6)
    assert val[1] == val[2]
    assert len(list((tmp_path / "cache" / "transformer-jax" / "tokens").glob("*.ids"))) == 1
    memory, disk = (run.load_for_sampling(tmp_path / name) for name in ("memory", "disk"))
    assert jax.tree.all(jax.tree.map(np.array_equal, memory.params, disk.params))
    assert disk.corpus["path"] == str(path.absolute())
    assert disk.corpus["sha256"] == Corpus.of_text(path.read_text(encoding="utf-8")).sha256


def corrupt_newest_step(run_dir: Path, how: str) -> int:
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    newest = run_dir / "checkpoints" / str(steps[-1])
    if how == "truncate":  # garbage in the array store
        for f in (newest / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
                f.write_bytes(b"garbage")
    else:  # a missing metadata file
        for f in (newest / "meta").iterdir():
            f.unlink()
    return steps[-1]


@pytest.mark.parametrize("how", ["truncate", "missing-meta"])
def test_an_unreadable_newest_checkpoint_is_an_error_unless_last_good_is_asked(tmp_path, how):
    from transformer_jax.errors import UserError

    text = "To be, or not to be, that is the question. " * 60
    config = Config().replace(d_model=16, layers=1, heads=2, d_ff=32, seq_len=16, max_len=16,
                              batch_size=4, steps=10, steps_per_call=5, save_every=5,
                              eval_every=1000)
    one = dict(quiet=True, devices=jax.devices()[:1])
    run.train(config, text, tmp_path, **one)
    bad = corrupt_newest_step(tmp_path, how)
    longer = config.replace(steps=15)
    with pytest.raises(UserError, match=rf"step {bad}.*unreadable.*--resume-from last-good"):
        run.train(longer, text, tmp_path, **one)
    assert (tmp_path / "checkpoints" / str(bad)).is_dir()  # never removed unasked
    run.train(longer, text, tmp_path, resume_from="last-good", quiet=False,
              devices=jax.devices()[:1])
    assert (tmp_path / "checkpoints" / f"unreadable-{bad}").is_dir()
    # resumed from the good step 5 and reached 15: same parameters as a straight run to 15
    run.train(longer, text, tmp_path / "straight", **one)
    for a, b in zip(jax.tree.leaves(run.load_for_sampling(tmp_path).params),
                    jax.tree.leaves(run.load_for_sampling(tmp_path / "straight").params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# --- --early-stop and --keep-best ----------------------------------------------------------------

# Trained on one sentence, validated on another: the validation loss falls, then rises as the
# model learns its sentence by heart, so that --early-stop 3 ends the run (at step 25, best 10).
OVERFIT = ("To be, or not to be, that is the question. " * 54
           + "Whether tis nobler in the mind to suffer. " * 6)
EARLY = Config().replace(d_model=16, layers=1, heads=2, d_ff=32, seq_len=16, max_len=16,
                         batch_size=4, steps=60, steps_per_call=5, eval_every=5, save_every=20,
                         keep=1, dropout=0.1, lr=1e-2, seed=1, keep_best=True, early_stop=3)


def _val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").open())
            if "val_loss" in r]


def _where_it_should_stop(losses: list[tuple[int, float]], patience: int) -> tuple[int, int]:
    """(stop step, best step) by the rule itself, from the evaluations of metrics.jsonl."""
    best_step, best_loss, stale = None, float("inf"), 0
    for step, loss in losses:
        best_step, best_loss, stale = ((step, loss, 0) if loss < best_loss
                                       else (best_step, best_loss, stale + 1))
        if stale == patience:
            return step, best_step
    raise AssertionError(f"no early stop in {losses}")


@pytest.fixture(scope="module")
def early_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """EARLY trained without interruption: its directory, result and printed lines."""
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("early") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run.train(EARLY, OVERFIT, run_dir, devices=jax.devices()[:1])
    return run_dir, result, printed.getvalue()


def test_early_stop_ends_the_run_after_n_stale_evaluations_keeping_the_best(early_run):
    run_dir, result, printed = early_run
    stop, best = _where_it_should_stop(_val_losses(run_dir), patience=3)
    assert 0 < best < stop < EARLY.train.steps
    assert result["step"] == stop and result["stopped_early"] is True
    assert result["best_step"] == best and result["best_loss"] == dict(_val_losses(run_dir))[best]
    assert (f"early stop at step {stop}: no improvement of at least 0.0 in 3 evaluations; best: "
            f"step {best}, val loss {result['best_loss']:.4f} (sample it with --step best)"
            ) in printed
    # The stop step is saved; the best outlives the later save_every step that --keep 1 pruned.
    ckpt = RunCheckpoints(run_dir, read_only=True)
    assert ckpt.steps() == [stop, best]
    assert ckpt.meta(stop)["best"] == {"step": best, "val_loss": result["best_loss"], "stale": 3}
    ckpt.close()
    trained = run.load_for_sampling(run_dir, "best")
    assert trained.step == best and trained.config.train.steps == EARLY.train.steps


def test_an_interrupted_run_stops_at_the_same_step_with_the_same_best(early_run, tmp_path,
                                                                       capsys):
    """Stopped after the first stale evaluation, resumed: the count goes on from the
    checkpoint's metadata, so the run ends where the uninterrupted one did, with its best."""
    full_dir, full, _ = early_run
    run_dir = tmp_path / "run"
    one = dict(quiet=True, devices=jax.devices()[:1])
    first = run.train(EARLY.replace(steps=full["best_step"] + 5), OVERFIT, run_dir, **one)
    assert first["stopped_early"] is False and first["best_step"] == full["best_step"]
    resumed = run.train(EARLY, OVERFIT, run_dir, **one)
    assert {k: resumed[k] for k in ("step", "best_step", "best_loss", "stopped_early")} == {
        k: full[k] for k in ("step", "best_step", "best_loss", "stopped_early")}
    assert _val_losses(run_dir) == _val_losses(full_dir)
    for a, b in zip(jax.tree.leaves(run.load_for_sampling(run_dir, "best").params),
                    jax.tree.leaves(run.load_for_sampling(full_dir, "best").params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    capsys.readouterr()
    again = run.train(EARLY, OVERFIT, run_dir, devices=jax.devices()[:1])
    assert f"stopped early at step {full['step']}" in capsys.readouterr().out
    assert again == {"step": full["step"], "best_step": full["best_step"],
                     "best_loss": full["best_loss"], "stopped_early": True}
