"""Tests for tutorial.ipynb: it runs from scratch in a fresh kernel, the tiny pipeline included."""
import os

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tutorial_notebook_runs_from_scratch(tmp_path, monkeypatch):
    """Every cell runs without error and the pipeline writes its report into the temporary folder."""
    out = tmp_path / "tutorial"
    monkeypatch.setenv("FINEGRAIN_TUTORIAL_OUT", str(out))  # the notebook's run folder; empty, so every stage runs
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # One thread: on a busy 2-core machine the tiny pipeline takes ~1 min instead of several.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    nb = nbformat.read(os.path.join(ROOT, "tutorial.ipynb"), as_version=4)
    for cell in nb.cells:  # start from a clean notebook, whatever outputs are saved in it
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel inherits this process's environment; cwd is the repo root so the project imports.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()  # raises CellExecutionError
    assert (out / "results.md").exists() and (out / "learning_curves.png").exists()
    assert not any(o.output_type == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
