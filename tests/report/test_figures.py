"""The report's figures: the Pareto front, the pooled reliability bins, size labels."""

import doctest
import math

import pytest
import torch

from lightning_caopd.metrics import ExpectedCalibrationError
from lightning_caopd.report import figures
from lightning_caopd.report.figures import pareto_front, pooled_bins, reliability_grid


def test_doctests():
    result = doctest.testmod(figures)  # pareto_front, count_label
    assert result.attempted >= 2 and result.failed == 0


def test_base_rows_are_grey_and_methods_coloured():
    palette = figures.colors(["base (20K params)", "opd", "base (1.2M params)", "caopd"])
    assert palette["opd"] != palette["caopd"] and palette["opd"][0] == "#"
    assert {palette["base (20K params)"], palette["base (1.2M params)"]} == {"0.65", "0.25"}


def test_pareto_front():
    points = [(0.10, 0.50), (0.20, 0.70), (0.30, 0.60), (0.10, 0.40), (0.05, 0.45)]
    assert pareto_front(points) == [0, 1, 4]


def _bins(confidence: list[float], correct: list[int]) -> dict[str, list]:
    """The JSON-ready bins a metrics.json keeps (None for an empty bin's means)."""
    metric = ExpectedCalibrationError(n_bins=5)
    metric.update(torch.tensor(confidence), torch.tensor(correct))
    table = metric.reliability_table()
    return {
        k: [None if isinstance(x, float) and math.isnan(x) else x for x in v.tolist()]
        for k, v in table.items()
    }


def test_pooled_bins_equal_one_metric_over_all_samples(tmp_path):
    a = ([0.1, 0.9, 0.9, 0.5], [0, 1, 0, 1])
    b = ([0.3, 0.95, 0.15], [1, 1, 0])
    bins, ece = pooled_bins([{"reliability": _bins(*a)}, {"reliability": _bins(*b)}])
    both = ExpectedCalibrationError(n_bins=5)
    both.update(torch.tensor(a[0] + b[0]), torch.tensor(a[1] + b[1]))
    want = both.reliability_table()
    assert bins["count"] == want["count"].tolist()
    for key in ("confidence", "accuracy"):
        assert [x is None for x in bins[key]] == want[key].isnan().tolist()
        got = [x for x in bins[key] if x is not None]
        assert got == pytest.approx(want[key][~want[key].isnan()].tolist())
    assert ece == pytest.approx(float(both.compute()))
    assert pooled_bins([{"reliability": bins}, {}]) is None  # a run without saved bins
    groups = {"base": [{"reliability": _bins(*a)}], "opd": [{"reliability": bins}] * 2}
    png = reliability_grid(groups, tmp_path / "reliability.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
