"""The metric classes (`lightning_caopd.metrics.classes`): loop references, bins, states, flags."""

import itertools
import math

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection

from lightning_caopd.metrics import (
    AURC,
    BrierScore,
    BrierScoreAll,
    CalibrationMetrics,
    ExpectedCalibrationError,
    FormatRate,
    MeanAccuracy,
    MeanConfidence,
    OverconfidenceGap,
    StrictPairwiseRanking,
)
from tests.fixtures.metric_references import (
    CASES,
    TOL,
    make_case,
    ref_accuracy,
    ref_aurc,
    ref_brier,
    ref_ece_quantile,
    ref_ece_uniform,
    ref_mean_confidence,
    ref_ocg,
    ref_spr,
)

METRICS = {
    "accuracy": (MeanAccuracy, ref_accuracy),
    "mean_confidence": (MeanConfidence, ref_mean_confidence),
    "brier": (BrierScore, ref_brier),
    "brier_all": (BrierScoreAll, ref_brier),  # every confidence stated: the plain Brier score
    "ocg": (OverconfidenceGap, ref_ocg),
    "ece_uniform": (lambda: ExpectedCalibrationError(10), ref_ece_uniform),
    "ece_uniform_7": (lambda: ExpectedCalibrationError(7), lambda c, y: ref_ece_uniform(c, y, 7)),
    "ece_quantile": (lambda: ExpectedCalibrationError(10, "quantile"), ref_ece_quantile),
    "ece_quantile_4": (
        lambda: ExpectedCalibrationError(4, strategy="quantile"),
        lambda c, y: ref_ece_quantile(c, y, 4),
    ),
    "spr": (StrictPairwiseRanking, ref_spr),
    "aurc": (AURC, ref_aurc),
}


def feed(metric, c, y, chunks=(0.3, 0.1)):
    """Update in several uneven chunks (some possibly empty)."""
    n = len(c)
    cuts = sorted({0, n, *(int(f * n) for f in chunks)})
    for lo, hi in itertools.pairwise(cuts):
        metric.update(torch.tensor(c[lo:hi]), torch.tensor(y[lo:hi]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(METRICS))
def test_metric_matches_reference(name, case):
    factory, reference = METRICS[name]
    c, y = make_case(case)
    metric = factory()
    feed(metric, c, y)
    assert float(metric.compute()) == pytest.approx(reference(list(c), list(y)), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", list(METRICS))
def test_metric_matches_reference_more_seeds(name, seed):
    factory, reference = METRICS[name]
    c, y = make_case("ties" if seed % 2 else "random", seed=seed + 10)
    metric = factory()
    feed(metric, c, y, chunks=(0.5, 0.51, 0.9))
    assert float(metric.compute()) == pytest.approx(reference(list(c), list(y)), abs=TOL)


@pytest.mark.parametrize("name", list(METRICS))
def test_update_order_does_not_matter(name):
    factory, _ = METRICS[name]
    c, y = make_case("ties", seed=3)
    perm = np.random.default_rng(1).permutation(len(c))
    a, b = factory(), factory()
    feed(a, c, y)
    feed(b, c[perm], y[perm], chunks=(0.77,))
    assert float(a.compute()) == pytest.approx(float(b.compute()), abs=1e-12)


def test_uniform_bin_edges():
    metric = ExpectedCalibrationError(n_bins=10)
    for dtype in (torch.float32, torch.float64):
        metric.update(torch.tensor([0.0, 0.7, 0.1, 1.0, 0.95], dtype=dtype), torch.ones(5))
    assert metric.bin_count.tolist() == [2, 2, 0, 0, 0, 0, 0, 2, 0, 4]


def test_quantile_ties_share_a_bin_and_few_samples():
    metric = ExpectedCalibrationError(n_bins=4, strategy="quantile")
    c = [0.2, 0.2, 0.2, 0.2, 0.9, 0.9]
    y = [1, 0, 1, 0, 0, 1]
    metric.update(torch.tensor(c), torch.tensor(y))
    table = metric.reliability_table()
    # Lower edges s[0], s[1], s[3], s[4] = .2, .2, .2, .9: the tied .2s share the third bin.
    assert table["count"].tolist() == [0, 0, 4, 2]
    assert table["lower"].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.9])
    assert float(metric.compute()) == pytest.approx(ref_ece_quantile(c, y, 4), abs=TOL)
    few = ExpectedCalibrationError(n_bins=10, strategy="quantile")
    few.update(torch.tensor([0.3, 0.8]), torch.tensor([0, 1]))
    assert int(few.reliability_table()["count"].sum()) == 2
    assert float(few.compute()) == pytest.approx(0.25, abs=TOL)


