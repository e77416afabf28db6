"""The notebook runs headless on the tiny configuration and shows the table and the figures."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "caopd_toy.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_tiny(toy_base, tmp_path, monkeypatch):
    out = tmp_path / "nb_runs"
    monkeypatch.setenv("CAOPD_NB_TINY", "1")
    monkeypatch.setenv("CAOPD_NB_OUT", str(out))
    monkeypatch.setenv("CAOPD_NB_BASE", str(toy_base))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()

    assert (out / "opd" / "metrics.json").exists() and (out / "caopd" / "metrics.json").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| base | 1 |" in markdown and "| opd | 1 |" in markdown and "| caopd | 1 |" in markdown
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    for name in (
        "report.md",
        "confidence_vs_accuracy.png",
        "accuracy_vs_ece.png",
        "reliability.png",
    ):
        assert (out / name).stat().st_size > 0
