"""The report's tables: every ``metrics.json`` under run directories, grouped into rows.

`write_report` writes ``report.md`` and the figures of `lightning_caopd.report.figures`.
``report.md`` holds:

- the summary table (`summary_table`): one row per method and config, mean +- std over seeds,
  and ``base`` rows from the runs' ``initial`` evaluation (the model before its first training
  step);
- when the runs span two or more student sizes (``n_parameters``), the scaling table
  (`scaling_table`, drawn as ``scaling.png``): per size, each method's and the base's accuracy,
  mean stated confidence and ECE;
- when runs carry a ``teacher_conditioned`` block, its summary per method
  (`teacher_conditioned_table`) beside the student's own accuracy and confidence entropy.

Runs of one method that differ in a Hydra override other than the seed (``.hydra/overrides.yaml``
in the run dir, e.g. a learning-rate sweep) get a row each; so do runs of different sizes, even
when the size came from an override the table ignores (``model.path``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from lightning_caopd.report import figures

COLUMNS = (
    "accuracy",
    "mean_confidence",
    "ece",
    "brier",
    "brier_all",
    "ocg",
    "spr",
    "format_rate",
    "confidence_entropy",
)
# overrides that do not make a different config: where a run lives, how it is run, which seed
_NOT_CONFIG = {
    "seed",
    "experiment",
    "method",
    "model.path",
    "threads",
    "ckpt_path",
    "logger",
    "callbacks",
    "trainer.devices",
    "trainer.accelerator",
}
_NOT_CONFIG_PREFIXES = ("hydra.", "paths.", "hydra/")
SCALING = ("accuracy", "mean_confidence", "ece")
TEACHER_CONDITIONED = (
    "accuracy",
    "mean_confidence",
    "confidence_entropy",
    "optimism_gap",
    "entropy_gap",
)


def collect(dirs: list[str | Path]) -> list[dict]:
    """Every metrics.json under `dirs`, each with its ``path`` and its config ``overrides``."""
    runs = []
    for d in dirs:
        for path in sorted(Path(d).rglob("metrics.json")):
            try:
                run = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise SystemExit(
                    f"{path} is not valid JSON ({e}); a run killed while writing it leaves no such "
                    "file (runner writes atomically), so it was edited or copied partly: delete it "
                    "or re-run that run."
                ) from e
            run["path"] = str(path)
            run["overrides"] = _overrides(path.parent / ".hydra" / "overrides.yaml")
            runs.append(run)
    if not runs:
        raise SystemExit(
            f"No metrics.json found under {', '.join(map(str, dirs))}: pass run directories."
        )
    return runs


def _overrides(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for item in OmegaConf.load(path):
        key, _, value = str(item).lstrip("+~").partition("=")
        if key not in _NOT_CONFIG and not key.startswith(_NOT_CONFIG_PREFIXES):
            out[key] = value
    return out


def _size(run: dict) -> int | None:
    """The student's parameter count (``n_parameters``), None for runs that do not record it."""
    n = run.get("n_parameters", (run.get("initial") or {}).get("n_parameters"))
    return None if n is None else int(n)


def _varying(runs: list[dict]) -> list[str]:
    """The config overrides that take more than one value over `runs`."""
    keys = {k for r in runs for k in r["overrides"]}
    return sorted(k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1)


def _label(run: dict, keys: list[str], extra: str = "") -> str:
    """The run's method, with its values of the override `keys` (and `extra`) in brackets."""
    config = [f"{k}={_short(run['overrides'][k])}" for k in keys if k in run["overrides"]]
    config += [extra] if extra else []
    method = run.get("run", {}).get("method", "run")
    return f"{method} ({', '.join(config)})" if config else method


def _initials(runs: list[dict]) -> list[tuple[dict, dict]]:
    """Each distinct initial evaluation once, with the first run that holds it.

    The same base is evaluated for every method of a seed; counting it once per run would weight
    the base by the number of methods.
    """
    seen, out = set(), []
    for run in runs:
        initial = run.get("initial")
        key = tuple(initial.get(c) for c in COLUMNS) if initial else None
        if key is not None and key not in seen:
            seen.add(key)
            out.append((initial, run))
    return out


def groups(runs: list[dict]) -> dict[str, list[dict]]:
    """Evaluations by row label: the base (distinct initial evaluations), then method[+config].

    With several student sizes the base gets a row per size, ``base (20K params)``, and a method
    row whose runs have different sizes (swept by an override the table ignores) is split by size.
    Each evaluation carries ``png``, the reliability diagram its run saved.
    """
    multi_size = len({_size(r) for r in runs} - {None}) > 1
    out: dict[str, list[dict]] = defaultdict(list)
    for initial, run in sorted(_initials(runs), key=lambda ir: _size(ir[1]) or 0):
        n = _size(run)
        label = f"{figures.BASE} ({figures.count_label(n)} params)" if multi_size and n else None
        png = str(Path(run["path"]).parent / "reliability_initial.png")
        out[label or figures.BASE].append({**initial, "png": png})
    varying = _varying(runs)
    runs = sorted(runs, key=lambda r: _size(r) or 0)  # a size sweep's rows: smallest first
    labels = [_label(run, varying) for run in runs]
    sizes_of = defaultdict(set)  # known sizes only: a run that does not record one may match
    for run, label in zip(runs, labels, strict=True):
        sizes_of[label].add(_size(run))
        sizes_of[label].discard(None)
    for run, label in zip(runs, labels, strict=True):
        if len(sizes_of[label]) > 1:
            n = _size(run)
            label = _label(run, varying, f"{figures.count_label(n)} params" if n else "size n/a")
        out[label].append({**run, "png": str(Path(run["path"]).parent / "reliability.png")})
    return dict(out)


