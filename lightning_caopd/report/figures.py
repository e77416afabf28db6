"""The report's figures, from runs grouped as `lightning_caopd.report.table.groups` returns them.

Every figure is a bare ``Figure`` on an Agg canvas (no pyplot state, no display needed). The
reliability diagrams are drawn by `lightning_caopd.metrics.plot`, the one drawing path for them.
`scaling` draws the per-size means `lightning_caopd.report.table.scaling_points` computes.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

BASE = "base"
_COLORS = ["#d9534f", "#3b6fb6", "#5cb85c", "#9b59b6", "#f0ad4e", "#17a2b8", "#795548"]
_CATEGORY_MARKERS = ["^", "s", "D", "v", "P", "X"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def is_base(label: str) -> bool:
    """Whether a group label is the base model's (``base``, or ``base (20K params)`` per size)."""
    return label == BASE or label.startswith(f"{BASE} (")


def colors(labels: list[str]) -> dict[str, str]:
    """A colour per group label; the base model is grey (darker greys for further base sizes)."""
    names = [lb for lb in labels if not is_base(lb)]
    out = {lb: _COLORS[i % len(_COLORS)] for i, lb in enumerate(names)}
    bases = [lb for lb in labels if is_base(lb)] or [BASE]
    for i, lb in enumerate(bases):
        out[lb] = f"{0.65 - 0.4 * i / max(1, len(bases) - 1):.2f}" if len(bases) > 1 else "0.45"
    return out


def count_label(n: float) -> str:
    """A parameter count in short form, 3 significant digits at most.

    Example:
        >>> [count_label(n) for n in (950, 25_000, 1_234_567, 999_999, 32e9)]
        ['950', '25K', '1.23M', '1M', '32B']
    """
    for unit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if float(f"{n:.3g}") >= unit:
            return f"{float(f'{n / unit:.3g}'):g}{suffix}"
    return f"{n:g}"


def sizes(labels: list[str]) -> dict[str, float]:
    """Marker areas shrinking in group order: runs at the same spot stay visible as nested dots.

    Never below a visible dot, however many groups (a size sweep has a row per size).
    """
    return {lb: max(140 * 0.6**i, 20.0) for i, lb in enumerate(labels)}


