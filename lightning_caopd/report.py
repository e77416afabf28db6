"""Tables from run directories: `python -m lightning_caopd.report <dir>...`.

Reads every ``metrics.json`` under the given run or multirun directories and prints a markdown
table, one row per method (mean +- std over runs), plus a ``base`` row from the runs'
``initial`` evaluation (the model before its first training step).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

COLUMNS = ("accuracy", "mean_confidence", "ece", "brier", "ocg", "spr", "format_rate", "confidence_entropy")


def collect(dirs: list[str | Path]) -> list[dict]:
    """Every metrics.json under `dirs`, each with its ``path``."""
    runs = []
    for d in dirs:
        for path in sorted(Path(d).rglob("metrics.json")):
            run = json.loads(path.read_text())
            run["path"] = str(path)
            runs.append(run)
    if not runs:
        raise SystemExit(f"No metrics.json found under {', '.join(map(str, dirs))}: pass run directories.")
    return runs


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def summary_table(runs: list[dict]) -> str:
    """Markdown table: base (initial evaluations), then each method."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if run.get("initial"):
            groups["base"].append(run["initial"])
        groups[run.get("run", {}).get("method", "run")].append(run)
    lines = [
        "| model | runs | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, rows in groups.items():
        cells = [_fmt([r.get(c) for r in rows]) for c in COLUMNS]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories")
    args = parser.parse_args(argv)
    print(summary_table(collect(args.dirs)))


if __name__ == "__main__":
    main()
