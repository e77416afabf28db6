"""Tables and figures from run directories: `python -m lightning_caopd.report <dir>...`.

Reads every ``metrics.json`` under the given run or multirun directories and writes
``report.md`` (mean +- std over seeds per method and config, and the ``base`` row) and three
figures into ``--out`` (default: the first directory):

- ``confidence_vs_accuracy.png``: mean confidence against accuracy with the diagonal, one point
  per run (the paper's Figure 1 view);
- ``accuracy_vs_ece.png``: accuracy against ECE, the Pareto front marked;
- ``reliability.png``: reliability diagrams side by side, base and each method.
"""

from __future__ import annotations

import argparse

from lightning_caopd.report.table import collect, summary_table, write_report


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_caopd.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dirs", nargs="+", help="run or multirun directories")
    parser.add_argument("--out", help="where report.md and the figures go (default: the first dir)")
    parser.add_argument("--no-figures", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.no_figures:
        print(summary_table(collect(args.dirs)))
        return
    written = write_report(args.dirs, args.out)
    print(written["table"].read_text())
    print("Wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
