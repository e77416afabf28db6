import doctest
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection

from lightning_caopd import metrics as M
from lightning_caopd.metrics import (
    AURC,
    BrierScore,
    CalibrationMetrics,
    ExpectedCalibrationError,
    FormatRate,
    MeanAccuracy,
    MeanConfidence,
    OverconfidenceGap,
    StrictPairwiseRanking,
)
from lightning_caopd.metrics import classes, collection, functional, plot

TOL = 1e-6

# ---------------------------------------------------------------- NumPy references (loops)


def ref_accuracy(c, y):
    return sum(y) / len(y)


def ref_mean_confidence(c, y):
    return sum(c) / len(c)


def ref_brier(c, y):
    return sum((ci - yi) ** 2 for ci, yi in zip(c, y)) / len(c)


def ref_ocg(c, y):
    return sum(ci - yi for ci, yi in zip(c, y)) / len(c)


def _ece_from_bins(c, y, bin_of, n_bins):
    total = 0.0
    for b in range(n_bins):
        members = [i for i in range(len(c)) if bin_of[i] == b]
        if members:
            conf = sum(c[i] for i in members) / len(members)
            acc = sum(y[i] for i in members) / len(members)
            total += len(members) / len(c) * abs(conf - acc)
    return total


def ref_ece_uniform(c, y, n_bins=10):
    bin_of = []
    for ci in c:
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            if lo <= ci < hi or (b == n_bins - 1 and ci == 1.0):
                bin_of.append(b)
                break
    assert len(bin_of) == len(c)
    return _ece_from_bins(c, y, bin_of, n_bins)


def ref_ece_quantile(c, y, n_bins=10):
    s = sorted(c)
    n = len(c)
    edges = [s[(b * n) // n_bins] for b in range(n_bins)]
    bin_of = []
    for ci in c:
        for b in range(n_bins):
            upper = edges[b + 1] if b + 1 < n_bins else math.inf
            if edges[b] <= ci < upper:
                bin_of.append(b)
                break
    assert len(bin_of) == len(c)
    return _ece_from_bins(c, y, bin_of, n_bins)


def ref_spr(c, y):
    pos = [ci for ci, yi in zip(c, y) if yi]
    neg = np.array([ci for ci, yi in zip(c, y) if not yi])
    if not pos or not len(neg):
        return 0.0
    return sum(int((neg < p).sum()) for p in pos) / (len(pos) * len(neg))


def ref_auroc(c, y):
    pos = [ci for ci, yi in zip(c, y) if yi]
    neg = [ci for ci, yi in zip(c, y) if not yi]
    credit = 0.0
    for p in pos:
        for q in neg:
            credit += 1.0 if p > q else 0.5 if p == q else 0.0
    return credit / (len(pos) * len(neg))


def ref_aurc(c, y):
    """Expected AURC over random tie orders: walk the distinct confidences from the top."""
    n = len(c)
    risks = []
    errors_above, ranked = 0, 0
    for value in sorted(set(c), reverse=True):
        group = [1 - yi for ci, yi in zip(c, y) if ci == value]
        m, e = len(group), sum(group)
        for j in range(1, m + 1):
            risks.append((errors_above + j * e / m) / (ranked + j))
        errors_above += e
        ranked += m
    assert len(risks) == n
    return sum(risks) / n


def brute_aurc(c, y):
    """Average AURC over every order of the tied samples (tiny inputs only)."""
    values = sorted(set(c), reverse=True)
    groups = [[1 - yi for ci, yi in zip(c, y) if ci == v] for v in values]
    results = []
    for orders in itertools.product(*(list(itertools.permutations(g)) for g in groups)):
        errors = [e for order in orders for e in order]
        results.append(np.mean([sum(errors[:k]) / k for k in range(1, len(errors) + 1)]))
    return float(np.mean(results))


# ---------------------------------------------------------------- cases


def make_case(name, seed=0):
    rng = np.random.default_rng(seed)
    n = 157
    c = rng.random(n).astype(np.float32).astype(np.float64)
    if name == "random":
        y = rng.random(n) < c
    elif name == "ties":
        c = np.round(c, 1)
        y = rng.random(n) < c
    elif name == "all_correct":
        y = np.ones(n, dtype=bool)
    elif name == "all_wrong":
        y = np.zeros(n, dtype=bool)
    elif name == "n1":
        c, y = c[:1], np.array([True])
    elif name == "n1_wrong":
        c, y = c[:1], np.array([False])
    elif name == "extremes":
        c = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], size=n)
        y = rng.random(n) < 0.5
    else:
        raise ValueError(name)
    return c, y.astype(bool)


