"""Reliability diagrams for :class:`~lightning_caopd.metrics.ExpectedCalibrationError`."""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

_ACCURACY = "#3b6fb6"
_OVER = "#d9534f"  # mean confidence above accuracy
_UNDER = "#f7dc6f"  # mean confidence below accuracy
_MIN_WIDTH = 0.012  # quantile bins can be a single value wide; keep them visible


def plot_reliability_diagram(
    table: dict[str, torch.Tensor],
    ece: float,
    ax: Any = None,
    title: str | None = None,
    strategy: str = "uniform",
) -> Any:
    """Draw accuracy per confidence bin against the diagonal of perfect calibration.

    Each non-empty bin gets a bar of its accuracy, a hatched "gap" bar spanning from its
    accuracy to its mean confidence (red above the bar: overconfident; yellow inside it:
    underconfident), and its sample count on top. The title carries the ECE and the sample count.

    Args:
        table: Output of ``ExpectedCalibrationError.reliability_table()``.
        ece: The ECE to print in the title.
        ax: Axes to draw on; a new ``pyplot`` figure when ``None``.
        title: Title prefix (default ``"Reliability diagram"``).
        strategy: Binning strategy, for the x-axis label.

    Returns:
        ``(fig, ax)``.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 5.5))
    else:
        fig = ax.get_figure()
    lower, upper = table["lower"].double(), table["upper"].double()
    count, confidence, accuracy = table["count"], table["confidence"], table["accuracy"]
    filled = count > 0
    width = (upper - lower).clamp(min=_MIN_WIDTH)[filled].numpy()
    left = torch.minimum(lower, upper - _MIN_WIDTH).clamp(min=0)[filled].numpy()
    conf, acc, n = confidence[filled].numpy(), accuracy[filled].numpy(), count[filled].numpy()

    ax.plot([0, 1], [0, 1], linestyle="--", color="0.45", linewidth=1.2, zorder=1,
            label="Perfect calibration")
    ax.bar(left, acc, width=width, align="edge", color=_ACCURACY, edgecolor="white",
           linewidth=0.8, zorder=2, label="Accuracy")
    over = conf >= acc
    # The overconfident gap sits on white above the bar (translucent); the underconfident one
    # covers the bar's top (opaque, so its colour matches the legend).
    for mask, face, edge, label in ((over, _OVER + "4d", _OVER, "Gap: overconfident"),
                                    (~over, _UNDER, "#b8860b", "Gap: underconfident")):
        if mask.any():
            ax.bar(left[mask], (conf - acc)[mask], bottom=acc[mask], width=width[mask],
                   align="edge", facecolor=face, edgecolor=edge, hatch="//", linewidth=0.8,
                   zorder=3, label=label)
    for x, w, top, k in zip(left, width, np.maximum(acc, conf), n):
        ax.text(x + w / 2, min(top + 0.012, 0.975), f"{int(k)}", ha="center", va="bottom",
                fontsize=7.5, color="0.2", zorder=4,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})

    total = int(count.sum())
    head = title or "Reliability diagram"
    ax.set_title(f"{head}\nECE = {ece:.4f}   (N = {total:,}; bar labels: samples per bin)",
                 fontsize=10)
    ax.set_xlabel(f"Stated confidence ({strategy} bins)")
    ax.set_ylabel("Accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.04)
    ax.set_aspect("equal")
    ax.grid(True, color="0.9", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig, ax


def _find_ece(metric_or_collection: nn.Module) -> Any:
    for module in metric_or_collection.modules():
        if callable(getattr(module, "reliability_table", None)):
            return module
    raise ValueError(
        f"No ExpectedCalibrationError found in {type(metric_or_collection).__name__}."
    )


def save_reliability_diagram(
    metric_or_collection: nn.Module, path: str | Path, title: str | None = None
) -> Path:
    """Save the reliability diagram of an ECE metric as a PNG.

    Args:
        metric_or_collection: An ``ExpectedCalibrationError``, or any module holding one (a
            ``MetricCollection``, a ``CalibrationMetrics``): the first one met in
            ``modules()`` order, the object itself first, is drawn.
        path: Where to write the PNG; parent folders are created.
        title: Title prefix.

    Under DDP every rank must call this, since the bins are gathered across ranks; every rank
    then writes the same picture, so pass rank-specific paths or let them overwrite.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = _find_ece(metric_or_collection)
    # A bare Figure on an Agg canvas never enters pyplot's registry, so nothing stays open
    # and no global backend is switched (safe inside a training process).
    fig = Figure(figsize=(5.5, 5.5))
    FigureCanvasAgg(fig)
    metric.plot(ax=fig.add_subplot(), title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=160, bbox_inches="tight")
    fig.clear()
    return path
