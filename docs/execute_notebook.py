"""Execute the lecture notebook in place, so that the committed file shows its outputs.

    .venv/bin/python docs/execute_notebook.py [NOTEBOOK]

Every cell runs top to bottom in a fresh kernel of this Python (ipykernel), from the notebook's
own folder, and each code cell's metadata is stamped with the sha256 of the source it ran
(`source_sha256`): tests/test_notebook.py fails when a cell was edited after the last execution.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().with_name("lecture.ipynb")
STAMP = "source_sha256"


def source_hash(source: str) -> str:
    """The stamp of a cell's source: its UTF-8 sha256 in hex."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def execute(path: Path = NOTEBOOK, out: Path | None = None, *, timeout: int = 300
            ) -> nbformat.NotebookNode:
    """Run `path` in a fresh kernel (working directory: its folder), stamp its code cells and
    write it to `out` (default: over `path`). A cell that raises, or runs longer than `timeout`
    seconds, stops it with nbclient's error and nothing is written."""
    path = Path(path).resolve()
    notebook = nbformat.read(path, as_version=4)
    # "python3" is the kernel of the Python that runs this: jupyter_client starts it with
    # sys.executable.
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.metadata[STAMP] = source_hash(cell.source)
    nbformat.write(notebook, out or path)
    return notebook


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else NOTEBOOK
    began = time.perf_counter()
    execute(path)
    print(f"executed {path} in {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
