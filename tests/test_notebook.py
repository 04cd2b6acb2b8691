"""Tests for docs/lecture.ipynb: it runs top to bottom, and the committed copy is not stale.

The fast tests read the committed notebook only: its code cells ran in order, each since its
last edit (the hash of its source that docs/execute_notebook.py stamped equals the hash of the
source now), none ended in an error or wrote to stderr, and each cell that draws holds its
picture. The slow test executes a copy with nbclient, as `docs/execute_notebook.py` does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "lecture.ipynb"
CELL_TIMEOUT = 300  # seconds; the slowest cell, the lecture model's training, takes about 30


def _load_executor():
    """docs/execute_notebook.py as a module (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location("execute_notebook",
                                                  REPO / "docs" / "execute_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


executor = _load_executor()


def code_cells(notebook: nbformat.NotebookNode) -> list:
    """The notebook's code cells, in order."""
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def check_ran_in_order_since_last_edit(notebook: nbformat.NotebookNode) -> None:
    """Fail unless the code cells ran once each, in order, and none changed since."""
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), (
        "the code cells did not run once each, in order: run python docs/execute_notebook.py")
    stale = [i for i, cell in enumerate(cells, 1)
             if cell.metadata.get(executor.STAMP) != executor.source_hash(cell.source)]
    assert not stale, (f"code cell(s) {stale} changed since the notebook was executed: run "
                       "python docs/execute_notebook.py")


def test_committed_notebook_ran_every_cell_in_order_since_its_last_edit():
    check_ran_in_order_since_last_edit(nbformat.read(NOTEBOOK, as_version=4))


def test_committed_notebook_holds_no_error_nor_warning_and_every_picture():
    for i, cell in enumerate(code_cells(nbformat.read(NOTEBOOK, as_version=4)), 1):
        kinds = [output.output_type for output in cell.outputs]
        assert "error" not in kinds, f"code cell {i} ended in an error"
        stderr = [o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, f"code cell {i} wrote to stderr: {stderr[0][:200]}"
        if "plt.show()" in cell.source or "Image(" in cell.source:
            assert any("image/png" in output.get("data", {}) for output in cell.outputs), (
                f"code cell {i} draws a picture but holds none")


@pytest.mark.slow
def test_notebook_executes_top_to_bottom(tmp_path):
    # nbclient raises CellExecutionError on a cell that raises, and a timeout error on one that
    # runs past CELL_TIMEOUT; the copy is stamped as the committed one must be, and the
    # committed one is left as it was.
    committed = NOTEBOOK.read_bytes()
    executor.execute(NOTEBOOK, tmp_path / "lecture.ipynb", timeout=CELL_TIMEOUT)
    check_ran_in_order_since_last_edit(nbformat.read(tmp_path / "lecture.ipynb", as_version=4))
    assert NOTEBOOK.read_bytes() == committed
