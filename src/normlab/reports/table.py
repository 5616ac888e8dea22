"""A result table (title, columns, rows, notes) and its HTML / Markdown renderings.

Every cell is rendered through :func:`format_cell`; every string that reaches HTML goes through
``html.escape`` because column names, notes and cells can come from user recipes or run configs.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from normlab.errors import NormlabError
from normlab.text import one_line


@dataclass
class Table:
    """A titled table: ``rows[i][j]`` is the value of ``columns[j]`` in row ``i``.

    Cells are plain values (str, int, float, bool, None) or ``(mean, half_width)`` tuples, which render as
    ``mean ± half_width`` (a 95% confidence interval from :func:`normlab.studies.mean_ci`).
    """

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.notes, str):
            self.notes = [self.notes]
        for i, row in enumerate(self.rows):
            self._check_row(row, i)

    def _check_row(self, row: list[Any], index: int) -> None:
        if len(row) != len(self.columns):
            raise NormlabError(
                f"table {self.title!r}: row {index} has {len(row)} cells, expected {len(self.columns)} "
                f"(columns: {', '.join(self.columns)})"
            )

    def add_row(self, *cells: Any) -> None:
        """Append one row; it must have one cell per column."""
        row = list(cells)
        self._check_row(row, len(self.rows))
        self.rows.append(row)

    def column(self, name: str) -> list[Any]:
        """The cells of column ``name``, top to bottom."""
        if name not in self.columns:
            raise NormlabError(
                f"table {self.title!r} has no column {name!r}; columns: {', '.join(self.columns)}"
            )
        j = self.columns.index(name)
        return [row[j] for row in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists); :meth:`from_dict` inverts it."""
        return {
            "title": self.title,
            "columns": list(self.columns),
            "rows": [[_jsonable(c) for c in row] for row in self.rows],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Table:
        rows = [[tuple(c) if isinstance(c, list) else c for c in row] for row in data["rows"]]
        return cls(data["title"], list(data["columns"]), rows, list(data.get("notes", [])))

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown: a bold title line, the pipe table, then the notes."""
        head = "| " + " | ".join(_md_escape(c) for c in self.columns) + " |"
        rule = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(_md_escape(format_cell(c)) for c in row) + " |" for row in self.rows]
        lines = [f"**{_md_escape(self.title)}**", "", head, rule, *body]
        if self.notes:
            lines += [""] + [f"- {_md_escape(n)}" for n in self.notes]
        return "\n".join(lines)

    def to_html(self) -> str:
        """An HTML ``<table>`` with a caption; every string escaped."""
        esc = html.escape
        head = "".join(f"<th>{esc(str(c))}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(format_cell(c))}</td>" for c in row) + "</tr>" for row in self.rows
        )
        notes = "".join(f"<li>{esc(n)}</li>" for n in self.notes)
        notes_html = f'<ul class="notes">{notes}</ul>' if notes else ""
        return (
            f'<table><caption>{esc(self.title)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>{notes_html}"
        )


def format_cell(value: Any, digits: int = 4) -> str:
    """One cell as text: floats to ``digits`` significant digits, ``(mean, hw)`` as ``mean ± hw``."""
    if value is None:
        return "—"
    if isinstance(value, tuple) and len(value) == 2:
        mean, half = value
        if half is None or (isinstance(half, float) and math.isnan(half)):
            return format_cell(mean, digits)
        return f"{format_cell(mean, digits)} ± {format_cell(half, 2)}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def _md_escape(text: str) -> str:
    # html.escape: Markdown viewers render raw HTML, so a cell holding ``<script>`` must stay text.
    return html.escape(one_line(text), quote=False).replace("|", "\\|")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value
