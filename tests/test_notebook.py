"""The notebook runs headless on the tiny configuration and shows the table and the figures;
its committed copy holds the outputs of such a run."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "caopd_toy.ipynb"


def test_notebook_is_committed_with_the_outputs_of_a_run():
    # a reader on a code host sees the table and the figures without running anything
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one run, in order
    outputs = [o for c in code for o in c.outputs]
    assert not any(o.output_type == "error" for o in outputs)
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    for row in ("| base | 1 |", "| opd | 1 |", "| caopd | 1 |"):
        assert row in markdown
    images = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3 and all(len(i) > 10_000 for i in images)


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


OWN_TASK = ROOT / "notebooks" / "own_task.ipynb"


def test_own_task_notebook_is_committed_with_its_outputs():
    nb = nbformat.read(OWN_TASK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    assert [c.execution_count for c in code] == [1]
    assert not any(o.output_type == "error" for o in outputs)
    printed = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert "'n': 12" in printed and "['Africa', 'Asia', 'Europe']" in printed


@pytest.mark.slow
def test_own_task_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CAOPD_NB_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(OWN_TASK, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["run"]["steps"] == 3 and metrics["initial"]["n"] == 12
    assert set(metrics["by_category"]) == {"Europe", "Asia", "Africa"}
