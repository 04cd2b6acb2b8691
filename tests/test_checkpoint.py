"""Tests for transformer_jax.checkpoint and the resume logic of transformer_jax.run."""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from transformer_jax import run, training
from transformer_jax.checkpoint import FORMAT, RunCheckpoints
from transformer_jax.config import Config, TrainConfig, TransformerConfig
from transformer_jax.errors import UserError
from transformer_jax.model import Transformer, init_params, layered
from transformer_jax.sampling import generate
from transformer_jax.tokenizer import CharTokenizer

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all "
        "the clouds that lour'd upon our house in the deep bosom of the ocean buried. ") * 12

# A tiny run: 20 steps in chunks of 5, checkpoints every 5 and the last two kept, dropout on
# so that resuming must also restore the dropout key stream.
TINY = Config().replace(
    d_model=16, layers=1, heads=2, d_ff=32, max_len=16, dropout=0.1, seq_len=16, batch_size=4,
    steps=20, lr=3e-3, warmup_steps=3, decay_steps=20, min_lr=3e-4, eval_every=5,
    save_every=5, steps_per_call=5, keep=2, seed=1)


def _leaves_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _model_config(d_model: int = 16) -> TransformerConfig:
    return TransformerConfig(vocab_size=CharTokenizer.from_text(TEXT).vocab_size,
                             d_model=d_model, layers=1, heads=2, d_ff=32, max_len=16)


