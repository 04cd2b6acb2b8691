"""The loss-curve picture: drawn from metrics.jsonl, and clear errors when it cannot be."""

import json
import sys

import pytest

from transformer_jax import plot
from transformer_jax.errors import UserError


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_run_writes_a_png_of_train_and_validation_loss(tmp_path):
    write_metrics(tmp_path, [{"step": 10, "train_loss": 3.0},
                             {"step": 20, "train_loss": 2.5, "val_loss": 2.6}])
    out = plot.plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_metrics_keeps_order_and_skips_blank_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert [r["step"] for r in plot.read_metrics(tmp_path)] == [1, 2]


def test_missing_or_malformed_metrics_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl does not exist"):
        plot.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match="line 2: not JSON"):
        plot.read_metrics(tmp_path)


def test_without_matplotlib_the_error_is_an_install_hint(tmp_path, monkeypatch):
    write_metrics(tmp_path, [{"step": 1, "train_loss": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match=r"transformer-jax\[plot\]"):
        plot.plot_run(tmp_path)


def test_module_entry_point_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        plot.main([])
    assert exit_.value.code == 2 and "usage" in capsys.readouterr().err
