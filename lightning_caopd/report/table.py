"""The report's table: every ``metrics.json`` under run directories, grouped into rows.

`write_report` writes ``report.md`` (a markdown table, one row per method and config: mean +- std
over seeds, plus a ``base`` row from the runs' ``initial`` evaluation, the model before its first
training step) and the three figures of `lightning_caopd.report.figures`.

Runs of one method that differ in a Hydra override other than the seed (``.hydra/overrides.yaml``
in the run dir, e.g. a learning-rate sweep) get a row each.
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


def groups(runs: list[dict]) -> dict[str, list[dict]]:
    """Evaluations by row label: ``base`` (distinct initial evaluations), then method[+config].

    Each evaluation carries ``png``, the reliability diagram its run saved.
    """
    varying = sorted(
        {
            k
            for r in runs
            for k in r["overrides"]
            if len({r2["overrides"].get(k) for r2 in runs}) > 1
        }
    )
    out: dict[str, list[dict]] = defaultdict(list)
    seen = set()
    for run in runs:
        folder = Path(run["path"]).parent
        initial = run.get("initial")
        # the same base evaluated for every method of a seed: count it once
        if initial and (key := tuple(initial.get(c) for c in COLUMNS)) not in seen:
            seen.add(key)
            out[figures.BASE].append({**initial, "png": str(folder / "reliability_initial.png")})
        config = ", ".join(
            f"{k}={_short(run['overrides'][k])}" for k in varying if k in run["overrides"]
        )
        method = run.get("run", {}).get("method", "run")
        out[f"{method} ({config})" if config else method].append(
            {**run, "png": str(folder / "reliability.png")}
        )
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


def write_report(dirs: list[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Write report.md and the figures for the runs under `dirs`; return what was written."""
    runs = collect(dirs)
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs)
    by_group = groups(runs)
    written = {"table": out / "report.md"}
    written["table"].write_text(
        f"Runs: {len(runs)} metrics.json under {', '.join(map(str, dirs))}\n\n{table}\n"
    )
    written["confidence_vs_accuracy"] = figures.confidence_vs_accuracy(
        by_group, out / "confidence_vs_accuracy.png"
    )
    written["accuracy_vs_ece"] = figures.accuracy_vs_ece(by_group, out / "accuracy_vs_ece.png")
    written["reliability"] = figures.reliability_grid(by_group, out / "reliability.png")
    return written
