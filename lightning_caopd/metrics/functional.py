"""Pure functions behind the calibration metrics.

Every metric scores a stated confidence ``c`` in ``[0, 1]`` against the verifier's verdict
``y`` in ``{0, 1}``. The ``_*_update`` functions turn one batch into state; the ``_*_compute``
functions turn state into a value. The public functions at the bottom do both for one pair of
tensors, torchmetrics-functional style.

An output without a parseable confidence (NaN) states nothing: the calibration metrics take only
stated confidences (``CalibrationMetrics`` drops the NaN ones), and :func:`brier_score_all`
scores it as the worst confidence for its verdict.
"""

from typing import Literal

import torch
from torch import Tensor

Strategy = Literal["uniform", "quantile", "reference"]


def _format_inputs(
    confidence: Tensor, correct: Tensor, validate_args: bool = True
) -> tuple[Tensor, Tensor]:
    """Flatten and check one batch.

    Args:
        confidence: Float tensor of stated confidences in ``[0, 1]``.
        correct: Bool or {0, 1} tensor of the same shape.
        validate_args: Also check the values (costs a device sync).

    Returns:
        ``(confidence, correct)`` flattened, ``confidence`` in float64 or float32 (half
        precision is widened to float32), ``correct`` as bool.

    Raises:
        ValueError: On mismatched shapes, a non-float ``confidence``, or (when
            ``validate_args``) values outside ``[0, 1]`` / ``{0, 1}`` or NaN.
    """
    if confidence.shape != correct.shape:
        raise ValueError(
            f"`confidence` and `correct` must have the same shape, got {tuple(confidence.shape)}"
            f" and {tuple(correct.shape)}."
        )
    if not confidence.is_floating_point():
        raise ValueError(f"`confidence` must be a float tensor, got {confidence.dtype}.")
    confidence = confidence.detach().flatten()
    if confidence.dtype != torch.float64:
        confidence = confidence.float()
    correct = correct.detach().flatten()
    if validate_args:
        if not bool(((confidence >= 0) & (confidence <= 1)).all()):
            raise ValueError(
                "`confidence` must lie in [0, 1] without NaN; pass stated confidences only"
                " (CalibrationMetrics drops NaN ones; BrierScoreAll scores them as the worst)."
            )
        if correct.dtype != torch.bool and not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("`correct` must be bool or hold only 0 and 1.")
    return confidence, correct.bool()


def _fill_unstated(
    confidence: Tensor, correct: Tensor, validate_args: bool = True
) -> tuple[Tensor, Tensor]:
    """Like :func:`_format_inputs`, but NaN becomes the worst confidence for the verdict.

    A wrong answer without a stated confidence is scored as confidence 1, a right one as 0, so
    its squared error is 1: the most any stated confidence can cost.
    """
    confidence, _ = _format_inputs(confidence, correct, validate_args=False)  # shapes, dtype
    correct = correct.detach().flatten()
    worst = (correct == 0).to(confidence.dtype)  # (N,) 1.0 where wrong, 0.0 where right
    return _format_inputs(
        torch.where(torch.isnan(confidence), worst, confidence), correct, validate_args
    )