def abstract(tree):
    """Shape/dtype/sharding stand-ins for a pytree of arrays (a restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _abstract_state(d_model: int) -> training.TrainState:
    """Shapes of a fresh state of a model of width `d_model` (no compilation)."""
    return jax.eval_shape(lambda: training.init_state(
        init_params(_model_config(d_model), jax.random.PRNGKey(0)), TrainConfig()))


@functools.cache
def _trained_state() -> tuple[training.TrainState, TransformerConfig]:
    """A state at step 2 whose every leaf (params, Adam moments and count, rng) differs from
    a fresh one, so a restore that fell back to initial values would be caught."""
    mcfg = _model_config()
    state = training.init_state(init_params(mcfg, jax.random.PRNGKey(0)), TrainConfig(seed=4))
    rng = np.random.default_rng(0)

    def perturb(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return x + np.abs(rng.normal(size=x.shape)).astype(x.dtype)
        return x + np.asarray(2, x.dtype)

    return jax.device_put(jax.tree.map(perturb, state)), mcfg


def _step_dirs(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


# --- RunCheckpoints -------------------------------------------------------------------------


def test_train_state_round_trips_exactly(tmp_path):
    state, _ = _trained_state()
    assert int(state.step) == 2 and int(state.opt_state[1][0].count) == 2
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(2, state, {"data_position": 2})
    ckpt.wait()
    ckpt.close()

    reopened = RunCheckpoints(tmp_path)
    assert reopened.latest_step() == 2
    restored = reopened.restore(2, abstract(state))
    reopened.close()
    assert isinstance(restored, training.TrainState)
    _leaves_equal(restored, state)
    # The optimiser state comes back as optax's own types, so tx.update accepts it.
    clip_state, adam_state = restored.opt_state
    assert isinstance(adam_state[0], optax.ScaleByAdamState)
    assert int(adam_state[0].count) == 2
    assert float(jnp.abs(adam_state[0].mu["embed"]["embedding"]).max()) > 0
    assert restored.rng.dtype == jnp.uint32 and restored.rng.shape == (2,)
    tx = training.optimizer(TrainConfig(seed=4))
    grads = jax.tree.map(jnp.ones_like, restored.params)
    updates, _ = tx.update(grads, restored.opt_state, restored.params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_meta_round_trips_and_carries_the_format(tmp_path):
    state, mcfg = _trained_state()
    tok = CharTokenizer.from_text(TEXT + "ü€")
    meta = {"config": Config(mcfg, TrainConfig()).to_dict(), "tokenizer": tok.to_dict(),
            "data_position": 7}
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(7, state, meta)
    ckpt.wait()
    ckpt.close()
    reader = RunCheckpoints(tmp_path, read_only=True)
    got = reader.meta(7)
    reader.close()
    assert got == {"format": FORMAT, **meta}
    assert Config.from_dict(got["config"]) == Config(mcfg, TrainConfig())
    assert CharTokenizer.from_dict(got["tokenizer"]) == tok


def test_restore_into_a_different_model_raises_user_error(tmp_path):
    state, _ = _trained_state()
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(2, state, {})
    ckpt.wait()
    wider = _abstract_state(d_model=32)
    with pytest.raises(UserError, match="does not match") as err:
        ckpt.restore(2, wider)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not match"):
        ckpt.restore_params(2, wider.params)
    ckpt.close()


def test_unreadable_meta_raises_user_error(tmp_path):
    state, _ = _trained_state()
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(3, state, {"x": 1})
    ckpt.wait()
    ckpt.close()
    for f in (tmp_path / "checkpoints" / "3" / "meta").iterdir():
        if f.is_file() and f.name != "commit_success.txt":
            f.write_text("{not json")
    reader = RunCheckpoints(tmp_path, read_only=True)
    with pytest.raises(UserError, match="step 3"):
        reader.meta(3)
    reader.close()


def test_keep_k_keeps_only_the_last_k_steps(tmp_path):
    state, _ = _trained_state()
    ckpt = RunCheckpoints(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, state, {"data_position": step})
        ckpt.wait()
    ckpt.close()
    assert _step_dirs(tmp_path) == [30, 40]
    reader = RunCheckpoints(tmp_path, read_only=True)
    assert reader.latest_step() == 40
    reader.close()


def test_keep_best_keeps_the_newest_best_besides_the_last_k_across_restarts(tmp_path):
    """At most one best is kept, the newest step saved as one, however many steps follow; a new
    manager (a resumed run) still knows which it is, from the metrics orbax wrote with it."""
    state, _ = _trained_state()

    def save(ckpt, step, best_loss=None):
        ckpt.save(step, state, {"data_position": step}, best_loss=best_loss)
        ckpt.wait()

    ckpt = RunCheckpoints(tmp_path, keep=2, keep_best=True)
    for step, loss in ((10, 3.0), (20, None), (30, 2.5), (40, None), (50, None), (60, None)):
        save(ckpt, step, loss)
    ckpt.close()
    assert _step_dirs(tmp_path) == [30, 50, 60]
    ckpt = RunCheckpoints(tmp_path, keep=2, keep_best=True)
    for step in (70, 80):
        save(ckpt, step)
    assert _step_dirs(tmp_path) == [30, 70, 80]
    save(ckpt, 90, 2.6)  # the caller's rule (--min-delta, a restarted count) decides a best
    save(ckpt, 100)
    ckpt.close()
    assert _step_dirs(tmp_path) == [90, 100]
    without = RunCheckpoints(tmp_path, keep=2)  # resumed without --keep-best: only the last k
    save(without, 110)
    without.close()
    assert _step_dirs(tmp_path) == [100, 110]


def test_step_best_of_a_run_without_a_kept_best_names_keep_best(full_run, tmp_path, capsys):
    from transformer_jax import cli

    run_dir = full_run[0]
    with pytest.raises(UserError) as e:
        run.load_for_sampling(run_dir, "best")
    assert str(e.value) == (f"run directory {run_dir} has no kept best checkpoint; train it "
                            "with --keep-best (steps: 15, 20)")
    with pytest.raises(SystemExit) as stop:
        cli.sample_main(["--run-dir", str(run_dir), "--step", "best"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {e.value}\n"
    # --early-stop without --keep-best records a best, which --keep may have removed
    state, _ = _trained_state()
    ckpt = RunCheckpoints(tmp_path, keep=1)
    for step in (5, 10):
        ckpt.save(step, state, {"best": {"step": 5, "val_loss": 2.0, "stale": step // 5 - 1}})
    ckpt.close()
    with pytest.raises(UserError, match=r"no kept best checkpoint \(its best, step 5, was not "
                       r"kept\); train it with --keep-best \(steps: 10\)$"):
        run.load_for_sampling(tmp_path, "best")


def test_load_for_sampling_returns_what_was_saved(tmp_path):
    state, mcfg = _trained_state()
    tok = CharTokenizer.from_text(TEXT)
    config = Config(mcfg, TrainConfig(seq_len=15, batch_size=2, seed=4))
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(2, state, {"config": config.to_dict(), "tokenizer": tok.to_dict(),
                         "data_position": 2})
    ckpt.wait()
    ckpt.close()
    trained = run.load_for_sampling(tmp_path)
    got_config, got_tok, params, step = (trained.config, trained.tokenizer, trained.params,
                                         trained.step)
    assert step == 2
    assert got_config == config
    assert got_tok == tok
    _leaves_equal(params, state.params)


def test_load_for_sampling_without_checkpoint_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        run.load_for_sampling(tmp_path / "missing")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        run.load_for_sampling(tmp_path / "empty")


# --- run.train: resume -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run_and_output(tmp_path_factory) -> tuple[Path, dict, str]:
    """TINY trained for all its 20 steps in one go, quietly; and what it printed."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        result = run.train(TINY, TEXT, run_dir, quiet=True)
    return run_dir, result, printed.getvalue()


@pytest.fixture
def full_run(full_run_and_output) -> tuple[Path, dict]:
    return full_run_and_output[:2]


def test_quiet_train_prints_nothing(full_run_and_output):
    assert full_run_and_output[2] == ""


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def test_full_run_keeps_last_two_checkpoints_and_loads_for_sampling(full_run):
    run_dir, result = full_run
    assert result["step"] == 20 and np.isfinite(result["val_loss"])
    assert _step_dirs(run_dir) == [15, 20]
    trained = run.load_for_sampling(run_dir)
    config, tok, params, step = (trained.config, trained.tokenizer, trained.params,
                                 trained.step)
    assert step == 20
    assert tok == CharTokenizer.from_text(TEXT)
    assert config == TINY.replace(vocab_size=tok.vocab_size)
    ckpt = RunCheckpoints(run_dir, read_only=True)
    assert ckpt.meta(20)["data_position"] == 20
    state_shape = jax.eval_shape(lambda: training.init_state(
        init_params(config.model, jax.random.PRNGKey(0)), config.train))
    state = ckpt.restore(20, state_shape)
    ckpt.close()
    assert int(state.step) == 20
    _leaves_equal(params, state.params)


