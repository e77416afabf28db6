"""Reliability diagrams: the one drawing path for every diagram the project makes.

:func:`plot_reliability_diagram` draws one from its bins (the dict
``ExpectedCalibrationError.reliability_table()`` returns, or the JSON-ready lists
``metrics.json`` keeps under ``"reliability"``); the helpers below save it as a PNG or render it
to an image array. Figures are bare ``Figure``s on an Agg canvas: they never enter pyplot's
registry, so nothing stays open and no global backend is switched (safe inside a training
process).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

Bins = Mapping[str, Sequence[float | None] | Tensor]

_ACCURACY = "#3b6fb6"
_OVER = "#d9534f"  # mean confidence above accuracy
_UNDER = "#f5c518"  # mean confidence below accuracy
_MIN_WIDTH = 0.012  # quantile bins can be a single value wide; keep them visible
_SIZE = (5.5, 5.5)  # inches


def _column(values: Sequence[float | None] | Tensor) -> np.ndarray:
    """One bins column as float64; ``None`` (an empty bin's mean in JSON) becomes NaN."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().double()
    return np.asarray(values, dtype=np.float64)


def plot_reliability_diagram(
    bins: Bins,
    ece: float | None,
    ax: Any = None,
    title: str | None = None,
    strategy: str = "uniform",
) -> Any:
    """Draw accuracy per confidence bin against the diagonal of perfect calibration.

    Each non-empty bin gets a bar up to its accuracy, a hatched "gap" bar spanning from its
    accuracy to its mean confidence (red above the bar: overconfident; yellow hatching over the
    bar's top: underconfident, the bar still showing its accuracy), and its sample count on top.
    The title carries the ECE and the sample count; with no sample (no stated confidence) it
    says the ECE is undefined, whatever ``ece`` holds.

    Args:
        bins: ``{"lower", "upper", "count", "confidence", "accuracy"}``, each of length
            ``n_bins``: tensors (``ExpectedCalibrationError.reliability_table()``, NaN for an
            empty bin's means) or lists (``metrics.json``'s ``"reliability"``, ``None`` there).
        ece: The ECE to print in the title (``None`` or NaN: undefined).
        ax: Axes to draw on; a new ``pyplot`` figure when ``None`` (torchmetrics' plot API).
        title: Title prefix (default ``"Reliability diagram"``).
        strategy: Binning strategy, for the x-axis label.

    Returns:
        ``(fig, ax)``.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=_SIZE)
    else:
        fig = ax.get_figure()
    lower, upper = _column(bins["lower"]), _column(bins["upper"])
    count = _column(bins["count"])
    filled = count > 0
    width = np.maximum(upper - lower, _MIN_WIDTH)[filled]
    left = np.maximum(np.minimum(lower, upper - _MIN_WIDTH), 0.0)[filled]
    conf, acc = _column(bins["confidence"])[filled], _column(bins["accuracy"])[filled]
    n = count[filled]

    ax.plot(
        [0, 1],
        [0, 1],
        linestyle="--",
        color="0.45",
        linewidth=1.2,
        zorder=1,
        label="Perfect calibration",
    )
    ax.bar(
        left,
        acc,
        width=width,
        align="edge",
        color=_ACCURACY,
        edgecolor="white",
        linewidth=0.8,
        zorder=2,
        label="Accuracy",
    )
    over = conf >= acc
    # The overconfident gap sits on white above the bar (translucent fill); the underconfident
    # one lies over the bar's top, so it is hatch only: the bar shows up to its accuracy.
    for mask, face, edge, label in (
        (over, _OVER + "4d", _OVER, "Gap: overconfident"),
        (~over, "none", _UNDER, "Gap: underconfident"),
    ):
        if mask.any():
            ax.bar(
                left[mask],
                (conf - acc)[mask],
                bottom=acc[mask],
                width=width[mask],
                align="edge",
                facecolor=face,
                edgecolor=edge,
                hatch="//",
                linewidth=0.8,
                zorder=3,
                label=label,
            )
    for x, w, top, k in zip(left, width, np.maximum(acc, conf), n, strict=True):
        ax.text(
            x + w / 2,
            min(top + 0.012, 0.975),
            f"{int(k)}",
            ha="center",
            va="bottom",
            fontsize=7.5,
            color="0.2",
            zorder=4,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )

    head = title or "Reliability diagram"
    total = int(count.sum())
    if total == 0 or ece is None or math.isnan(ece):  # an empty diagram is not a perfect one
        ax.set_title(f"{head}\nECE undefined: no stated confidence (N = {total:,})", fontsize=10)
    else:
        ax.set_title(
            f"{head}\nECE = {ece:.4f}   (N = {total:,} stated; bar labels: samples per bin)",
            fontsize=10,
        )
    ax.set_xlabel(f"Stated confidence ({strategy} bins)")
    ax.set_ylabel("Accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.04)
    ax.set_aspect("equal")
    ax.grid(True, color="0.9", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig, ax


def _canvas_figure(dpi: float = 100) -> tuple[Any, Any]:
    """A bare ``(Figure, FigureCanvasAgg)`` of the diagram's size, outside pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=dpi)
    return fig, FigureCanvasAgg(fig)


def save_reliability_png(
    bins: Bins,
    ece: float | None,
    path: str | Path,
    title: str | None = None,
    strategy: str = "uniform",
) -> Path:
    """Save the diagram of `bins` (see :func:`plot_reliability_diagram`) as a PNG.

    Args:
        bins: Per-bin statistics, tensors or JSON-ready lists.
        ece: The ECE to print in the title (``None``: undefined).
        path: Where to write the PNG; parent folders are created.
        title: Title prefix.
        strategy: Binning strategy, for the x-axis label.

    Returns:
        The path written.
    """
    fig, _ = _canvas_figure()
    plot_reliability_diagram(bins, ece, ax=fig.add_subplot(), title=title, strategy=strategy)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=160, bbox_inches="tight")
    fig.clear()
    return path


def reliability_image(
    bins: Bins, ece: float | None, title: str | None = None, strategy: str = "uniform"
) -> np.ndarray:
    """The diagram of `bins` as an (H, W, 3) uint8 array, for loggers that take images.

    Example:
        >>> bins = {"lower": [0.0, 0.5], "upper": [0.5, 1.0], "count": [0, 4],
        ...         "confidence": [None, 0.9], "accuracy": [None, 0.5]}
        >>> reliability_image(bins, 0.4).shape
        (550, 550, 3)
    """
    fig, canvas = _canvas_figure()
    plot_reliability_diagram(bins, ece, ax=fig.add_subplot(), title=title, strategy=strategy)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
