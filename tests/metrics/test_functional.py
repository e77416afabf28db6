"""Functional metrics (`lightning_caopd.metrics.functional`): ties, extremes; package doctests."""

import doctest
import itertools

import numpy as np
import pytest
import torch

from lightning_caopd import metrics as M
from lightning_caopd.metrics import classes, collection, functional, plot
from tests.fixtures.metric_references import (
    TOL,
    make_case,
    ref_aurc,
    ref_brier,
    ref_ece_quantile,
    ref_ece_uniform,
    ref_ocg,
    ref_spr,
)


def brute_aurc(c, y):
    """Average AURC over every order of the tied samples (tiny inputs only)."""
    values = sorted(set(c), reverse=True)
    groups = [[1 - yi for ci, yi in zip(c, y, strict=False) if ci == v] for v in values]
    results = []
    for orders in itertools.product(*(list(itertools.permutations(g)) for g in groups)):
        errors = [e for order in orders for e in order]
        results.append(np.mean([sum(errors[:k]) / k for k in range(1, len(errors) + 1)]))
    return float(np.mean(results))


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
        (M.brier_score_all(ct, yt), ref_brier(c, y)),  # all stated: the same
        (M.overconfidence_gap(ct, yt), ref_ocg(c, y)),
        (M.strict_pairwise_ranking(ct, yt), ref_spr(c, y)),
        (M.aurc(ct, yt), ref_aurc(list(c), list(y))),
    ]
    for got, want in pairs:
        assert float(got) == pytest.approx(want, abs=TOL)


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


def test_doctests():
    import matplotlib.pyplot as plt

    for module in (functional, classes, collection, plot, M):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
    plt.close("all")


def test_reference_bins_follow_numpy_linspace_and_digitize():
    from lightning_caopd.metrics.functional import _reference_bin_index, _uniform_bin_index

    values = [0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0]
    edges = np.linspace(0, 1, 11)
    edges[0], edges[-1] = -np.inf, np.inf
    expected = np.clip(np.digitize(values, edges) - 1, 0, 9).tolist()
    got = _reference_bin_index(torch.tensor(values, dtype=torch.float64), 10).tolist()
    assert got == expected
    assert expected[3] == 2 and expected[5] == 5 and expected[6] == 6  # 0.3, 0.6, 0.7: lower bin
    assert _uniform_bin_index(torch.tensor([0.3, 0.6, 0.7]), 10).tolist() == [3, 6, 7]