def test_stop_and_resume_equals_one_uninterrupted_run(full_run, tmp_path, capsys):
    full_dir, full_result = full_run
    run_dir = tmp_path / "resumed"
    half = run.train(TINY.replace(steps=10), TEXT, run_dir, quiet=True)
    assert half["step"] == 10 and _step_dirs(run_dir) == [5, 10]
    capsys.readouterr()
    resumed = run.train(TINY, TEXT, run_dir, quiet=False)
    out = capsys.readouterr().out
    assert "resuming from step 10" in out
    assert resumed["step"] == 20

    params_full = run.load_for_sampling(full_dir).params
    params_resumed = run.load_for_sampling(run_dir).params
    for a, b in zip(jax.tree.leaves(params_full), jax.tree.leaves(params_resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed["val_loss"], full_result["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(resumed["train_loss"], full_result["train_loss"], rtol=1e-5)


def test_rerunning_a_finished_run_has_nothing_to_do(full_run, tmp_path, capsys):
    run_dir = _copy(full_run[0], tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    result = run.train(TINY, TEXT, run_dir)
    out = capsys.readouterr().out
    assert "nothing to do" in out and "step 20" in out
    assert result == {"step": 20}
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert _step_dirs(run_dir) == [15, 20]


def test_resume_with_a_changed_model_field_names_it(full_run, tmp_path):
    run_dir = _copy(full_run[0], tmp_path)
    with pytest.raises(UserError, match="d_model") as err:
        run.train(TINY.replace(d_model=32, steps=30), TEXT, run_dir, quiet=True)
    assert "16" in str(err.value) and "32" in str(err.value)
    with pytest.raises(UserError, match="seq_len"):
        run.train(TINY.replace(seq_len=8, steps=30), TEXT, run_dir, quiet=True)
    assert _step_dirs(run_dir) == [15, 20]


def test_resume_on_a_corpus_with_another_vocabulary_raises(full_run, tmp_path):
    run_dir = _copy(full_run[0], tmp_path)
    assert "é" not in TEXT
    same_size = TEXT.replace("e", "é")  # one character swapped: same vocab_size, other chars
    with pytest.raises(UserError, match="vocabulary"):
        run.train(TINY.replace(steps=30), same_size, run_dir, quiet=True)
    bigger = TEXT + "#"
    with pytest.raises(UserError, match="vocab"):
        run.train(TINY.replace(steps=30), bigger, run_dir, quiet=True)
    assert _step_dirs(run_dir) == [15, 20]


def test_scanned_layers_train_resume_and_sample_as_the_unrolled_model(tmp_path):
    """--scan-layers changes how the blocks are stored and compiled, not what is trained."""
    two = TINY.replace(layers=2, dropout=0.0)  # dropout masks are drawn per layout
    scanned_dir = tmp_path / "scanned"
    run.train(two.replace(scan_layers=True, steps=10), TEXT, scanned_dir, quiet=True)
    with pytest.raises(UserError, match="scan_layers=True, not False"):
        run.train(two.replace(steps=20), TEXT, scanned_dir, quiet=True)
    scanned = run.train(two.replace(scan_layers=True), TEXT, scanned_dir, quiet=True)
    unrolled = run.train(two, TEXT, tmp_path / "unrolled", quiet=True)
    np.testing.assert_allclose(scanned["val_loss"], unrolled["val_loss"], rtol=1e-5)
    trained = run.load_for_sampling(scanned_dir)
    config, tok, params = trained.config, trained.tokenizer, trained.params
    assert config.model.scan_layers and "blocks" in params["trunk"]
    reference = run.load_for_sampling(tmp_path / "unrolled").params
    for a, b in zip(jax.tree.leaves(layered(params, False)), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # float32 rounding, 20 steps
    prompt = tok.encode("Now is", add_start=True)
    new = [generate(Transformer(c.model), p, prompt, max_new_tokens=20, temperature=0.0,
                    rng=jax.random.PRNGKey(0))
           for c, p in ((config, params), (config.replace(scan_layers=False), reference))]
    np.testing.assert_array_equal(*new)


def test_a_new_run_directory_needs_no_orbax_until_a_step_is_saved(tmp_path):
    """Orbax (half a second of imports) waits for the first save: a new run reaches its first
    step without it."""
    code = ("import sys\n"
            "from transformer_jax.checkpoint import RunCheckpoints\n"
            "ckpt = RunCheckpoints(sys.argv[1])\n"
            "assert ckpt.steps() == [] and ckpt.latest_step() is None\n"
            "ckpt.wait(); ckpt.close()\n"
            "print(sorted(m for m in sys.modules if m.startswith('orbax')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"
    assert (tmp_path / "checkpoints").is_dir()