def _short(value: str) -> str:
    """A long float literal (an Optuna trial's lr) to 3 significant digits; others as given."""
    try:
        return f"{float(value):.3g}" if len(value) > 8 else value
    except ValueError:
        return value


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def summary_table(runs: list[dict]) -> str:
    """Markdown table: base (initial evaluations), then each method and config."""
    lines = [
        "| model | runs | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, rows in groups(runs).items():
        cells = [_fmt([r.get(c) for r in rows]) for c in COLUMNS]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stats(evaluations: list[dict]) -> dict[str, tuple[float, float | None, int]]:
    """``(mean, std or None for one value, count)`` of each `SCALING` key the evaluations have."""
    out = {}
    for key in SCALING:
        values = [e[key] for e in evaluations if e.get(key) is not None]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else None
            out[key] = (statistics.fmean(values), std, len(values))
    return out


def scaling_points(runs: list[dict]) -> dict[str, dict[int, dict[str, tuple]]]:
    """Accuracy, mean confidence and ECE per series and student size, over the seeds.

    Series: ``base`` (each distinct initial evaluation once), then each method with the overrides
    that vary other than with size (the size override itself, constant within a size, is
    dropped). Runs without ``n_parameters`` are left out.

    Returns:
        label -> parameter count (ascending) -> metric -> ``(mean, std or None, count)``; empty
        unless the runs span two or more sizes.
    """
    sized = [r for r in runs if _size(r) is not None]
    sizes = {_size(r) for r in sized}
    if len(sizes) < 2:
        return {}
    keys = [
        k
        for k in _varying(sized)
        if any(len({r["overrides"].get(k) for r in sized if _size(r) == n}) > 1 for n in sizes)
    ]
    points: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for initial, run in _initials(sized):
        points[figures.BASE][_size(run)].append(initial)
    for run in sized:
        points[_label(run, keys)][_size(run)].append(run)
    return {
        label: {n: _stats(by_size[n]) for n in sorted(by_size)} for label, by_size in points.items()
    }


def scaling_table(series: dict[str, dict[int, dict[str, tuple]]]) -> str:
    """Markdown: a row per size, a column per series, cells "accuracy / confidence / ECE"."""
    sizes = sorted({n for by_size in series.values() for n in by_size})
    lines = [
        "| params | " + " | ".join(series) + " |",
        "|---|" + "---|" * len(series),
    ]
    for n in sizes:
        cells = []
        for by_size in series.values():
            stats = by_size.get(n)
            cells.append(
                "–"
                if stats is None
                else " / ".join(f"{stats[k][0]:.3f}" if k in stats else "n/a" for k in SCALING)
            )
        lines.append(f"| {figures.count_label(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_conditioned_table(runs: list[dict]) -> str:
    """Markdown: each method's final ``teacher_conditioned`` block beside the student's own.

    Mean +- std over the seeds of the block's `TEACHER_CONDITIONED` keys, then the student's
    accuracy and confidence entropy. Empty when no run carries the block.
    """
    student = ("accuracy", "confidence_entropy")
    lines = []
    for name, rows in groups(runs).items():
        blocks = [r["teacher_conditioned"] for r in rows if r.get("teacher_conditioned")]
        if figures.is_base(name) or not blocks:
            continue
        cells = [_fmt([b.get(k) for b in blocks]) for k in TEACHER_CONDITIONED]
        cells += [_fmt([r.get(k) for r in rows if r.get("teacher_conditioned")]) for k in student]
        lines.append(f"| {name} | {len(blocks)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = [*TEACHER_CONDITIONED, *(f"student {k}" for k in student)]
    return "\n".join(
        [
            "| model | runs | " + " | ".join(header) + " |",
            "|---|---|" + "---|" * len(header),
            *lines,
        ]
    )


def report_markdown(runs: list[dict], dirs: list[str | Path]) -> str:
    """The whole of ``report.md``: the summary, and the scaling and teacher tables that apply."""
    parts = [
        f"Runs: {len(runs)} metrics.json under {', '.join(map(str, dirs))}",
        summary_table(runs),
    ]
    if series := scaling_points(runs):
        parts += [
            "## Scaling with student size (scaling.png)",
            "Each cell: accuracy / mean stated confidence / ECE, the mean over seeds; base: the "
            "runs' initial evaluations.",
            scaling_table(series),
        ]
    if teacher := teacher_conditioned_table(runs):
        parts += [
            "## Teacher-conditioned evaluation",
            "The final evaluation's `teacher_conditioned` block, mean ± std over seeds, beside "
            "the student's own accuracy and confidence entropy.",
            teacher,
        ]
    return "\n\n".join(parts) + "\n"


def write_report(dirs: list[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Write report.md and the figures for the runs under `dirs`; return what was written.

    ``scaling.png`` only when the runs span two or more student sizes.
    """
    runs = collect(dirs)
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    by_group = groups(runs)
    written = {"table": out / "report.md"}
    written["table"].write_text(report_markdown(runs, dirs))
    written["confidence_vs_accuracy"] = figures.confidence_vs_accuracy(
        by_group, out / "confidence_vs_accuracy.png"
    )
    written["accuracy_vs_ece"] = figures.accuracy_vs_ece(by_group, out / "accuracy_vs_ece.png")
    written["reliability"] = figures.reliability_grid(by_group, out / "reliability.png")
    if series := scaling_points(runs):
        written["scaling"] = figures.scaling(series, out / "scaling.png")
    return written
