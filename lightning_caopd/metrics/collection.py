"""All calibration metrics of an evaluation at once, overall and per category."""

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC

from lightning_caopd.metrics.classes import (
    AURC,
    BrierScore,
    ExpectedCalibrationError,
    FormatRate,
    MeanAccuracy,
    MeanConfidence,
    OverconfidenceGap,
    StrictPairwiseRanking,
)
from lightning_caopd.metrics.functional import _format_inputs
from lightning_caopd.metrics.plot import save_reliability_diagram

KEYS = ("accuracy", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc")


class _Group(nn.Module):
    """The metrics of one slice of the data (everything, or one category)."""

    def __init__(self, n_bins: int, fallback_confidence: float) -> None:
        super().__init__()
        self.fallback_confidence = fallback_confidence
        self.format_rate = FormatRate()
        # The inputs are checked once by CalibrationMetrics.update, not by every member.
        # SPR and AURC keep identical value states: one copy serves both (compute group).
        self.scores = MetricCollection(
            {
                "accuracy": MeanAccuracy(validate_args=False),
                "mean_confidence": MeanConfidence(validate_args=False),
                "ece": ExpectedCalibrationError(n_bins=n_bins, validate_args=False),
                "brier": BrierScore(validate_args=False),
                "ocg": OverconfidenceGap(validate_args=False),
                "spr": StrictPairwiseRanking(validate_args=False),
                "auroc": BinaryAUROC(validate_args=False),
                "aurc": AURC(validate_args=False),
            },
            compute_groups=[["spr", "aurc"]],
        )

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        self.format_rate.update(confidence)
        confidence = torch.where(torch.isnan(confidence), self.fallback_confidence, confidence)
        # BinaryAUROC wants integer targets; the calibration metrics accept them too.
        self.scores.update(confidence, correct.long())

    def metric(self, name: str) -> Any:
        """One member of ``scores``, without copying shared compute-group states."""
        return dict(self.scores.items(keep_base=True, copy_state=False))[name]

    def compute(self) -> dict[str, Any]:
        """Plain-Python values; every rank must call this in the same order (collectives)."""
        with self.format_rate.sync_context():
            n, parsed = int(self.format_rate.total), int(self.format_rate.parsed)
        values: dict[str, Any] = dict.fromkeys(KEYS)
        values.update(format_rate=None, n=n)
        if n == 0:  # synced, so every rank takes this branch together
            return values
        values["format_rate"] = parsed / n
        for name, metric in self.scores.items(keep_base=True, copy_state=False):
            if name != "auroc":
                values[name] = float(metric.compute())
        if 0.0 < values["accuracy"] < 1.0:  # AUROC needs both classes
            values["auroc"] = float(self.metric("auroc").compute())
        return values


class CalibrationMetrics(nn.Module):
    """Accuracy, calibration and ranking metrics of verbalised confidence, per category too.

    The evaluation suite of arXiv 2604.16830: accuracy, mean confidence, ECE, Brier score,
    overconfidence gap (OCG), strict pairwise ranking (SPR), AUROC (torchmetrics'
    ``BinaryAUROC``), AURC and the format rate.

    Unparseable outputs are passed as NaN confidence: they count against ``format_rate`` and
    are scored with ``fallback_confidence`` by every other metric, so a model cannot improve
    its calibration by refusing to state a confidence.

    Every state is a torchmetrics state, so under DDP ``compute()`` returns on every rank the
    values of the union of all ranks' data. All ranks must call ``compute()`` together, and
    every rank should have called ``update`` at least once (torchmetrics fills a rank without
    any update with float placeholders, which clash with ``BinaryAUROC``'s integer targets).

    Args:
        categories: Names of the categories that ``update``'s ``category`` indexes.
        n_bins: ECE bins (uniform).
        fallback_confidence: Confidence scored for unparseable outputs.

    Example:
        >>> metrics = CalibrationMetrics(categories=["math", "code"])
        >>> metrics.update(
        ...     torch.tensor([0.9, float("nan"), 0.4, 0.8]),
        ...     torch.tensor([1, 0, 1, 0]),
        ...     category=torch.tensor([0, 0, 1, 1]),
        ... )
        >>> result = metrics.compute()
        >>> result["n"], result["format_rate"], result["accuracy"]
        (4, 0.75, 0.5)
        >>> result["by_category"]["math"]["spr"]
        1.0
    """

    def __init__(
        self,
        categories: list[str] | None = None,
        n_bins: int = 10,
        fallback_confidence: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= fallback_confidence <= 1.0:
            raise ValueError(
                f"`fallback_confidence` must lie in [0, 1], got {fallback_confidence}."
            )
        self.categories = list(categories or [])
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"Duplicate category names in {self.categories}.")
        self.overall = _Group(n_bins, fallback_confidence)
        # Indexed by position: category names need not be valid module names.
        self.by_category = nn.ModuleList(
            _Group(n_bins, fallback_confidence) for _ in self.categories
        )

    def update(self, confidence: Tensor, correct: Tensor, category: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            confidence: (N,) float, in ``[0, 1]`` or NaN for an unparseable output.
            correct: (N,) bool or {0, 1}.
            category: (N,) int64 indices into ``categories``; required when categories exist.
                A negative index marks an item outside every category: it counts in the
                overall values only.

        Raises:
            ValueError: On mismatched shapes, confidences outside ``[0, 1]`` (other than
                NaN), ``correct`` outside {0, 1}, or a missing or too large ``category``.
        """
        confidence, correct = confidence.flatten(), correct.flatten()
        fallback = self.overall.fallback_confidence
        _format_inputs(torch.nan_to_num(confidence, nan=fallback), correct)  # raises if bad
        if category is None:
            if self.categories:
                raise ValueError("`category` is required when categories are set.")
        else:
            category = category.flatten()
            if category.shape != confidence.shape:
                raise ValueError("`category` must have as many elements as `confidence`.")
            if category.numel() and category.max() >= len(self.categories):
                raise ValueError(
                    f"`category` indices must be below {len(self.categories)} (the number of"
                    " categories); use -1 for an item outside every category."
                )
        # All checks come first: a rejected batch leaves no trace.
        self.overall.update(confidence, correct)
        # Every category is updated, even with zero items, so every rank's states carry the
        # right dtypes when they are gathered.
        for index, group in enumerate(self.by_category):
            mask = category == index
            group.update(confidence[mask], correct[mask])

    def compute(self) -> dict[str, Any]:
        """Compute all values as plain Python numbers.

        Returns:
            ``{"accuracy", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc",
            "format_rate"}`` as floats, ``"n"`` as int, and ``"by_category"``: the same dict
            (without ``by_category``) for each category that has samples. ``auroc`` is
            ``None`` when only one class is present (undefined; JSON cannot store NaN); every
            value but ``n`` is ``None`` when there are no samples.
        """
        result = self.overall.compute()
        result["by_category"] = {}
        for name, group in zip(self.categories, self.by_category, strict=True):
            values = group.compute()
            if values["n"] > 0:
                result["by_category"][name] = values
        return result

    def reliability_bins(self) -> dict[str, list]:
        """The overall reliability diagram's bins as JSON-ready lists.

        None stands for an empty bin's means; ``metrics.json`` keeps them under ``reliability``.

        Under DDP every rank must call this: the bins are gathered.
        """
        table = self.overall.metric("ece").reliability_table()
        return {
            k: [None if isinstance(x, float) and math.isnan(x) else x for x in v.tolist()]
            for k, v in table.items()
        }

    def reset(self) -> None:
        """Forget all samples."""
        for group in (self.overall, *self.by_category):
            group.format_rate.reset()
            group.scores.reset()

    def save_reliability_diagram(self, path: str | Path, title: str | None = None) -> Path:
        """Save the reliability diagram of the overall ECE as a PNG.

        See :func:`~lightning_caopd.metrics.save_reliability_diagram`; under DDP every rank
        must call it (the bins are gathered).
        """
        return save_reliability_diagram(self.overall.metric("ece"), path, title=title)