def _mean_update(values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum (float64) and count of per-sample values."""
    return values.double().sum(), torch.tensor(values.numel(), device=values.device)


def _mean_compute(total: Tensor, n: Tensor) -> Tensor:
    """Mean from sum and count; NaN when nothing was seen."""
    return total / n if n > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def _uniform_bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each confidence: bin ``i`` holds ``[i/n, (i+1)/n)``, the last also 1.0.

    The edges ``i/n`` are rounded to the confidence's own dtype before comparing, so a float32
    0.7 (really 0.69999999) lands in the bin that starts at 0.7, as it does in float64.
    """
    edges = (torch.arange(1, n_bins, dtype=torch.float64, device=confidence.device) / n_bins).to(
        confidence.dtype
    )
    return torch.bucketize(confidence, edges, right=True)


def _reference_bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    """Equal-width bins as the released CaOPD scorer draws them (``eval.scoring=reference``).

    ``eval/calibration_metrics.py`` uses ``np.linspace`` edges and ``np.digitize``: bin ``i``
    holds ``[e_i, e_{i+1})`` with ``e_i = i * (1 / n)`` in float64.

    Those edges are not the decimals they stand for (``3 * 0.1`` is 0.30000000000000004), and
    the confidences are compared in float64, so a stated 0.3, 0.6 or 0.7 lands in the bin
    *below* (``_uniform_bin_index`` puts it in the bin that starts there).
    """
    step = 1.0 / n_bins
    edges = torch.arange(1, n_bins, dtype=torch.float64, device=confidence.device) * step
    return torch.bucketize(confidence.double(), edges, right=True)


def _quantile_edges(confidence: Tensor, n_bins: int) -> Tensor:
    """Lower edges of equal-mass bins: ``e_i = s[floor(i * N / n_bins)]``, ``s`` sorted."""
    ordered = torch.sort(confidence).values
    n = ordered.numel()
    positions = torch.arange(n_bins, device=confidence.device) * n // n_bins
    return ordered[positions]


def _quantile_bin_index(confidence: Tensor, edges: Tensor) -> Tensor:
    """Bin ``i`` holds ``[e_i, e_{i+1})`` (the last bin is unbounded above).

    Equal edges make the earlier bins empty, so tied confidences always share one bin.
    """
    return torch.bucketize(confidence, edges, right=True) - 1


def _binned_update(
    confidence: Tensor, correct: Tensor, bin_index: Tensor, n_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin sample count (int64), confidence sum and correct sum (float64), each (n_bins,)."""
    count = torch.bincount(bin_index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    conf_sum.index_add_(0, bin_index, confidence.double())
    correct_sum = torch.zeros_like(conf_sum).index_add_(0, bin_index, correct.double())
    return count, conf_sum, correct_sum


def _ece_compute(count: Tensor, conf_sum: Tensor, correct_sum: Tensor) -> Tensor:
    """ECE from per-bin sums.

    ``sum_b (n_b / N) * |conf_b / n_b - acc_b / n_b| = sum_b |conf_b - acc_b| / N``; empty bins
    add nothing. NaN when ``N = 0``.
    """
    total = count.sum()
    if total == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (conf_sum - correct_sum).abs().sum() / total


def _quantile_ece_compute(confidence: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """ECE over equal-mass bins built from all values (see :func:`_quantile_edges`)."""
    if confidence.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    index = _quantile_bin_index(confidence, _quantile_edges(confidence, n_bins))
    return _ece_compute(*_binned_update(confidence, correct, index, n_bins))


def _spr_compute(confidence: Tensor, correct: Tensor) -> Tensor:
    """Share of (correct, incorrect) pairs whose correct member is strictly more confident.

    Sort-based, O(N log N): for each correct confidence, ``searchsorted(..., right=False)``
    counts the incorrect confidences strictly below it. Ties earn nothing; 0.0 when either
    side is empty.
    """
    positive, negative = confidence[correct], confidence[~correct]
    if positive.numel() == 0 or negative.numel() == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    below = torch.searchsorted(torch.sort(negative).values, positive, right=False)
    return below.sum().double() / (positive.numel() * negative.numel())


def _aurc_compute(confidence: Tensor, correct: Tensor) -> Tensor:
    """Area under the risk-coverage curve, averaging over the orders of tied confidences.

    Samples are ranked by confidence, highest first; the risk at coverage ``k / N`` is the
    error count among the top ``k`` divided by ``k``, and AURC is the mean risk over
    ``k = 1..N``. Inside a group of ``m`` tied samples holding ``e`` errors, the errors among
    the group's first ``j`` are taken as their expectation over all orders, ``j * e / m``,
    which makes the value independent of input order. NaN when ``N = 0``.
    """
    n = confidence.numel()
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    ordered, order = torch.sort(confidence, descending=True)
    errors = (~correct[order]).double()  # (N,) in ranking order
    _, group, size = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    group_errors = torch.zeros(size.numel(), dtype=torch.float64, device=confidence.device)
    group_errors.index_add_(0, group, errors)
    errors_before = torch.cumsum(group_errors, 0) - group_errors  # (G,)
    start = torch.cumsum(size, 0) - size  # (G,) samples ranked above each group
    k = torch.arange(1, n + 1, dtype=torch.float64, device=confidence.device)
    expected_errors = errors_before[group] + (k - start[group]) * group_errors[group] / size[group]
    return (expected_errors / k).mean()


def expected_calibration_error(
    confidence: Tensor, correct: Tensor, n_bins: int = 10, strategy: Strategy = "uniform"
) -> Tensor:
    """ECE of one batch; see :class:`~lightning_caopd.metrics.ExpectedCalibrationError`.

    Example:
        >>> expected_calibration_error(torch.tensor([0.9, 0.9, 0.2]), torch.tensor([1, 0, 0]))
        tensor(0.3333, dtype=torch.float64)
    """
    confidence, correct = _format_inputs(confidence, correct)
    if strategy == "quantile":
        return _quantile_ece_compute(confidence, correct, n_bins)
    binning = _reference_bin_index if strategy == "reference" else _uniform_bin_index
    index = binning(confidence, n_bins)
    return _ece_compute(*_binned_update(confidence, correct, index, n_bins))


def brier_score(confidence: Tensor, correct: Tensor) -> Tensor:
    """Mean of ``(c - y)^2``.

    Example:
        >>> brier_score(torch.tensor([1.0, 0.5]), torch.tensor([True, False]))
        tensor(0.1250, dtype=torch.float64)
    """
    confidence, correct = _format_inputs(confidence, correct)
    return _mean_compute(*_mean_update((confidence.double() - correct.double()) ** 2))


def brier_score_all(confidence: Tensor, correct: Tensor) -> Tensor:
    """Brier score over every output; NaN (no stated confidence) scores the worst, 1.

    Example:
        >>> brier_score_all(torch.tensor([1.0, 0.5, float("nan")]), torch.tensor([1, 0, 0]))
        tensor(0.4167, dtype=torch.float64)
    """
    confidence, correct = _fill_unstated(confidence, correct)
    return _mean_compute(*_mean_update((confidence.double() - correct.double()) ** 2))


def overconfidence_gap(confidence: Tensor, correct: Tensor) -> Tensor:
    """Mean confidence minus accuracy (positive: overconfident).

    Example:
        >>> overconfidence_gap(torch.tensor([0.9, 0.7]), torch.tensor([1, 0]))
        tensor(0.3000, dtype=torch.float64)
    """
    confidence, correct = _format_inputs(confidence, correct)
    return _mean_compute(*_mean_update(confidence.double() - correct.double()))


def strict_pairwise_ranking(confidence: Tensor, correct: Tensor) -> Tensor:
    """Strict pairwise ranking (SPR); see :func:`_spr_compute`.

    Example:
        >>> strict_pairwise_ranking(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0]))
        tensor(0.7500, dtype=torch.float64)
    """
    return _spr_compute(*_format_inputs(confidence, correct))


def aurc(confidence: Tensor, correct: Tensor) -> Tensor:
    """Area under the risk-coverage curve; see :func:`_aurc_compute`.

    Example:
        >>> aurc(torch.tensor([0.9, 0.6, 0.3]), torch.tensor([1, 0, 1]))
        tensor(0.2778, dtype=torch.float64)
    """
    return _aurc_compute(*_format_inputs(confidence, correct))
