"""All calibration metrics of an evaluation at once, overall and per category."""

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC

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
from lightning_caopd.metrics.functional import _fill_unstated

# Over every item: accuracy and the Brier score with unstated confidences scored worst.
ALL_ITEMS = ("accuracy", "brier_all")
# Over the items that state a confidence (None when there is none).
STATED = ("accuracy_stated", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc")
KEYS = (*ALL_ITEMS, *STATED)


class _Group(nn.Module):
    """The metrics of one slice of the data (everything, or one category)."""

    def __init__(self, n_bins: int, binning: str = "uniform") -> None:
        super().__init__()
        self.format_rate = FormatRate()  # its counts are n and n_stated
        # The inputs are checked once by CalibrationMetrics.update, not by every member.
        self.all_items = MetricCollection(
            {
                "accuracy": MeanAccuracy(validate_args=False),
                "brier_all": BrierScoreAll(validate_args=False),
            },
            compute_groups=False,
        )
        # SPR and AURC keep identical value states: one copy serves both (compute group).
        self.stated = MetricCollection(
            {
                "accuracy_stated": MeanAccuracy(validate_args=False),
                "mean_confidence": MeanConfidence(validate_args=False),
                "ece": ExpectedCalibrationError(
                    n_bins=n_bins, strategy=binning, validate_args=False
                ),
                "brier": BrierScore(validate_args=False),
                "ocg": OverconfidenceGap(validate_args=False),
                "spr": StrictPairwiseRanking(validate_args=False),
                "auroc": BinaryAUROC(validate_args=False),
                "aurc": AURC(validate_args=False),
            },
            compute_groups=[["spr", "aurc"]],
        )

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        # BinaryAUROC wants integer targets; the calibration metrics accept them too.
        correct = correct.long()
        self.format_rate.update(confidence)
        self.all_items.update(confidence, correct)
        stated = ~torch.isnan(confidence)
        # Called even when nothing is stated, so every rank's states carry the right dtypes.
        self.stated.update(confidence[stated], correct[stated])

    def metric(self, name: str) -> Any:
        """One member of ``stated``, without copying shared compute-group states."""
        return dict(self.stated.items(keep_base=True, copy_state=False))[name]

    def reset(self) -> None:
        """Forget all samples."""
        for member in (self.format_rate, self.all_items, self.stated):
            member.reset()

    def compute(self) -> dict[str, Any]:
        """Plain-Python values; every rank must call this in the same order (collectives)."""
        with self.format_rate.sync_context():
            n, parsed = int(self.format_rate.total), int(self.format_rate.parsed)
        values: dict[str, Any] = dict.fromkeys(KEYS)
        values.update(format_rate=None, n=n, n_stated=parsed)
        if n == 0:  # synced, so every rank takes this branch together
            return values
        values["format_rate"] = parsed / n
        for name, metric in self.all_items.items(keep_base=True, copy_state=False):
            values[name] = float(metric.compute())
        if parsed == 0:  # no stated confidence: calibration is undefined, not perfect
            return values
        for name, metric in self.stated.items(keep_base=True, copy_state=False):
            if name != "auroc":
                values[name] = float(metric.compute())
        if 0.0 < values["accuracy_stated"] < 1.0:  # AUROC needs both classes
            values["auroc"] = float(self.metric("auroc").compute())
        return values


class CalibrationMetrics(nn.Module):
    """Accuracy, calibration and ranking metrics of verbalised confidence, per category too.

    The evaluation suite of arXiv 2604.16830: accuracy, mean confidence, ECE, Brier score,
    overconfidence gap (OCG), strict pairwise ranking (SPR), AUROC (torchmetrics'
    ``BinaryAUROC``), AURC and the format rate.

    An output without a parseable confidence is passed as NaN. It states nothing, so it is no
    statement of zero confidence: ``accuracy`` and ``format_rate`` cover every item, the
    calibration and ranking metrics (``accuracy_stated``, ``mean_confidence``, ``ece`` and its
    reliability bins, ``brier``, ``ocg``, ``spr``, ``auroc``, ``aurc``) only the ``n_stated``
    items that state a confidence, and are ``None`` when there is none. ``brier_all`` covers
    every item with an unstated confidence scored as the worst for its verdict (squared error
    1), so a model cannot improve it by refusing to state a confidence.

    Every state is a torchmetrics state, so under DDP ``compute()`` returns on every rank the
    values of the union of all ranks' data. All ranks must call ``compute()`` together, and
    every rank should have called ``update`` at least once (torchmetrics fills a rank without
    any update with float placeholders, which clash with ``BinaryAUROC``'s integer targets).

    Args:
        categories: Names of the categories that ``update``'s ``category`` indexes.
        n_bins: ECE bins.
        binning: the ECE's binning, ``uniform`` (the default) or ``reference`` (the released
            CaOPD scorer's ``linspace``/``digitize`` bins, ``eval.scoring=reference``).

    Example:
        >>> metrics = CalibrationMetrics(categories=["math", "code"])
        >>> metrics.update(
        ...     torch.tensor([0.9, float("nan"), 0.4, 0.8]),
        ...     torch.tensor([1, 0, 1, 0]),
        ...     category=torch.tensor([0, 0, 1, 1]),
        ... )
        >>> result = metrics.compute()
        >>> result["n"], result["n_stated"], result["format_rate"], result["accuracy"]
        (4, 3, 0.75, 0.5)
        >>> math_ = result["by_category"]["math"]  # 0.9 stated on a right answer, one unstated
        >>> math_["n_stated"], round(math_["ece"], 4), math_["accuracy"]
        (1, 0.1, 0.5)
        >>> round(result["brier_all"], 4)  # (0.01 + 1 + 0.36 + 0.64) / 4
        0.5025
    """

    def __init__(
        self, categories: list[str] | None = None, n_bins: int = 10, binning: str = "uniform"
    ) -> None:
        super().__init__()
        self.categories = list(categories or [])
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"Duplicate category names in {self.categories}.")
        self.overall = _Group(n_bins, binning)
        # Indexed by position: category names need not be valid module names.
        self.by_category = nn.ModuleList(_Group(n_bins, binning) for _ in self.categories)

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
        _fill_unstated(confidence, correct)  # raises if bad; NaN is allowed
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
            ``{"accuracy", "brier_all", "format_rate"}`` over all items and ``{"accuracy_stated",
            "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc"}`` over the items
            that state a confidence, as floats; ``"n"`` and ``"n_stated"`` as ints; and
            ``"by_category"``: the same dict (without ``by_category``) for each category that
            has samples. The stated-item values are ``None`` when no item states a confidence
            (undefined, not perfect; JSON cannot store NaN), ``auroc`` also when only one class
            is present; every value but the counts is ``None`` when there are no samples.
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

        Only items that state a confidence are binned (the counts sum to ``n_stated``). None
        stands for an empty bin's means; ``metrics.json`` keeps them under ``reliability``.

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
            group.reset()