def confidence_vs_accuracy(groups: dict[str, list[dict]], path: Path) -> Path:
    """Mean stated confidence against accuracy, one point per run, with the diagonal.

    The paper's Figure 1 view: above the diagonal a model claims more than it achieves. Small
    hollow markers show each run's categories (family difficulty differs a lot).
    """
    fig = _figure(6.2, 5.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="0.5", lw=1.2, label="calibrated (conf. = acc.)", zorder=1)
    ax.fill_between([0, 1], [0, 1], [1, 1], color="#d9534f", alpha=0.06, zorder=0)
    ax.text(0.04, 0.93, "overconfident", color="#b52b27", fontsize=9)
    ax.text(0.70, 0.01, "underconfident", color="0.35", fontsize=9)
    palette, area = colors(list(groups)), sizes(list(groups))
    categories = sorted(
        {c for runs in groups.values() for r in runs for c in r.get("by_category", {})}
    )
    for label, runs in groups.items():
        pts = [
            (r["accuracy"], r["mean_confidence"])
            for r in runs
            if r.get("mean_confidence") is not None
        ]
        if pts:
            ax.scatter(
                *zip(*pts, strict=True),
                s=area[label],
                color=palette[label],
                edgecolor="black",
                lw=0.6,
                label=f"{label} (overall)",
                zorder=4,
            )
        for j, cat in enumerate(categories):
            cat_pts = [
                (c["accuracy"], c["mean_confidence"])
                for r in runs
                if (c := r.get("by_category", {}).get(cat)) and c.get("mean_confidence") is not None
            ]
            if cat_pts:
                ax.scatter(
                    *zip(*cat_pts, strict=True),
                    s=28,
                    facecolor="none",
                    edgecolor=palette[label],
                    marker=_CATEGORY_MARKERS[j % len(_CATEGORY_MARKERS)],
                    lw=1.1,
                    zorder=3,
                )
    for j, cat in enumerate(categories):  # legend entries for the category markers
        ax.scatter(
            [],
            [],
            s=28,
            facecolor="none",
            edgecolor="0.3",
            marker=_CATEGORY_MARKERS[j % len(_CATEGORY_MARKERS)],
            label=f"category: {cat}",
        )
    ax.set(
        xlim=(-0.03, 1.03),  # markers at 0 and 1 stay whole
        ylim=(-0.03, 1.03),
        xlabel="Accuracy",
        ylabel="Mean stated confidence",
        title="Confidence vs accuracy (one point per run)",
    )
    ax.set_aspect("equal")
    ax.grid(True, color="0.9", lw=0.6)
    ax.legend(loc="lower right", fontsize=7.5, frameon=True, bbox_to_anchor=(1.0, 0.1))
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (ece, accuracy) points no other point beats on both (lower ECE, higher acc.).

    Example:
        >>> pareto_front([(0.1, 0.5), (0.2, 0.7), (0.3, 0.6), (0.1, 0.4)])
        [0, 1]
    """
    front = []
    for i, (e, a) in enumerate(points):
        dominated = any(
            e2 <= e and a2 >= a and (e2 < e or a2 > a)
            for j, (e2, a2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def accuracy_vs_ece(groups: dict[str, list[dict]], path: Path) -> Path:
    """Accuracy against ECE, one point per run, the Pareto front (low ECE, high accuracy) marked."""
    fig = _figure(6.2, 4.8)
    ax = fig.add_subplot()
    palette, area = colors(list(groups)), sizes(list(groups))
    points = []
    for label, runs in groups.items():
        pts = [(r["ece"], r["accuracy"]) for r in runs if r.get("ece") is not None]
        points += pts
        if pts:
            ax.scatter(
                *zip(*pts, strict=True),
                s=area[label],
                color=palette[label],
                edgecolor="black",
                lw=0.6,
                label=label,
                zorder=3,
            )
    front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[0])
    if front:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="black", lw=1.2, ls=":", zorder=2)
        ax.scatter(
            xs,
            ys,
            s=190,
            facecolor="none",
            edgecolor="black",
            lw=1.4,
            zorder=4,
            label="Pareto front",
        )
    ax.set(
        xlabel="ECE (lower is better)",
        ylabel="Accuracy (higher is better)",
        title="Accuracy vs calibration error (one point per run)",
    )
    if points:
        es, accs = zip(*points, strict=True)
        pad_e, pad_a = (
            max(0.02, 0.1 * (max(es) - min(es))),
            max(0.02, 0.1 * (max(accs) - min(accs))),
        )
        ax.set_xlim(max(0.0, min(es) - pad_e), max(es) + pad_e)
        ax.set_ylim(max(0.0, min(accs) - pad_a), min(1.0, max(accs) + pad_a))
    ax.grid(True, color="0.9", lw=0.6)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def pooled_bins(runs: list[dict]) -> tuple[dict[str, list], float] | None:
    """The runs' reliability bins summed (counts) and count-weighted (means), and their ECE.

    The ECE is the metrics package's own formula over the pooled bins. None when a run lacks
    bins (a metrics.json written before they were saved).
    """
    import torch  # here: reading reports needs no torch until a diagram is drawn

    from lightning_caopd.metrics.functional import _ece_compute

    tables = [r.get("reliability") for r in runs]
    if not tables or any(t is None for t in tables):
        return None
    counts = torch.tensor([t["count"] for t in tables], dtype=torch.float64)  # (runs, n_bins)
    count = counts.sum(0).long()  # (n_bins,)

    def summed(key: str) -> torch.Tensor:
        """(n_bins,) per-bin sum of `key` over all samples (an empty bin's None adds nothing)."""
        means = [[0.0 if x is None else x for x in t[key]] for t in tables]
        return (torch.tensor(means, dtype=torch.float64) * counts).sum(0)

    conf_sum, correct_sum = summed("confidence"), summed("accuracy")

    def mean(total: torch.Tensor) -> list[float | None]:
        return [s / n if n else None for s, n in zip(total.tolist(), count.tolist(), strict=True)]

    bins = {
        "lower": tables[0]["lower"],
        "upper": tables[0]["upper"],
        "count": count.tolist(),
        "confidence": mean(conf_sum),
        "accuracy": mean(correct_sum),
    }
    return bins, float(_ece_compute(count, conf_sum, correct_sum))


def reliability_grid(groups: dict[str, list[dict]], path: Path) -> Path:
    """Reliability diagrams side by side, one per group, pooled over its runs.

    Drawn from the bins in metrics.json; a group whose runs predate saved bins shows its first
    run's saved PNG instead (``reliability_initial.png`` for the base).
    """
    import matplotlib.image as mpimg

    from lightning_caopd.metrics.plot import plot_reliability_diagram

    cols = min(len(groups), 4)  # a size sweep has many groups: wrap into rows
    rows = math.ceil(len(groups) / cols)
    fig = _figure(5.0 * cols, 5.2 * rows)
    for i, (label, runs) in enumerate(groups.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        pooled = pooled_bins(runs)
        title = f"{label} ({len(runs)} runs pooled)" if len(runs) > 1 else f"{label} (1 run)"
        if pooled is not None:
            plot_reliability_diagram(*pooled, ax=ax, title=title)
            continue
        png = Path(runs[0]["png"])
        ax.imshow(mpimg.imread(png))
        ax.set_axis_off()
        ax.set_title(f"{title}: {png.parent.name}/{png.name}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def scaling(series: dict[str, dict[int, dict[str, tuple]]], path: Path) -> Path:
    """Accuracy, stated confidence and ECE against student size, one colour per method.

    The paper's scaling figure: OPD's stated confidence stays near 1 at every size while its
    accuracy climbs; CaOPD's confidence tracks its accuracy. Left: accuracy (solid, filled
    markers) and mean stated confidence (dashed, hollow markers); right: ECE. Log size axis.

    Args:
        series: label -> parameter count -> metric -> ``(mean, std or None, runs)``, as
            `lightning_caopd.report.table.scaling_points` returns it; std (drawn as error bars)
            is None for a single run.
        path: where the PNG goes.
    """
    fig = _figure(12.0, 4.9)
    ax_acc, ax_ece = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    palette = colors(list(series))
    panels = (
        (ax_acc, "accuracy", dict(ls="-", marker="o")),
        (ax_acc, "mean_confidence", dict(ls="--", marker="o", markerfacecolor="white")),
        (ax_ece, "ece", dict(ls="-", marker="o")),
    )
    for label, by_size in series.items():
        color = palette[label]
        for ax, key, style in panels:
            pts = [(n, s[key]) for n, s in sorted(by_size.items()) if key in s]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            ax.plot(xs, [m for _, (m, _, _) in pts], color=color, lw=1.8, ms=6.5, **style)
            bars = [(n, m, sd) for n, (m, sd, _) in pts if sd is not None]
            if bars:
                ax.errorbar(
                    *zip(*bars, strict=True), fmt="none", ecolor=color, elinewidth=1, capsize=3
                )
    sizes = sorted({n for by_size in series.values() for n in by_size})
    for ax in (ax_acc, ax_ece):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [count_label(n) for n in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
        ax.set_xlabel("Student size (parameters, log scale)")
        ax.grid(True, color="0.9", lw=0.6)
    ax_acc.set(
        ylim=(0.0, 1.05),
        ylabel="Accuracy / mean stated confidence",
        title="Accuracy and stated confidence",
    )
    ax_ece.set_ylim(bottom=0.0)
    ax_ece.set(ylabel="ECE (lower is better)", title="Calibration error")
    handles = [
        Line2D(
            [], [], color=palette[lb], lw=2.5, label=f"{lb} (before training)" if lb == BASE else lb
        )
        for lb in series
    ]
    handles += [
        Line2D([], [], color="0.2", ls="-", marker="o", label="accuracy (solid)"),
        Line2D([], [], color="0.2", ls="--", marker="o", mfc="white", label="confidence (dashed)"),
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(handles),
        frameon=False,
        fontsize=9,
    )
    fig.suptitle("Scaling with student size (mean over seeds; bars: std)", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)
