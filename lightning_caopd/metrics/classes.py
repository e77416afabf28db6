"""Calibration metrics as thin ``torchmetrics.Metric`` wrappers around :mod:`.functional`.

All take ``update(confidence, correct)``: ``confidence`` a float tensor in ``[0, 1]`` and
``correct`` a bool or {0, 1} tensor of the same shape. Means and ECE's uniform bins keep
fixed-size sum states (float64 sums, int64 counts); the ranking metrics and quantile ECE keep
the values as ``cat`` states in the metric's dtype (float32 unless ``set_dtype`` says
otherwise), so every rank's placeholder for "no data yet" has the same dtype under DDP. The
metrics that keep values share the state names ``confidence``/``correct``, so a
``MetricCollection`` may hold one copy for all of them (compute groups); the sum metrics use
distinct names so that they are never merged by accident.
"""

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_caopd.metrics import functional as F
from lightning_caopd.metrics.plot import plot_reliability_diagram


def _cat_values(confidence: Any, correct: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Concatenate ``cat`` states (a list, or one tensor once synced) into (N,) tensors."""
    if isinstance(confidence, list) and not confidence:
        return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.bool)
    return dim_zero_cat(confidence), dim_zero_cat(correct).bool()


class _CalibrationMetric(Metric):
    """Shared flags, argument checking and the scalar plot."""

    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validate_args = validate_args

    def _inputs(self, confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
        return F._format_inputs(confidence, correct, self.validate_args)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> Any:
        """Plot one value or a sequence of values (torchmetrics' plot API).

        Returns:
            ``(fig, ax)``.
        """
        return self._plot(val, ax)


class _MeanMetric(_CalibrationMetric):
    """Mean of a per-sample quantity, kept as a float64 sum and an int64 count."""

    _sum_state = "sum"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state(self._sum_state, torch.tensor(0.0, dtype=torch.float64), "sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    @staticmethod
    def _per_sample(confidence: Tensor, correct: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Add one batch."""
        total, n = F._mean_update(self._per_sample(*self._inputs(confidence, correct)))
        setattr(self, self._sum_state, getattr(self, self._sum_state) + total)
        self.count += n

    def compute(self) -> Tensor:
        """Mean over all samples seen (NaN before any)."""
        return F._mean_compute(getattr(self, self._sum_state), self.count)


class MeanConfidence(_MeanMetric):
    """Mean stated confidence.

    Example:
        >>> metric = MeanConfidence()
        >>> metric.update(torch.tensor([0.2, 0.6]), torch.tensor([0, 1]))
        >>> metric.compute()
        tensor(0.4000, dtype=torch.float64)
    """

    higher_is_better = None
    _sum_state = "sum_confidence"

    @staticmethod
    def _per_sample(confidence: Tensor, correct: Tensor) -> Tensor:
        return confidence


class MeanAccuracy(_MeanMetric):
    """Share of verified-correct answers (the mean of ``correct``).

    Example:
        >>> metric = MeanAccuracy()
        >>> metric.update(torch.tensor([0.2, 0.6, 0.9]), torch.tensor([0, 1, 1]))
        >>> metric.compute()
        tensor(0.6667, dtype=torch.float64)
    """

    higher_is_better = True
    _sum_state = "sum_correct"

    @staticmethod
    def _per_sample(confidence: Tensor, correct: Tensor) -> Tensor:
        return correct


class BrierScore(_MeanMetric):
    """Brier score, the mean of ``(confidence - correct)^2``.

    Example:
        >>> metric = BrierScore()
        >>> metric.update(torch.tensor([1.0, 0.5]), torch.tensor([True, False]))
        >>> metric.compute()
        tensor(0.1250, dtype=torch.float64)
    """

    higher_is_better = False
    _sum_state = "sum_squared_error"

    @staticmethod
    def _per_sample(confidence: Tensor, correct: Tensor) -> Tensor:
        return (confidence.double() - correct.double()) ** 2


class BrierScoreAll(BrierScore):
    """Brier score over every output, one without a stated confidence (NaN) scored worst.

    An unstated confidence counts as 1 on a wrong answer and 0 on a right one: a squared error
    of 1, the most any stated confidence can cost. So stating a confidence never scores worse
    than stating none, and a model that states none scores 1.0, the maximum. With every
    confidence stated it equals :class:`BrierScore`. The default sweep objective
    (``optimized_metric: brier_all``).

    Example:
        >>> metric = BrierScoreAll()
        >>> metric.update(torch.tensor([1.0, 0.5, float("nan")]), torch.tensor([1, 0, 0]))
        >>> metric.compute()
        tensor(0.4167, dtype=torch.float64)
    """

    _sum_state = "sum_squared_error_all"

    def _inputs(self, confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
        return F._fill_unstated(confidence, correct, self.validate_args)


class OverconfidenceGap(_MeanMetric):
    """Overconfidence gap (OCG): mean confidence minus accuracy, as in arXiv 2604.16830.

    Positive means overconfident; 0 is best, so ``higher_is_better`` is ``None``.

    Example:
        >>> metric = OverconfidenceGap()
        >>> metric.update(torch.tensor([0.9, 0.7]), torch.tensor([1, 0]))
        >>> metric.compute()
        tensor(0.3000, dtype=torch.float64)
    """

    higher_is_better = None
    plot_lower_bound = -1.0
    _sum_state = "sum_gap"

    @staticmethod
    def _per_sample(confidence: Tensor, correct: Tensor) -> Tensor:
        return confidence.double() - correct.double()


class _ValuesMetric(_CalibrationMetric):
    """Keeps every (confidence, correct) pair as ``cat`` states in the metric's dtype."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("confidence", [], dist_reduce_fx="cat")
        self.add_state("correct", [], dist_reduce_fx="cat")

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Add one batch."""
        confidence, correct = self._inputs(confidence, correct)
        self.confidence.append(confidence.to(self.dtype))
        self.correct.append(correct.to(self.dtype))

    def _values(self) -> tuple[Tensor, Tensor]:
        return _cat_values(self.confidence, self.correct, self.dtype)


class StrictPairwiseRanking(_ValuesMetric):
    """Strict pairwise ranking (SPR), as used in arXiv 2604.16830.

    Over all (correct, incorrect) pairs, the share in which the correct answer carries
    strictly higher confidence. A tie earns no credit (unlike AUROC's half), so a model that
    always states the same number scores 0. With no correct or no incorrect answer there is no
    pair and the value is 0.0 (the paper's convention). Computed by sorting in
    O(N log N) time and O(N) memory, never an N x N matrix.

    Example:
        >>> metric = StrictPairwiseRanking()
        >>> metric.update(torch.tensor([0.9, 0.5]), torch.tensor([1, 1]))
        >>> metric.update(torch.tensor([0.5, 0.1]), torch.tensor([0, 0]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        """SPR over all samples seen."""
        return F._spr_compute(*self._values())


class AURC(_ValuesMetric):
    """Area under the risk-coverage curve for selective prediction (lower is better).

    Answers are accepted from the most confident down; the risk at coverage ``k / N`` is the
    error share among the ``k`` accepted, and AURC is the mean risk over ``k = 1..N``. Tied
    confidences are handled by averaging over their orders (the expected AURC when ties are
    broken at random), so the value does not depend on input order; see
    :func:`~lightning_caopd.metrics.functional._aurc_compute`. NaN before any sample.

    Example:
        >>> metric = AURC()
        >>> metric.update(torch.tensor([0.9, 0.6, 0.3]), torch.tensor([1, 0, 1]))
        >>> metric.compute()
        tensor(0.2778, dtype=torch.float64)
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        """AURC over all samples seen."""
        return F._aurc_compute(*self._values())


class FormatRate(_CalibrationMetric):
    """Share of outputs that stated a parseable confidence.

    Convention: the caller passes ``confidence`` with NaN where
    :func:`~lightning_caopd.confidence.parse_confidence` returned ``None``; the rate is the
    non-NaN share. ``correct`` is accepted and ignored, so the metric fits the common
    ``update(confidence, correct)`` call.

    Example:
        >>> metric = FormatRate()
        >>> metric.update(torch.tensor([0.2, float("nan"), 0.9, 0.5]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("parsed", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, confidence: Tensor, correct: Tensor | None = None) -> None:
        """Add one batch; ``correct`` is ignored."""
        self.parsed += (~torch.isnan(confidence)).sum()
        self.total += confidence.numel()

    def compute(self) -> Tensor:
        """Parsed share over all outputs seen (NaN before any)."""
        return F._mean_compute(self.parsed.double(), self.total)


class ExpectedCalibrationError(_CalibrationMetric):
    """Expected calibration error (ECE) of stated confidences, with a reliability diagram.

    ``ECE = sum_b (n_b / N) * |mean confidence_b - accuracy_b|`` over non-empty bins ``b``.

    * ``strategy="uniform"``: ``n_bins`` equal-width bins; bin ``i`` holds confidences in
      ``[i / n, (i + 1) / n)`` and the last bin also holds 1.0. The edges are rounded to the
      confidence's dtype before comparing (so a float32 0.7 falls in the bin starting at 0.7).
      State: per-bin count, confidence sum and correct sum, reduced by ``sum``.
    * ``strategy="quantile"``: equal-mass bins from all values seen. With the confidences
      sorted ascending as ``s_0..s_{N-1}``, bin ``i`` (``0 <= i < n_bins``) has lower edge
      ``e_i = s[floor(i * N / n_bins)]`` and holds the values in ``[e_i, e_{i+1})``; the last
      bin holds everything from ``e_{n_bins-1}`` up. Each bin holds about ``N / n_bins``
      samples, but tied confidences always share one bin: a tie straddling an edge goes
      wholly to the upper bin, and equal edges leave the lower bins empty. The value does not
      depend on input order. State: the values (``cat``).
    * ``strategy="reference"``: the released CaOPD scorer's equal-width bins (``linspace`` /
      ``digitize``; see ``functional._reference_bin_index``): as ``uniform``, but the edges
      ``i * 0.1`` are compared in float64, so 0.3, 0.6 and 0.7 fall in the bin below. Same state
      as ``uniform``.

    NaN before any sample.

    Args:
        n_bins: Number of bins.
        strategy: ``"uniform"``, ``"quantile"`` or ``"reference"``.
        validate_args: Check input values on every update.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = ExpectedCalibrationError(n_bins=10)
        >>> metric.update(torch.tensor([0.9, 0.9, 0.2]), torch.tensor([1, 0, 0]))
        >>> metric.compute()
        tensor(0.3333, dtype=torch.float64)
        >>> fig, ax = metric.plot(title="Demo")
        >>> import matplotlib.pyplot as plt; plt.close(fig)
    """

    higher_is_better = False

    def __init__(self, n_bins: int = 10, strategy: F.Strategy = "uniform", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"`n_bins` must be a positive int, got {n_bins!r}.")
        if strategy not in ("uniform", "quantile", "reference"):
            raise ValueError(
                f"`strategy` must be 'uniform', 'quantile' or 'reference', got {strategy!r}."
            )
        self.n_bins = n_bins
        self.strategy = strategy
        if strategy != "quantile":
            self.add_state("bin_count", torch.zeros(n_bins, dtype=torch.long), "sum")
            self.add_state("bin_confidence", torch.zeros(n_bins, dtype=torch.float64), "sum")
            self.add_state("bin_correct", torch.zeros(n_bins, dtype=torch.float64), "sum")
        else:
            self.add_state("confidence", [], dist_reduce_fx="cat")
            self.add_state("correct", [], dist_reduce_fx="cat")

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Add one batch."""
        confidence, correct = self._inputs(confidence, correct)
        if self.strategy == "quantile":
            self.confidence.append(confidence.to(self.dtype))
            self.correct.append(correct.to(self.dtype))
            return
        binning = F._reference_bin_index if self.strategy == "reference" else F._uniform_bin_index
        index = binning(confidence, self.n_bins)
        count, conf_sum, correct_sum = F._binned_update(confidence, correct, index, self.n_bins)
        self.bin_count += count
        self.bin_confidence += conf_sum
        self.bin_correct += correct_sum

    def _bins(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(lower, upper, count, confidence_sum, correct_sum)`` per bin, each (n_bins,)."""
        if self.strategy != "quantile":
            edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
            return edges[:-1], edges[1:], self.bin_count, self.bin_confidence, self.bin_correct
        confidence, correct = _cat_values(self.confidence, self.correct, self.dtype)
        if confidence.numel() == 0:
            edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
            zeros = torch.zeros(self.n_bins, dtype=torch.float64)
            return edges[:-1], edges[1:], zeros.long(), zeros, zeros
        lower = F._quantile_edges(confidence, self.n_bins)
        upper = torch.cat([lower[1:], confidence.max().reshape(1)])
        index = F._quantile_bin_index(confidence, lower)
        sums = F._binned_update(confidence, correct, index, self.n_bins)
        return lower.double(), upper.double(), *sums

    def compute(self) -> Tensor:
        """ECE over all samples seen."""
        _, _, count, conf_sum, correct_sum = self._bins()
        return F._ece_compute(count, conf_sum, correct_sum)

    def reliability_table(self) -> dict[str, Tensor]:
        """Per-bin statistics behind the diagram, synced across processes.

        Returns:
            ``{"lower", "upper", "count", "confidence", "accuracy"}``, each of shape
            ``(n_bins,)``; ``confidence`` and ``accuracy`` are per-bin means (NaN when empty).
        """
        with self.sync_context():
            lower, upper, count, conf_sum, correct_sum = (t.cpu() for t in self._bins())
        safe = count.clamp(min=1).double()
        empty = count == 0
        return {
            "lower": lower,
            "upper": upper,
            "count": count,
            "confidence": torch.where(empty, float("nan"), conf_sum / safe),
            "accuracy": torch.where(empty, float("nan"), correct_sum / safe),
        }

    def plot(self, ax: Any = None, title: str | None = None) -> Any:  # type: ignore[override]
        """Draw a reliability diagram: accuracy per bin, the diagonal, the gap, bin counts.

        Args:
            ax: Axes to draw on; a new figure when ``None``.
            title: Title prefix; the ECE is appended.

        Returns:
            ``(fig, ax)``, like torchmetrics' plot API.
        """
        return plot_reliability_diagram(
            self.reliability_table(),
            float(self.compute()),
            ax=ax,
            title=title,
            strategy=self.strategy,
        )
