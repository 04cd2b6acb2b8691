"""The package's shape: small functions, and no kind of run named outside `tasks/` but where
the kind is derived and where the command line applies its rules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "transformer_jax"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_no_function_is_longer_than_60_lines():
    long = [f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1})"
            for path in MODULES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long


def test_the_run_kind_is_tested_in_at_most_three_places_outside_tasks():
    kind_test = re.compile(r"\.kind\s*[!=]=|columns is (not )?None|init\s*[!=]=\s*\"scratch\"")
    places = set()
    for path in MODULES:
        if "tasks" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    kind_test.search(ast.get_source_segment(path.read_text(), stmt) or "")
                    for stmt in node.body):
                places.add(f"{path.name}:{node.name}")
    assert 0 < len(places) <= 3, places
    assert places == {"config.py:kind", "config.py:_check_kind", "cli.py:resolve_config"}
