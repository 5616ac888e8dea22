"""Self-contained HTML reports and Markdown summaries: tables, inline figures, config and environment."""

from normlab.reports.document import ReportFiles, Section, render_html, render_markdown, write_report
from normlab.reports.figure import Figure, save_matplotlib
from normlab.reports.table import Table, format_cell

__all__ = [
    "Figure",
    "ReportFiles",
    "Section",
    "Table",
    "format_cell",
    "render_html",
    "render_markdown",
    "save_matplotlib",
    "write_report",
]
