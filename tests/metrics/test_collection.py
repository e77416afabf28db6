"""`CalibrationMetrics` (`lightning_caopd.metrics.collection`): overall, by category, edge cases."""

import json

import numpy as np
import pytest
import torch

from lightning_caopd.metrics import CalibrationMetrics
from tests.fixtures.metric_references import (
    TOL,
    ref_accuracy,
    ref_aurc,
    ref_auroc,
    ref_brier,
    ref_ece_uniform,
    ref_mean_confidence,
    ref_ocg,
    ref_spr,
)


def ref_all(c, y):
    c, y = list(c), list(y)
    out = {
        "accuracy": ref_accuracy(c, y),
        "mean_confidence": ref_mean_confidence(c, y),
        "ece": ref_ece_uniform(c, y),
        "brier": ref_brier(c, y),
        "ocg": ref_ocg(c, y),
        "spr": ref_spr(c, y),
        "aurc": ref_aurc(c, y),
        "n": len(c),
    }
    out["auroc"] = ref_auroc(c, y) if 0 < sum(y) < len(y) else None
    return out


def assert_matches(got, want):
    for key, value in want.items():
        if value is None or isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, abs=TOL), key


def calibration_data(seed=0, n=240):
    rng = np.random.default_rng(seed)
    raw = np.round(rng.random(n), 2)
    y = rng.random(n) < raw
    raw[rng.random(n) < 0.15] = np.nan
    cat = rng.integers(0, 3, size=n)
    cat[(cat == 2) & ~y] = 1  # category "c" holds only correct answers: AUROC undefined there
    return raw, y, cat


def test_calibration_metrics_overall_and_by_category():
    raw, y, cat = calibration_data()
    metrics = CalibrationMetrics(["a", "b", "c", "empty"], fallback_confidence=0.25)
    for lo, hi in [(0, 50), (50, 51), (51, 51), (51, 240)]:
        metrics.update(torch.tensor(raw[lo:hi]), torch.tensor(y[lo:hi]), torch.tensor(cat[lo:hi]))
    result = metrics.compute()
    filled = np.where(np.isnan(raw), 0.25, raw)
    assert_matches(result, ref_all(filled, y))
    assert result["format_rate"] == pytest.approx(np.mean(~np.isnan(raw)))
    assert set(result["by_category"]) == {"a", "b", "c"}
    for index, name in enumerate(["a", "b", "c"]):
        subset = cat == index
        got = result["by_category"][name]
        assert_matches(got, ref_all(filled[subset], y[subset]))
        assert got["format_rate"] == pytest.approx(np.mean(~np.isnan(raw[subset])))
        assert "by_category" not in got
    assert result["by_category"]["c"]["auroc"] is None
    assert result["auroc"] is not None
    json.dumps(result, allow_nan=False)


def test_calibration_metrics_without_categories_and_reset():
    raw, y, _ = calibration_data(seed=1, n=60)
    metrics = CalibrationMetrics()
    metrics.update(torch.tensor(raw), torch.tensor(y))
    first = metrics.compute()
    assert first["by_category"] == {}
    assert_matches(first, ref_all(np.where(np.isnan(raw), 0.0, raw), y))
    metrics.reset()
    empty = metrics.compute()
    assert empty["n"] == 0 and empty["ece"] is None and empty["format_rate"] is None
    metrics.update(torch.tensor(raw[:10]), torch.tensor(y[:10]))
    assert metrics.compute()["n"] == 10


def test_calibration_metrics_all_unparseable_and_single_class():
    metrics = CalibrationMetrics(fallback_confidence=0.0)
    metrics.update(torch.full((5,), float("nan")), torch.ones(5, dtype=torch.bool))
    result = metrics.compute()
    assert result["format_rate"] == 0.0
    assert result["auroc"] is None
    assert result["spr"] == 0.0
    assert result["ece"] == pytest.approx(1.0)
    assert result["ocg"] == pytest.approx(-1.0)


def test_calibration_metrics_category_errors():
    metrics = CalibrationMetrics(["a", "b"])
    c, y = torch.tensor([0.5, 0.5]), torch.tensor([1, 0])
    with pytest.raises(ValueError, match="required"):
        metrics.update(c, y)
    with pytest.raises(ValueError, match="below 2"):
        metrics.update(c, y, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="as many elements"):
        metrics.update(c, y, torch.tensor([0]))
    with pytest.raises(ValueError, match="below 0"):
        CalibrationMetrics().update(c, y, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.update(torch.tensor([float("nan"), 1.5]), y, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(c, torch.tensor([1, 0, 1]), torch.tensor([0, 1]))
    assert metrics.compute()["n"] == 0  # nothing half-applied


def test_negative_category_counts_overall_only():
    c, y = torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([1, 0, 0, 1])
    metrics = CalibrationMetrics(["a", "b"])
    metrics.update(c, y, torch.tensor([0, -1, 0, -1]))
    result = metrics.compute()
    assert result["n"] == 4
    assert set(result["by_category"]) == {"a"}
    assert_matches(result["by_category"]["a"], ref_all([0.9, 0.6], [1, 0]))
    plain = CalibrationMetrics()
    plain.update(c, y, torch.full((4,), -1))  # a task without categories may still pass -1
    assert_matches(plain.compute(), ref_all(c.double().tolist(), y.tolist()))


def test_spr_and_aurc_share_one_copy_of_the_values():
    metrics = CalibrationMetrics()
    for _ in range(3):
        metrics.update(torch.rand(8), torch.rand(8) < 0.5)
    metrics.compute()
    group = metrics.overall
    assert group.metric("spr").confidence is group.metric("aurc").confidence
