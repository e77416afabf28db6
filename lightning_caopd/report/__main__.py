"""Tables and figures from run directories: `python -m lightning_caopd.report <dir>...`.

Reads every ``metrics.json`` under the given run or multirun directories and writes
``report.md`` (mean +- std over seeds per method and config, and the ``base`` row; a scaling
table when the runs span several student sizes; a teacher-conditioned table when the runs carry
that block) and these figures into ``--out`` (default: the first directory):

- ``confidence_vs_accuracy.png``: mean confidence against accuracy with the diagonal, one point
  per run (the paper's Figure 1 view);
- ``accuracy_vs_ece.png``: accuracy against ECE, the Pareto front marked;
- ``reliability.png``: reliability diagrams side by side, base and each method;
- ``scaling.png``, only when the runs span two or more student sizes (``n_parameters``):
  accuracy and stated confidence (left) and ECE (right) against size, base and each method
  (the paper's scaling figure).
"""

from __future__ import annotations

import argparse

from lightning_caopd.report.table import collect, report_markdown, write_report


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_caopd.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dirs", nargs="+", help="run or multirun directories")
    parser.add_argument("--out", help="where report.md and the figures go (default: the first dir)")
    parser.add_argument("--no-figures", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    if args.no_figures:
        print(report_markdown(collect(args.dirs), args.dirs), end="")
        return
    written = write_report(args.dirs, args.out)
    print(written["table"].read_text(), end="")
    print("Wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
