"""`CalibrationMetrics` (`lightning_caopd.metrics.collection`): overall, by category, edge cases."""

import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from lightning_caopd.metrics import (
    AURC,
    BrierScore,
    CalibrationMetrics,
    ExpectedCalibrationError,
    MeanAccuracy,
    MeanConfidence,
    OverconfidenceGap,
    StrictPairwiseRanking,
)
from tests.fixtures.metric_references import (
    TOL,
    make_case,
    ref_accuracy,
    ref_aurc,
    ref_auroc,
    ref_brier,
    ref_ece_uniform,
    ref_mean_confidence,
    ref_ocg,
    ref_spr,
)

STATED_KEYS = ("accuracy_stated", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc")


def ref_brier_all(c, y):
    """Brier over every item; NaN (nothing stated) costs the worst squared error, 1."""
    return sum(1.0 if math.isnan(ci) else (ci - yi) ** 2 for ci, yi in zip(c, y, strict=True)) / (
        len(c)
    )


def ref_all(c, y):
    """Every value of the suite, by loops: calibration over the stated items only."""
    c, y = [float(ci) for ci in c], [bool(yi) for yi in y]
    pairs = [(ci, yi) for ci, yi in zip(c, y, strict=True) if not math.isnan(ci)]
    sc, sy = [ci for ci, _ in pairs], [yi for _, yi in pairs]
    out = {
        "n": len(c),
        "n_stated": len(sc),
        "accuracy": ref_accuracy(c, y),
        "format_rate": len(sc) / len(c),
        "brier_all": ref_brier_all(c, y),
    }
    if not sc:
        return out | dict.fromkeys(STATED_KEYS)
    out |= {
        "accuracy_stated": ref_accuracy(sc, sy),
        "mean_confidence": ref_mean_confidence(sc, sy),
        "ece": ref_ece_uniform(sc, sy),
        "brier": ref_brier(sc, sy),
        "ocg": ref_ocg(sc, sy),
        "spr": ref_spr(sc, sy),
        "aurc": ref_aurc(sc, sy),
        "auroc": ref_auroc(sc, sy) if 0 < sum(sy) < len(sy) else None,
    }
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
    metrics = CalibrationMetrics(["a", "b", "c", "empty"])
    for lo, hi in [(0, 50), (50, 51), (51, 51), (51, 240)]:
        metrics.update(torch.tensor(raw[lo:hi]), torch.tensor(y[lo:hi]), torch.tensor(cat[lo:hi]))
    result = metrics.compute()
    want = ref_all(raw, y)
    assert_matches(result, want)
    assert result.keys() == want.keys() | {"by_category"}
    assert 0 < result["n_stated"] < result["n"] == 240
    assert set(result["by_category"]) == {"a", "b", "c"}
    for index, name in enumerate(["a", "b", "c"]):
        subset = cat == index
        got = result["by_category"][name]
        assert_matches(got, ref_all(raw[subset], y[subset]))
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
    assert_matches(first, ref_all(raw, y))
    metrics.reset()
    empty = metrics.compute()
    assert empty["n"] == 0 and empty["n_stated"] == 0
    assert all(empty[k] is None for k in ("ece", "format_rate", "accuracy", "brier_all"))
    metrics.update(torch.tensor(raw[:10]), torch.tensor(y[:10]))
    assert metrics.compute()["n"] == 10


def test_no_stated_confidence_is_undefined_calibration_not_perfect():
    # A model that never states a confidence, on wrong answers: the old fallback (confidence 0)
    # scored it ECE 0 and Brier 0. Now its calibration is undefined and brier_all is the worst.
    metrics = CalibrationMetrics(["a", "b"])
    nan = float("nan")
    metrics.update(torch.full((6,), nan), torch.tensor([0, 0, 0, 0, 0, 1]), torch.tensor([0] * 6))
    result = metrics.compute()
    assert result["n"] == 6 and result["n_stated"] == 0 and result["format_rate"] == 0.0
    assert result["accuracy"] == pytest.approx(1 / 6)
    assert all(result[k] is None for k in STATED_KEYS)
    assert result["brier_all"] == 1.0
    assert result["by_category"]["a"]["ece"] is None and "b" not in result["by_category"]
    assert all(x is None for x in metrics.reliability_bins()["accuracy"])
    assert sum(metrics.reliability_bins()["count"]) == 0
    json.dumps(result, allow_nan=False)
    # one stated item makes calibration defined; one class only: SPR 0, AUROC undefined
    metrics.update(torch.tensor([0.3]), torch.tensor([1]), torch.tensor([1]))
    result = metrics.compute()
    assert result["n_stated"] == 1 and result["ece"] == pytest.approx(0.7)
    assert result["spr"] == 0.0 and result["auroc"] is None
    assert result["by_category"]["a"]["ece"] is None
    assert result["by_category"]["b"]["brier"] == pytest.approx(0.49)


def test_all_stated_gives_what_each_metric_gives_on_all_items():
    # With every confidence stated the suite's numbers are exactly (==) those of each metric
    # fed every item, as before unstated items were set apart; brier_all equals brier.
    c, y = make_case("ties", seed=5)
    metrics = CalibrationMetrics()
    singles = {
        "accuracy": MeanAccuracy(),
        "mean_confidence": MeanConfidence(),
        "ece": ExpectedCalibrationError(),
        "brier": BrierScore(),
        "ocg": OverconfidenceGap(),
        "spr": StrictPairwiseRanking(),
        "aurc": AURC(),
        "auroc": BinaryAUROC(),
    }
    for lo, hi in [(0, 60), (60, 60), (60, len(c))]:
        ct, yt = torch.tensor(c[lo:hi]), torch.tensor(y[lo:hi])
        metrics.update(ct, yt)
        for metric in singles.values():
            metric.update(ct, yt.long())
    result = metrics.compute()
    assert result["format_rate"] == 1.0 and result["n_stated"] == result["n"] == len(c)
    for name, metric in singles.items():
        assert result[name] == float(metric.compute()), name
    assert result["brier_all"] == result["brier"]
    assert result["accuracy_stated"] == result["accuracy"]


@pytest.mark.parametrize("seed", range(4))
def test_stating_a_confidence_never_raises_brier_all(seed):
    # brier_all cannot be won by staying silent: hiding any stated confidence never lowers it.
    raw, y, _ = calibration_data(seed=seed, n=80)
    hidden = raw.copy()
    hidden[np.random.default_rng(seed).random(80) < 0.5] = np.nan
    scores = []
    for values in (raw, hidden, np.full(80, np.nan)):
        metrics = CalibrationMetrics()
        metrics.update(torch.tensor(values), torch.tensor(y))
        scores.append(metrics.compute()["brier_all"])
    assert scores[0] <= scores[1] <= scores[2] == 1.0
    assert scores[0] < scores[2]


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
