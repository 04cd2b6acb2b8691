"""Tests for transformer_jax.evaluate: the rows that score a text, the loss they give, and the
evaluate command.

References: training's own validation rows (`data.windows`, `data.stream_rows`), a brute-force
loss that runs the full model once per token on exactly the context that token may see, and
the validation loss a training run recorded (on its own split it must be reproduced).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, tiny_config

from transformer_jax import cli, data, evaluate, forecast, parallel, run, tasks
from transformer_jax.config import Config
from transformer_jax.model import Transformer
from transformer_jax.tasks import Trained
from transformer_jax.tokenizer import CharTokenizer

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife.\n") * 12
TINY_RUN = Config().replace(
    d_model=16, layers=1, heads=2, d_ff=32, max_len=16, seq_len=16, batch_size=4, steps=10,
    lr=3e-3, eval_every=10, save_every=10, steps_per_call=5, keep=2, seed=1, eval_batches=0)


def _chunks(ids: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    edges = [0, *sorted(cuts), len(ids)]
    return [ids[a:b] for a, b in zip(edges, edges[1:])]


def _targets(blocks, windows: evaluate.Windows) -> tuple[np.ndarray, np.ndarray]:
    """All rows and scored masks of `blocks`, stacked."""
    rows, scored = zip(*blocks)
    return np.concatenate(rows), np.concatenate(scored)


@pytest.mark.parametrize("n", [2, 16, 17, 18, 40, 97])
@pytest.mark.parametrize("cuts", [[], [1], [5, 6, 30], [16, 33, 34, 35]])
def test_sliding_rows_at_full_stride_are_trainings_validation_windows(n, cuts):
    ids = np.arange(100, 100 + n)
    w = evaluate.Windows(context=16, stride=16, pad=-1)
    rows, scored = _targets(evaluate.sliding_rows(_chunks(ids, [c for c in cuts if c < n]), w),
                            w)
    np.testing.assert_array_equal(rows, data.windows(ids, 16, -1))
    np.testing.assert_array_equal(scored, rows[:, 1:] != -1)


@pytest.mark.parametrize("stride", [1, 3, 7, 8])
@pytest.mark.parametrize("start", [None, 0])
def test_sliding_rows_score_every_target_once_with_enough_context(stride, start):
    T, ids = 8, np.arange(10, 60)
    w = evaluate.Windows(context=T, stride=stride, pad=-1, start=start)
    rows, scored = _targets(evaluate.sliding_rows(_chunks(ids, [7, 8, 23]), w, block=3), w)
    text = np.concatenate([[start], ids]) if start is not None else ids
    seen = []
    for row, mask in zip(rows, scored):
        for j in np.flatnonzero(mask):
            seen.append(row[j + 1])
            context = row[:j + 1]
            position = int(np.flatnonzero(text == row[j + 1])[0])
            np.testing.assert_array_equal(context, text[position - len(context):position])
            if position > T:  # a later row: at least T - S + 1 tokens before it
                assert len(context) >= T - stride + 1
    expected = ids if start is not None else ids[1:]
    np.testing.assert_array_equal(seen, expected)


@pytest.mark.parametrize("n", [1, 5, 16, 33])
def test_piece_rows_are_the_lectures_stream_pieces(n):
    tokenizer = CharTokenizer.from_text("abcdefghij")
    text = ("abcdefghij" * 4)[:n]
    w = evaluate.Windows(context=5, stride=5, pad=tokenizer.pad_id, start=tokenizer.start_id,
                         end=tokenizer.end_id)
    ids = tokenizer.encode(text).astype(np.int64)
    rows, scored = _targets(evaluate.piece_rows(_chunks(ids, [2, 3]), w, block=2), w)
    np.testing.assert_array_equal(rows, data.stream_rows(tokenizer, text, 5, 1)[0])
    np.testing.assert_array_equal(scored, rows[:, 1:] != tokenizer.pad_id)


def test_batched_regroups_rows_and_pads_the_last_batch():
    blocks = [(np.full((n, 3), i), np.ones((n, 2), bool)) for i, n in enumerate([1, 4, 2])]
    out = list(evaluate.batched(blocks, 3, pad=-1))
    assert [r.shape for r, _ in out] == [(3, 3)] * 3
    np.testing.assert_array_equal(np.concatenate([r for r, _ in out])[:, 0],
                                  [0, 1, 1, 1, 1, 2, 2, -1, -1])
    assert np.concatenate([s for _, s in out]).sum() == 2 * 7


def _char_trained(text: str, **changes) -> Trained:
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_config(vocab_size=tokenizer.vocab_size, max_len=12)
    config = Config(model).replace(seq_len=changes.pop("seq_len", 8), **changes)
    return Trained(tasks.KINDS["char"], config, random_params(config.model, scale=0.3), 7,
                   tokenizer=tokenizer)


def _brute_force_nats(trained: Trained, ids: np.ndarray, T: int, S: int) -> float:
    """Each target's loss from a full forward pass over exactly the context its row gives it:
    target p (p >= 1) of row k = max(0, ceil((p - T) / S)) sees ids[k S : p]. One row per
    target, the context at its start and zeros after it (later positions cannot change a
    causal model's output at the context's last one), all in one call."""
    contexts = np.zeros((len(ids) - 1, T), np.int32)
    last = np.zeros(len(ids) - 1, int)
    for p in range(1, len(ids)):
        k = max(0, -(-(p - T) // S))
        contexts[p - 1, :p - k * S] = ids[k * S:p]
        last[p - 1] = p - k * S - 1
    logits = Transformer(trained.config.model).apply({"params": trained.params},
                                                     jnp.asarray(contexts))
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[np.arange(len(last)), last])
    return -float(np.asarray(logp)[np.arange(len(last)), ids[1:]].sum())


@pytest.mark.parametrize("stride", [None, 3, 1])
def test_text_loss_equals_a_brute_force_pass_per_token(stride):
    text = TEXT[:61]
    trained = _char_trained(text)
    w = evaluate.windows_for(trained, stride=stride)
    ids = trained.tokenizer.encode(text).astype(np.int64)
    report, scores = evaluate.evaluate_text(trained, [[text[:20], text[20:]]], w,
                                            mesh=parallel.data_mesh(), batch_size=3,
                                            page_tokens=1000, quiet=True)
    assert report.tokens == len(text) - 1 and report.chars == len(text)
    expected = _brute_force_nats(trained, ids, w.context, w.stride)
    assert report.nats == pytest.approx(expected, rel=1e-5)
    # The page's tokens are the scored ones, in text order, with their own surprisal.
    assert "".join(scores.pieces) == text[1:]
    assert np.sum(scores.bits) * math.log(2) == pytest.approx(expected, rel=1e-5)
    assert np.all(scores.rank >= 1) and np.allclose(scores.prob, 2.0 ** -scores.bits)
    assert np.all(np.diff(scores.top_probs, axis=1) <= 0)  # likeliest first
    at_rank_1 = scores.rank == 1
    assert [p[0] for p, r in zip(scores.top_pieces, at_rank_1) if r] == \
        [c for c, r in zip(scores.pieces, at_rank_1) if r]


def test_units_follow_from_the_same_summed_loss():
    text = "naïve café " * 9
    trained = _char_trained(text)
    report, _ = evaluate.evaluate_text(trained, [[text]], evaluate.windows_for(trained),
                                       mesh=parallel.data_mesh(), batch_size=4, quiet=True)
    out = report.to_dict()
    assert out["bytes"] == len(text.encode()) > out["chars"] == len(text)
    assert out["bits_per_token"] == pytest.approx(out["loss"] / math.log(2))
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert out["bits_per_char"] * out["chars"] == pytest.approx(out["bits_per_token"]
                                                                * out["tokens"])
    assert out["bits_per_byte"] < out["bits_per_char"]


def _train(tmp_path, name: str, text: str, config: Config) -> tuple:
    corpus = tmp_path / f"{name}.txt"
    corpus.write_text(text, encoding="utf-8")
    run_dir = tmp_path / name
    run.train(config, text, run_dir, quiet=True, corpus=corpus)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, metrics[-1]


@pytest.mark.parametrize("changes", [
    pytest.param({}, id="random-windows"),
    pytest.param({"batching": "stream", "streams": 2, "steps": None, "epochs": 2,
                  "max_len": 18, "seq_len": 16}, id="stream-pieces"),
    pytest.param({"split_docs": r"\n", "min_len": 3}, id="documents"),
    pytest.param({"tokenizer": "bpe", "vocab_size": 300}, id="bpe"),
    pytest.param({"tokenizer": "bpe", "vocab_size": 300, "batching": "stream", "streams": 2,
                  "steps": None, "epochs": 2, "max_len": 18, "seq_len": 16}, id="bpe-stream"),
])
def test_the_runs_own_split_reproduces_its_recorded_validation_loss(tmp_path, changes, capsys):
    run_dir, last = _train(tmp_path, "run", TEXT, TINY_RUN.replace(**changes))
    cli.evaluate_main(["--run-dir", str(run_dir), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert report["step"] == last["step"]
    for key in ("perplexity", "bits_per_token", "bits_per_char", "bits_per_byte", "tokens",
                "chars", "bytes"):
        assert key in report


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2-tiny"


def test_a_transfer_runs_own_split_reproduces_its_loss_beside_its_base_model(tmp_path, capsys):
    config = Config().replace(
        init=str(FIXTURE), finetune="head", seq_len=12, batch_size=4, steps=10, lr=1e-2,
        eval_every=10, save_every=10, steps_per_call=5, eval_batches=0)
    run_dir, last = _train(tmp_path, "transfer", TEXT, config)
    other = tmp_path / "other.txt"
    other.write_text("Zebras quietly juggle xylophones; the dismal science. " * 5)
    cli.evaluate_main(["--run-dir", str(run_dir), "--model", str(FIXTURE), "--json"])
    own, base = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert own["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert base["data"] == own["data"] and base["tokens"] == own["tokens"]
    assert base["step"] == 0 and base["model"] == str(FIXTURE)
    # On another text, tokens outside the run's head are left out, with a warning.
    cli.evaluate_main(["--run-dir", str(run_dir), "--data", str(other), "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["skipped_tokens"] > 0 and "outside its prediction layer" in captured.err
    assert math.isfinite(report["loss"])


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("char"), "char", TEXT, TINY_RUN)


def test_several_runs_print_one_table_and_the_page_shows_every_token(char_run, tmp_path,
                                                                     capsys):
    run_dir, _ = char_run
    other_run, _ = _train(tmp_path, "other", TEXT[::-1], TINY_RUN.replace(steps=5))
    other = tmp_path / "held-out.txt"
    other.write_text(TEXT[:300], encoding="utf-8")
    page = tmp_path / "page.html"
    cli.evaluate_main(["--run-dir", str(run_dir), "--data", str(other), "--html", str(page),
                       "--stride", "4"])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split()[:4] == ["model", "@", "step", "tokens"]
    assert table[1].startswith(f"{run_dir} @ 10") and table[1].endswith(str(other))
    html = page.read_text(encoding="utf-8")
    assert html.count(' data-i=') == 299  # every scored character, the first is context
    cli.evaluate_main(["--run-dir", str(run_dir), "--run-dir", str(run_dir), "--data",
                       str(other)])
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    # Without --data, each run on its own split.
    cli.evaluate_main(["--run-dir", str(run_dir), "--run-dir", str(other_run)])
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [row.split()[-1] for row in rows] == [str(run_dir), str(other_run)]


@pytest.mark.parametrize("argv, needles", [
    (["--data", "{csv}"], ["--data", "CSV file", "text model"]),
    (["--data", "{empty}"], ["--data", "is empty"]),
    (["--data", "{one}"], ["holds no token to predict"]),
    (["--data", "{missing}"], ["--data", "does not exist"]),
    (["--stride", "17"], ["--stride 17", "between 1 and the context (16"]),
    (["--context", "99"], ["--context 99", "between 1 and 16"]),
    (["--stride", "0"], ["--stride", "positive"]),
    (["--step", "best"], ["no kept best checkpoint", "--keep-best"]),
    (["--step", "3"], ["no checkpoint of step 3"]),
    (["--html", "{page}", "--run-dir", "{run}"], ["--html", "one model"]),
])
def test_bad_input_is_one_error_line(char_run, tmp_path, capsys, argv, needles):
    run_dir, _ = char_run
    files = {"csv": tmp_path / "a.csv", "empty": tmp_path / "empty.txt",
             "missing": tmp_path / "missing.txt", "one": tmp_path / "one.txt",
             "page": tmp_path / "p.html", "run": run_dir}
    files["csv"].write_text("a,b\n1,2\n")
    files["empty"].write_text("")
    files["one"].write_text("T")
    argv = [a.format(**files) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        cli.evaluate_main(["--run-dir", str(run_dir), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_series_run_prints_its_error_table_on_its_own_data_and_refuses_text(tmp_path,
                                                                              capsys):
    t = np.arange(200)
    csv = "a,b\n" + "".join(f"{np.sin(0.3 * i):.5f},{np.cos(0.2 * i):.5f}\n" for i in t)
    config = Config().replace(**{**dict(d_model=16, layers=1, heads=2, d_ff=32, max_len=8,
                                        seq_len=8, batch_size=8, steps=10, eval_every=10,
                                        save_every=10, steps_per_call=5, lr=3e-3),
                                 "columns": "a,b", "val_fraction": 0.2})
    corpus = tmp_path / "series.csv"
    corpus.write_text(csv)
    run.train(config, csv, tmp_path / "series", quiet=True, corpus=corpus)
    cli.evaluate_main(["--run-dir", str(tmp_path / "series"), "--json"])
    report = json.loads(capsys.readouterr().out)
    expected = forecast.validate(tasks.load(tmp_path / "series"), csv)
    assert report["rmse"] == expected["rmse"] and report["mae"] == expected["mae"]
    cli.evaluate_main(["--run-dir", str(tmp_path / "series"), "--data", str(corpus)])
    out = capsys.readouterr().out
    assert "RMSE" in out and "MAE" in out and "random walk" in out
    text = tmp_path / "prose.txt"
    text.write_text("not a table at all\n")
    with pytest.raises(SystemExit):
        cli.evaluate_main(["--run-dir", str(tmp_path / "series"), "--data", str(text)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data") and str(text) in err[0]


def test_a_pretrained_models_loss_is_the_one_of_hugging_faces_own_logits(tmp_path):
    """The committed fixture's logits, computed by `transformers` when it was made, give the
    reference: the summed cross-entropy of each prompt's next tokens, in numpy."""
    reference = json.loads((FIXTURE / "reference.json").read_text())
    logits = np.load(FIXTURE / "reference_logits.npz")
    trained = evaluate.pretrained(str(FIXTURE))
    for i, (prompt, ids) in enumerate(zip(reference["prompts"], reference["prompt_ids"])):
        x = logits[f"prompt_{i}"].astype(np.float64)[:-1]
        logp = x - x.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        expected = -logp[np.arange(len(ids) - 1), ids[1:]].sum()
        path = tmp_path / f"prompt{i}.txt"
        path.write_text(prompt, encoding="utf-8")
        report, _ = evaluate.judge(trained, "fixture", evaluate.file_text(str(path)),
                                   mesh=parallel.data_mesh(), quiet=True)
        assert report["tokens"] == len(ids) - 1
        assert report["loss"] * report["tokens"] == pytest.approx(expected, rel=1e-4)
