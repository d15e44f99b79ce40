"""The classroom notebooks run top to bottom, and the committed copies hold their outputs.

    python -m pytest -q tests/test_notebooks.py
        executes every notebooks/*.ipynb (a copy in memory; the committed files are not touched)
    python tests/test_notebooks.py notebooks/NAME.ipynb
        executes NAME in place, outputs included, and prints its run time: do this before committing
        (no time limit per cell: notebook 03's FULL setting trains for minutes in one cell)

Each notebook runs in a fresh `python3` kernel (ipykernel, on this interpreter) with the notebook's
own folder as the working directory, as Jupyter does; its first cell finds the repository's root
and puts it on the module path.
"""
import pathlib
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parent.parent     # (not helpers': this file runs alone too)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300        # one cell; a notebook that needs longer is too slow for a class anyway
NOTEBOOK_BUDGET_S = 180     # the whole notebook on 2 CPU cores (issue 12: at most 3 minutes)


def execute(path, timeout=CELL_TIMEOUT_S):
    """Run the notebook at `path` in a fresh kernel, each cell within `timeout` seconds (None: no
    limit); returns (executed notebook, seconds)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()          # raises CellExecutionError, naming the cell, on the first error
    return nb, time.perf_counter() - start


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb, seconds = execute(path)
    errors = [out for cell in code_cells(nb) for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {[e.ename for e in errors]}"
    assert seconds < NOTEBOOK_BUDGET_S, f"{path.name} took {seconds:.0f} s on this machine"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_with_outputs(path):
    # The committed file must render on a code host: executed once, top to bottom, no errors.
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    counts = [cell.execution_count for cell in code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts}; run `python tests/test_notebooks.py {path}` "
        "and commit")
    assert any(cell.outputs for cell in code_cells(nb)), f"{path.name} has no outputs"
    errors = [out for cell in code_cells(nb) for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: committed with error outputs"


def main(argv):
    if not argv:
        usage = "python tests/test_notebooks.py notebooks/NAME.ipynb"
        print(f"error: no notebook given (usage: {usage})", file=sys.stderr)
        return 2
    paths = [pathlib.Path(arg).resolve() for arg in argv]
    missing = [str(p) for p in paths if p.suffix != ".ipynb" or not p.is_file()]
    if missing:
        print(f"error: not a notebook file: {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in paths:
        try:
            nb, seconds = execute(path, timeout=None)
        except CellExecutionError as e:
            print(f"error: {path.name}: a cell failed ({e.ename}: {e.evalue}); file left as it was",
                  file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        size = path.stat().st_size
        print(f"{path.name}: executed in {seconds:.1f} s, outputs written ({size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