def test_empty_metrics():
    for metric in (
        MeanAccuracy(),
        BrierScore(),
        ExpectedCalibrationError(),
        AURC(),
        FormatRate(),
        ExpectedCalibrationError(strategy="quantile"),
    ):
        with pytest.warns(UserWarning, match="before the ``update``"):
            assert math.isnan(float(metric.compute()))
    with pytest.warns(UserWarning):
        assert float(StrictPairwiseRanking().compute()) == 0.0


def test_format_rate():
    metric = FormatRate()
    metric.update(torch.tensor([0.1, float("nan")]))
    metric.update(torch.tensor([float("nan"), float("nan"), 1.0]), torch.tensor([1, 0, 1]))
    assert float(metric.compute()) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("confidence", "correct", "match"),
    [
        (torch.tensor([0.5, 0.5]), torch.tensor([1]), "same shape"),
        (torch.tensor([1, 0]), torch.tensor([1, 0]), "float tensor"),
        (torch.tensor([0.5, float("nan")]), torch.tensor([1, 0]), r"\[0, 1\]"),
        (torch.tensor([0.5, 1.5]), torch.tensor([1, 0]), r"\[0, 1\]"),
        (torch.tensor([0.5, 0.5]), torch.tensor([2, 0]), "0 and 1"),
    ],
)
def test_validation(confidence, correct, match):
    with pytest.raises(ValueError, match=match):
        BrierScore().update(confidence, correct)
    if "nan" not in str(confidence):  # BrierScoreAll takes NaN; it checks everything else
        with pytest.raises(ValueError, match=match):
            BrierScoreAll().update(confidence, correct)


@pytest.mark.parametrize("seed", range(3))
def test_brier_all_scores_unstated_as_the_worst(seed):
    rng = np.random.default_rng(seed)
    c = np.round(rng.random(50), 2)
    y = rng.random(50) < c
    c[rng.random(50) < 0.3] = np.nan
    metric = BrierScoreAll()
    feed(metric, c, y)
    want = np.mean([1.0 if np.isnan(ci) else (ci - yi) ** 2 for ci, yi in zip(c, y, strict=True)])
    assert float(metric.compute()) == pytest.approx(want, abs=TOL)
    silent = BrierScoreAll()
    silent.update(torch.full((4,), float("nan")), torch.tensor([1, 0, 1, 0]))
    assert float(silent.compute()) == 1.0
    with pytest.raises(ValueError, match="0 and 1"):  # a NaN beside a bad verdict is refused
        BrierScoreAll().update(torch.tensor([float("nan"), 0.5]), torch.tensor([2, 0]))


def test_constructor_validation():
    with pytest.raises(ValueError, match="n_bins"):
        ExpectedCalibrationError(n_bins=0)
    with pytest.raises(ValueError, match="strategy"):
        ExpectedCalibrationError(strategy="equal")
    with pytest.raises(ValueError, match="Duplicate"):
        CalibrationMetrics(["a", "a"])


def test_user_collection_never_merges_sum_metrics():
    # Equal first batches (all correct, confidence 1) must not fuse accuracy with confidence.
    coll = MetricCollection(
        {"acc": MeanAccuracy(), "conf": MeanConfidence(), "ocg": OverconfidenceGap()}
    )
    coll.update(torch.ones(3), torch.ones(3))
    coll.update(torch.zeros(3), torch.ones(3))
    out = coll.compute()
    assert float(out["acc"]) == 1.0
    assert float(out["conf"]) == 0.5
    assert float(out["ocg"]) == -0.5


def test_metric_flags():
    for cls in (
        MeanAccuracy,
        MeanConfidence,
        BrierScore,
        BrierScoreAll,
        OverconfidenceGap,
        StrictPairwiseRanking,
        AURC,
        FormatRate,
        ExpectedCalibrationError,
    ):
        assert cls.full_state_update is False
        assert cls.is_differentiable is False
        assert cls.plot_lower_bound is not None and cls.plot_upper_bound is not None
    assert StrictPairwiseRanking.higher_is_better is True
    assert ExpectedCalibrationError.higher_is_better is False
    assert AURC.higher_is_better is False
    assert BrierScoreAll.higher_is_better is False


def test_sum_states_are_fixed_size():
    metric = ExpectedCalibrationError(n_bins=15)
    for _ in range(4):
        metric.update(torch.rand(100), torch.rand(100) < 0.5)
    states = ("bin_count", "bin_confidence", "bin_correct")
    assert all(getattr(metric, s).shape == (15,) for s in states)
    assert metric._reductions.keys() == {"bin_count", "bin_confidence", "bin_correct"}
