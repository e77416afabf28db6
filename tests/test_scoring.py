"""Scoring one fixed completions file in both modes (eval.scoring=default|reference); doctests."""

import doctest
import json
from pathlib import Path

import pytest
import torch

from lightning_caopd import scoring
from lightning_caopd.metrics import CalibrationMetrics
from lightning_caopd.scoring import parse_confidences

ROWS = [
    json.loads(line)
    for line in (Path(__file__).parent / "fixtures" / "completions_scoring.jsonl").open()
]


def _score(scoring: str) -> tuple[torch.Tensor, dict]:
    conf = parse_confidences([r["completion"] for r in ROWS], scoring)
    correct = torch.tensor([r["correct"] for r in ROWS])
    metrics = CalibrationMetrics(binning="reference" if scoring == "reference" else "uniform")
    metrics.update(conf, correct)
    return conf, {**metrics.compute(), "reliability": metrics.reliability_bins()}


def _stated(conf: torch.Tensor) -> list[float | None]:
    return [None if torch.isnan(c) else round(float(c), 6) for c in conf]


def test_reference_mode_matches_the_reference_rules_by_hand():
    conf, result = _score("reference")
    # the label is clamped, never rescaled (8 and 75 -> 1.0); `**Confidence:**` is no label;
    # a tag is rescaled (60 -> 0.6); no statement stays unstated
    assert _stated(conf) == [0.3, 1.0, 1.0, None, 0.6, 0.7, None, 0.6, 0.25]
    assert conf.dtype == torch.float64
    # stated: 0.3 (right), 1.0 (wrong), 1.0 (right), 0.6 (wrong), 0.7 (wrong), 0.6 (right),
    # 0.25 (wrong). linspace/digitize bins: 0.3 and 0.25 share bin 2 ([0.2, 0.30000000000000004)),
    # 0.6 -> bin 5, 0.7 -> bin 6, 1.0 -> bin 9.
    # ECE = (|0.55 - 1| + |1.2 - 1| + |0.7 - 0| + |2.0 - 1|) / 7 = 2.35 / 7
    assert result["n"] == 9 and result["n_stated"] == 7
    assert result["ece"] == pytest.approx(2.35 / 7)
    assert result["brier"] == pytest.approx((0.49 + 1 + 0 + 0.36 + 0.49 + 0.16 + 0.0625) / 7)
    assert result["mean_confidence"] == pytest.approx(4.45 / 7)
    assert result["accuracy"] == pytest.approx(4 / 9)
    counts = result["reliability"]["count"]
    assert counts == [0, 0, 2, 0, 0, 2, 1, 0, 0, 2]


def test_default_mode_is_unchanged_on_the_same_file():
    conf, result = _score("default")
    # the default parser rescales whole numbers and reads markdown labels
    assert _stated(conf) == [0.3, 0.8, 0.75, 0.9, 0.6, 0.7, None, 0.6, 0.25]
    assert conf.dtype == torch.float32
    # uniform bins put 0.3 in [0.3, 0.4), apart from 0.25:
    # (0.25 + 0.7 + |1.2 - 1| + |1.45 - 1| + 0.8 + 0.1) / 8
    assert result["n_stated"] == 8
    assert result["ece"] == pytest.approx(2.5 / 8, abs=1e-6)
    assert result["reliability"]["count"] == [0, 0, 1, 1, 0, 0, 2, 2, 1, 1]


def test_doctests():
    result = doctest.testmod(scoring)
    assert result.attempted > 0 and result.failed == 0
