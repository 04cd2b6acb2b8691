"""Tests for transformer_jax.metrics: the records of metrics.jsonl and TensorBoard, and the best
validation loss that --keep-best and --early-stop follow."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from transformer_jax import run
from transformer_jax.config import Config
from transformer_jax.errors import UserError
from transformer_jax.metrics import TAGS, Best, MetricsLog

TEXT = "To be, or not to be, that is the question. " * 60
# 15 steps in chunks of 5, an evaluation every 5 and a checkpoint every 10 (and at the end).
TINY = Config().replace(d_model=16, layers=1, heads=2, d_ff=32, seq_len=16, max_len=16,
                        batch_size=4, steps=15, steps_per_call=5, eval_every=5, save_every=10,
                        seed=2)


# --- Best ---------------------------------------------------------------------------------------


def test_best_counts_the_evaluations_that_do_not_improve_by_more_than_min_delta():
    best = Best()
    assert best.step is None and best.val_loss == math.inf and not best.patience_spent(1)
    best = best.update(5, 2.0, min_delta=0.1)
    assert best == Best(5, 2.0, 0)
    best = best.update(10, 1.95, min_delta=0.1)  # lower, but not by more than 0.1
    assert best == Best(5, 2.0, 1)
    best = best.update(15, 1.9, min_delta=0.1)  # exactly 0.1 lower: not an improvement
    assert best == Best(5, 2.0, 2) and best.patience_spent(2) and not best.patience_spent(3)
    best = best.update(20, 1.89, min_delta=0.1)
    assert best == Best(20, 1.89, 0) and not best.patience_spent(1)
    assert best.update(25, 1.89) == Best(20, 1.89, 1)  # a tie is not an improvement
    assert best.update(25, math.nan) == Best(20, 1.89, 1)
    assert not Best(5, 1.0, 99).patience_spent(0)  # --early-stop 0: never


def test_best_round_trips_through_checkpoint_metadata():
    for best in (Best(), Best(stale=2), Best(600, 1.4321, 2)):
        meta = json.loads(json.dumps({"best": best.to_meta()}))  # as orbax stores it
        assert Best.from_meta(meta) == best
    assert Best(600, 1.5, 2).to_meta() == {"step": 600, "val_loss": 1.5, "stale": 2}
    assert Best.from_meta({"config": {}}) == Best()  # a run that did not follow its best


# --- MetricsLog ---------------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(board_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for `board_dir`, by tag: [(step, value), ...]."""
    events = EventAccumulator(str(board_dir))  # purges what a later file's purge step hides
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should show for the records of metrics.jsonl."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key != "step":
                tags.setdefault(TAGS.get(key, key), []).append((r["step"], value))
    return tags


def _assert_same(scalars: dict, expected: dict) -> None:
    assert scalars.keys() == expected.keys()
    for tag, points in expected.items():
        steps = [s for s, _ in scalars[tag]]
        assert steps == [s for s, _ in points], tag
        assert len(set(steps)) == len(steps), tag  # no step twice
        for (_, got), (_, want) in zip(scalars[tag], points):
            assert got == pytest.approx(want, rel=1e-6), tag  # event files hold float32


def test_a_resumed_log_forgets_redone_steps_in_metrics_jsonl_and_tensorboard(tmp_path):
    first = MetricsLog(tmp_path, tensorboard=True)
    first.resume(0)
    for step in (1, 2, 3):
        first.write({"step": step, "train_loss": 1.0 / step, "lr": 0.1, "finished": True})
    first.close()  # as a killed run leaves it: steps 2 and 3 were never checkpointed
    second = MetricsLog(tmp_path, tensorboard=True)
    second.resume(1)
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1]
    for step in (2, 3):
        second.write({"step": step, "train_loss": 2.0 / step, "lr": 0.2, "val_loss": 5.0})
    second.close()
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    expected = _expected([{k: v for k, v in r.items() if k != "finished"} for r in records])
    assert set(expected) == {"loss/train", "loss/val", "lr"}  # a bool is not a scalar
    _assert_same(_scalars(tmp_path / "tensorboard"), expected)
    MetricsLog(tmp_path, tensorboard=True).clear()  # --fresh
    assert not (tmp_path / "metrics.jsonl").exists()
    assert list((tmp_path / "tensorboard").iterdir()) == []


def test_without_tensorboardx_the_flag_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    with pytest.raises(UserError, match=r"^--tensorboard needs tensorboardX: pip install "
                       r"'transformer-jax\[tensorboard\]'"):
        MetricsLog(tmp_path, tensorboard=True)
    MetricsLog(tmp_path).write({"step": 1, "train_loss": 1.0})  # not needed without the flag


# --- a training run -----------------------------------------------------------------------------


def test_tensorboard_shows_the_records_of_metrics_jsonl_across_a_resume(tmp_path):
    """A run stopped after its checkpoint of step 10 but before that of 15 (a kill), then
    resumed: steps 11-15 are redone, and TensorBoard shows them once, as metrics.jsonl does."""
    run_dir = tmp_path / "run"
    run.train(TINY.replace(tensorboard=True), TEXT, run_dir, quiet=True)
    shutil.rmtree(run_dir / "checkpoints" / "15")
    before = _records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in before] == [5, 10, 15]
    run.train(TINY.replace(tensorboard=True, steps=20), TEXT, run_dir, quiet=True)
    records = _records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[:2] == before[:2]
    files = sorted(p.name for p in (run_dir / "tensorboard").iterdir())
    assert len(files) == 2 and files[1].endswith(".from-0000000010"), files
    scalars = _scalars(run_dir / "tensorboard")
    assert {"loss/train", "loss/val", "bits/val", "lr", "tokens_per_s",
            "wall_time"} == set(scalars)
    _assert_same(scalars, _expected(records))


def test_without_the_flag_no_tensorboard_directory_appears(tmp_path):
    run.train(TINY.replace(steps=5), TEXT, tmp_path, quiet=True)
    assert (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "tensorboard").exists()