CASES = ["random", "ties", "all_correct", "all_wrong", "n1", "n1_wrong", "extremes"]

METRICS = {
    "accuracy": (MeanAccuracy, ref_accuracy),
    "mean_confidence": (MeanConfidence, ref_mean_confidence),
    "brier": (BrierScore, ref_brier),
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


def test_functional_matches_classes():
    c, y = make_case("ties", seed=4)
    ct, yt = torch.tensor(c), torch.tensor(y)
    pairs = [
        (M.expected_calibration_error(ct, yt), ref_ece_uniform(list(c), list(y))),
        (
            M.expected_calibration_error(ct, yt, strategy="quantile"),
            ref_ece_quantile(list(c), list(y)),
        ),
        (M.brier_score(ct, yt), ref_brier(c, y)),
        (M.overconfidence_gap(ct, yt), ref_ocg(c, y)),
        (M.strict_pairwise_ranking(ct, yt), ref_spr(c, y)),
        (M.aurc(ct, yt), ref_aurc(list(c), list(y))),
    ]
    for got, want in pairs:
        assert float(got) == pytest.approx(want, abs=TOL)


# ---------------------------------------------------------------- metric-specific behaviour


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


def test_spr_ties_get_no_credit_and_empty_side_is_zero():
    tied = M.strict_pairwise_ranking(torch.full((4,), 0.5), torch.tensor([1, 0, 1, 0]))
    assert float(tied) == 0.0
    assert float(M.strict_pairwise_ranking(torch.tensor([0.1, 0.9]), torch.tensor([1, 1]))) == 0.0
    assert float(M.strict_pairwise_ranking(torch.tensor([0.1, 0.9]), torch.tensor([0, 0]))) == 0.0
    assert float(M.strict_pairwise_ranking(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]))) == 1.0


def test_spr_large_input_is_fast_and_matches_count():
    rng = np.random.default_rng(0)
    c = np.round(rng.random(200_000), 2)
    y = rng.random(200_000) < c
    got = float(M.strict_pairwise_ranking(torch.tensor(c), torch.tensor(y)))
    pos, neg = np.sort(c[y]), np.sort(c[~y])
    want = np.searchsorted(neg, pos, side="left").sum() / (len(pos) * len(neg))
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_aurc_reference_is_the_average_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    c = list(rng.choice([0.2, 0.5, 0.8], size=7))
    y = list(rng.random(7) < 0.5)
    assert ref_aurc(c, y) == pytest.approx(brute_aurc(c, y), abs=1e-12)
    got = float(M.aurc(torch.tensor(c), torch.tensor(y)))
    assert got == pytest.approx(brute_aurc(c, y), abs=TOL)


def test_aurc_extremes():
    assert float(M.aurc(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]))) == pytest.approx(0.25)
    assert float(M.aurc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1]))) == pytest.approx(0.75)
    assert float(M.aurc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))) == pytest.approx(0.5)


def test_empty_metrics():
    for metric in (MeanAccuracy(), BrierScore(), ExpectedCalibrationError(), AURC(), FormatRate(),
                   ExpectedCalibrationError(strategy="quantile")):
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


def test_constructor_validation():
    with pytest.raises(ValueError, match="n_bins"):
        ExpectedCalibrationError(n_bins=0)
    with pytest.raises(ValueError, match="strategy"):
        ExpectedCalibrationError(strategy="equal")
    with pytest.raises(ValueError, match="fallback"):
        CalibrationMetrics(fallback_confidence=2.0)
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
    for cls in (MeanAccuracy, MeanConfidence, BrierScore, OverconfidenceGap, StrictPairwiseRanking,
                AURC, FormatRate, ExpectedCalibrationError):
        assert cls.full_state_update is False
        assert cls.is_differentiable is False
        assert cls.plot_lower_bound is not None and cls.plot_upper_bound is not None
    assert StrictPairwiseRanking.higher_is_better is True
    assert ExpectedCalibrationError.higher_is_better is False
    assert AURC.higher_is_better is False


def test_sum_states_are_fixed_size():
    metric = ExpectedCalibrationError(n_bins=15)
    for _ in range(4):
        metric.update(torch.rand(100), torch.rand(100) < 0.5)
    states = ("bin_count", "bin_confidence", "bin_correct")
    assert all(getattr(metric, s).shape == (15,) for s in states)
    assert metric._reductions.keys() == {"bin_count", "bin_confidence", "bin_correct"}


# ---------------------------------------------------------------- CalibrationMetrics


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


def test_doctests():
    import matplotlib.pyplot as plt

    for module in (functional, classes, collection, plot, M):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
    plt.close("all")
