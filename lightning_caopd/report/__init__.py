"""Tables and figures from run directories: `python -m lightning_caopd.report <dir>...`.

:mod:`.table` reads the runs' ``metrics.json`` and writes ``report.md``, :mod:`.figures` draws
the figures, :mod:`.__main__` is the command line.
"""

from lightning_caopd.report.table import (
    collect,
    report_markdown,
    scaling_points,
    summary_table,
    write_report,
)

__all__ = ["collect", "report_markdown", "scaling_points", "summary_table", "write_report"]
