"""Self-contained HTML reports and Markdown summaries: tables, inline figures, config and environment."""

from normlab.reports.compare import compare_report
from normlab.reports.document import ReportFiles, Section, render_html, render_markdown, write_report
from normlab.reports.figure import Figure, save_matplotlib
from normlab.reports.stats import mean_ci, t_quantile_975
from normlab.reports.store_report import store_report
from normlab.reports.table import Table, format_cell

__all__ = [
    "Figure",
    "ReportFiles",
    "Section",
    "Table",
    "compare_report",
    "format_cell",
    "mean_ci",
    "render_html",
    "render_markdown",
    "save_matplotlib",
    "store_report",
    "t_quantile_975",
    "write_report",
]
