"""The README's library example runs as written, and its commands use only real flags."""

import re
from pathlib import Path

from conftest import option_strings

from transformer_jax import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "the README lost its Python example"
    for block in blocks:
        if "base_url=" not in block:  # the server's client example: tests/test_serve.py
            exec(compile(block, str(README), "exec"), {})
    assert "(1, 11, " in capsys.readouterr().out  # logits of the start symbol + 10 characters


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in README.read_text(encoding="utf-8") and "make test" in ci


def test_readme_commands_use_only_flags_the_programs_have():
    """Every --flag after train.py, sample.py, forecast.py, evaluate.py or serve.py (or their
    installed commands) in the README's shell examples is one of that program's options."""
    parsers = {"train": cli.train_parser(), "sample": cli.sample_parser(),
               "forecast": cli.forecast_parser(), "evaluate": cli.evaluate_parser(),
               "serve": cli.serve_parser()}
    options = {name: option_strings(p) for name, p in parsers.items()}
    commands = 0
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"(?:^|[\s/])(?:transformer-jax-)?"
                              r"(train|sample|forecast|evaluate|serve)(?:\.py)?\s(.*)",
                              line.split("#")[0])
            if found:
                commands += 1
                flags = re.findall(r"(?<!\S)--[a-z][a-z0-9-]*", found.group(2))
                unknown = [f for f in flags if f not in options[found.group(1)]]
                assert not unknown, (line, unknown)
    assert commands >= 10
