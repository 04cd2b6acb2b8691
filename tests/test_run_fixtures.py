"""Run directories written by earlier code still load, and sample and forecast exactly as then.

The directories and what sample.py / forecast.py printed for them come from
tests/make_run_fixtures.py, run by the code of the day they were made (see its docstring).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from make_run_fixtures import OUT, printed

from transformer_jax import cli

EXPECTED = json.loads((OUT / "expected.json").read_text())
CALLS = [(name, i) for name, calls in EXPECTED["runs"].items() for i in range(len(calls))]
GPT2 = Path(__file__).resolve().parent / "fixtures" / "gpt2-tiny"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A copy of the fixture runs whose transfer runs name the tiny GPT-2 of this checkout."""
    where = tmp_path_factory.mktemp("runs") / "runs"
    shutil.copytree(OUT, where)
    for meta in where.glob("*/checkpoints/*/meta/metadata"):
        text = meta.read_text()
        meta.write_text(text.replace(json.dumps(EXPECTED["base_model"]), json.dumps(str(GPT2))))
    return where


@pytest.mark.parametrize("name,call", CALLS, ids=[f"{n}-{i}" for n, i in CALLS])
def test_an_old_run_directory_prints_what_it_printed(runs, monkeypatch, name, call):
    expected = EXPECTED["runs"][name][call]
    monkeypatch.chdir(runs)
    main = cli.forecast_main if name == "series" else cli.sample_main
    assert printed(main, ["--run-dir", name, *expected["argv"]]) == expected["stdout"]
