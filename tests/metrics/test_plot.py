"""Reliability diagrams (`lightning_caopd.metrics.plot`), the one drawing path for them."""

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_caopd.metrics import BrierScore, CalibrationMetrics, ExpectedCalibrationError
from lightning_caopd.metrics.plot import (
    plot_reliability_diagram,
    reliability_image,
    save_reliability_png,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# metrics.json's "reliability": one empty bin, one overconfident, two underconfident
BINS = {
    "lower": [0.0, 0.25, 0.5, 0.75],
    "upper": [0.25, 0.5, 0.75, 1.0],
    "count": [0, 5, 8, 4],
    "confidence": [None, 0.4, 0.6, 0.8],
    "accuracy": [None, 0.2, 0.875, 1.0],
}


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


def _calibration_data(seed, n):
    """Stated confidences (15% NaN: unparseable), verdicts and three categories."""
    rng = np.random.default_rng(seed)
    raw = np.round(rng.random(n), 2)
    y = rng.random(n) < raw
    raw[rng.random(n) < 0.15] = np.nan
    return raw, y, rng.integers(0, 3, size=n)


def _axes():
    fig = Figure()
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def test_metric_reliability_tables_save_as_png(tmp_path):
    """A collection's overall ECE and a quantile-binned ECE, drawn by `save_reliability_png`."""
    raw, y, cat = _calibration_data(seed=2, n=400)
    metrics = CalibrationMetrics(["a", "b", "c"])
    metrics.update(torch.tensor(raw), torch.tensor(y), torch.tensor(cat))
    overall = metrics.overall.metric("ece")
    path = tmp_path / "deep" / "overall.png"
    _check_png(
        save_reliability_png(overall.reliability_table(), float(overall.compute()), path, "Student")
    )
    ece = ExpectedCalibrationError(n_bins=8, strategy="quantile")
    ece.update(torch.tensor(np.nan_to_num(raw)), torch.tensor(y))
    table, value = ece.reliability_table(), float(ece.compute())
    _check_png(save_reliability_png(table, value, tmp_path / "q.png", strategy="quantile"))


def test_plot_apis():
    import matplotlib.pyplot as plt

    ece = ExpectedCalibrationError()
    ece.update(torch.tensor([0.15, 0.82, 0.85]), torch.tensor([0, 1, 0]))
    fig, ax = ece.plot(title="Demo")
    assert "ECE = 0.2733" in ax.get_title() and "Demo" in ax.get_title()
    assert len(ax.patches) == 2 * 2  # two non-empty bins: accuracy bar + gap bar each
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2"]
    plt.close(fig)
    brier = BrierScore()
    brier.update(torch.tensor([0.3]), torch.tensor([1]))
    fig, ax = brier.plot()
    plt.close(fig)
    assert not plt.get_fignums()


def test_bars_show_each_bins_accuracy_and_gap():
    ax = _axes()
    plot_reliability_diagram(BINS, 0.1, ax=ax)
    bars = {c.get_label(): list(c) for c in ax.containers}
    filled = [i for i, n in enumerate(BINS["count"]) if n]
    heights = [r.get_height() for r in bars["Accuracy"]]
    assert heights == pytest.approx([BINS["accuracy"][i] for i in filled])
    assert [r.get_x() for r in bars["Accuracy"]] == pytest.approx([0.25, 0.5, 0.75])
    # each gap spans from the bin's accuracy to its mean confidence
    gaps = bars["Gap: overconfident"] + bars["Gap: underconfident"]
    spans = sorted((r.get_x(), r.get_y(), r.get_y() + r.get_height()) for r in gaps)
    want = [(BINS["lower"][i], BINS["accuracy"][i], BINS["confidence"][i]) for i in filled]
    assert np.allclose(spans, want)
    # an underconfident gap lies over the bar's top: it must let the bar show up to the accuracy
    for rect in bars["Gap: underconfident"]:
        assert rect.get_facecolor()[3] < 1 and rect.zorder > bars["Accuracy"][0].zorder


def test_tensor_table_and_json_bins_draw_the_same_bars():
    table = {k: torch.tensor([np.nan if x is None else x for x in v]) for k, v in BINS.items()}
    table["count"] = table["count"].long()
    ax_json, ax_tensor = _axes(), _axes()
    plot_reliability_diagram(BINS, 0.1, ax=ax_json)
    plot_reliability_diagram(table, 0.1, ax=ax_tensor)
    bounds = [[p.get_bbox().bounds for p in ax.patches] for ax in (ax_json, ax_tensor)]
    assert len(bounds[0]) == 6 and np.allclose(*bounds)


def test_png_and_image_helpers(tmp_path):
    _check_png(save_reliability_png(BINS, 0.1, tmp_path / "a" / "r.png", title="step 3"))
    image = reliability_image(BINS, 0.1, title="step 3")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.min() < 100 < 250 < image.max()  # drawn, not blank


def test_a_diagram_without_stated_confidences_reads_undefined_not_perfect():
    # metrics.json of a model that never states a confidence: every bin empty, ECE None (the
    # metrics writer passes 0.0 for it); the title must not read "ECE = 0.0000".
    metrics = CalibrationMetrics()
    metrics.update(torch.full((5,), float("nan")), torch.tensor([0, 0, 1, 0, 0]))
    bins = metrics.reliability_bins()
    for ece in (None, 0.0, float("nan")):
        ax = _axes()
        plot_reliability_diagram(bins, ece, ax=ax)
        assert "ECE undefined: no stated confidence (N = 0)" in ax.get_title()
        assert "0.0000" not in ax.get_title() and not ax.containers[0].patches
    ax = _axes()
    plot_reliability_diagram(BINS, 0.1, ax=ax)
    assert "ECE = 0.1000" in ax.get_title() and "N = 17 stated" in ax.get_title()
