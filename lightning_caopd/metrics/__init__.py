"""Calibration metrics for verbalised confidence (torchmetrics).

Layout: :mod:`.functional` holds the pure update/compute functions, :mod:`.classes` the
``Metric`` wrappers, :mod:`.plot` the reliability diagram and :mod:`.collection` the
``CalibrationMetrics`` suite (overall and per category, DDP-safe).
"""

from lightning_caopd.metrics.classes import (
    AURC,
    BrierScore,
    BrierScoreAll,
    ExpectedCalibrationError,
    FormatRate,
    MeanAccuracy,
    MeanConfidence,
    OverconfidenceGap,
    StrictPairwiseRanking,
)
from lightning_caopd.metrics.collection import CalibrationMetrics
from lightning_caopd.metrics.functional import (
    aurc,
    brier_score,
    brier_score_all,
    expected_calibration_error,
    overconfidence_gap,
    strict_pairwise_ranking,
)
from lightning_caopd.metrics.plot import plot_reliability_diagram

__all__ = [
    "AURC",
    "BrierScore",
    "BrierScoreAll",
    "CalibrationMetrics",
    "ExpectedCalibrationError",
    "FormatRate",
    "MeanAccuracy",
    "MeanConfidence",
    "OverconfidenceGap",
    "StrictPairwiseRanking",
    "aurc",
    "brier_score",
    "brier_score_all",
    "expected_calibration_error",
    "overconfidence_gap",
    "plot_reliability_diagram",
    "strict_pairwise_ranking",
]
