"""Write a report: one self-contained ``report.html`` (inline figures, no external resources) and a
``report.md`` summary, from a title and a list of :class:`Section` s.

Every user-provided string (titles, text, table cells, config values) is escaped with ``html.escape``, in
the HTML and in the Markdown (whose viewers render raw HTML), so a ``<script>`` in a run name shows as text.
The page sets ``data-figures-loaded`` on ``<body>`` once every ``<img>`` has decoded (``naturalWidth > 0``),
which lets a headless browser check that the figures render.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.files import atomic_write
from normlab.reports.figure import Figure
from normlab.reports.table import Table
from normlab.text import one_line, relative_href


@dataclass
class Section:
    """One report section: a heading, paragraphs, then tables and figures.

    ``callout`` is a highlighted sentence (a verdict) and ``callout_kind`` its style: ``"info"``,
    ``"ok"`` (agrees with the paper) or ``"warn"`` (disagrees / needs attention). ``data`` is shown as a
    JSON block (a config, the environment). ``links`` are ``(label, relative href)`` pairs listed after the
    text (the index report links each study's report).
    """

    heading: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    callout: str | None = None
    callout_kind: str = "info"
    data: dict[str, Any] | None = None
    links: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.text, str):
            self.text = [self.text]
        if self.callout_kind not in _CALLOUT_KINDS:
            raise NormlabError(
                f"callout_kind {self.callout_kind!r} is not valid; allowed: {', '.join(_CALLOUT_KINDS)}"
            )


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` wrote: the HTML file, the Markdown file, and the Markdown text."""

    html: Path
    markdown: Path
    markdown_text: str


_CALLOUT_KINDS = ("info", "ok", "warn")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.subtitle{color:#555;margin-top:0}
table{border-collapse:collapse;margin:1em 0;font-size:.92em;display:block;overflow-x:auto;max-width:100%}
caption{font-weight:600;text-align:left;padding:.3em 0}th,td{border:1px solid #ccc;padding:.3em .5em;
text-align:right}td{white-space:nowrap}th{background:#f3f3f5}
td:first-child,th:first-child{text-align:left}ul.notes{font-size:.88em;color:#444}
figure{margin:1em 0}figure img,figure svg{max-width:100%;height:auto}figcaption{font-size:.9em;color:#444}
.callout{padding:.7em 1em;border-left:5px solid #4a7bd0;background:#eef3fb;margin:1em 0}
.callout.ok{border-color:#2f9e44;background:#ebf8ee}.callout.warn{border-color:#e8590c;background:#fff4e6}
pre{background:#f6f6f8;padding:.8em;overflow-x:auto;font-size:.85em}
footer{margin-top:3em;color:#777;font-size:.85em}
"""

# Marks the body once every image has decoded, so a headless browser can assert the figures render.
_SCRIPT = """
(function(){
  function check(){
    var imgs=[].slice.call(document.images);
    if(imgs.every(function(i){return i.complete;})){
      var ok=imgs.filter(function(i){return i.naturalWidth>0;}).length;
      document.body.setAttribute('data-figures-loaded', ok+'/'+imgs.length);
    } else { setTimeout(check, 20); }
  }
  window.addEventListener('load', check);
})();
"""


def write_report(
    out_dir: str | Path,
    title: str,
    sections: list[Section],
    *,
    subtitle: str | None = None,
    stem: str = "report",
) -> ReportFiles:
    """Write ``<out_dir>/<stem>.html`` and ``<stem>.md`` (``report`` by default); figure paths are relative
    to ``out_dir``.

    Raises:
        NormlabError: ``out_dir`` exists and is not a folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NormlabError(f"report folder {out} exists and is a file; give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    html_text = render_html(out, title, sections, subtitle=subtitle)
    md_text = render_markdown(title, sections, subtitle=subtitle)
    html_path, md_path = out / f"{stem}.html", out / f"{stem}.md"
    atomic_write(html_path, html_text)  # never through a link at report.html / report.md (issue 29)
    atomic_write(md_path, md_text)
    return ReportFiles(html=html_path, markdown=md_path, markdown_text=md_text)


def render_html(root: Path, title: str, sections: list[Section], *, subtitle: str | None = None) -> str:
    """The whole page as one string; figures are read from ``root`` and inlined."""
    esc = html.escape
    parts = [f"<h1>{esc(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="subtitle">{esc(subtitle)}</p>')
    for section in sections:
        parts.append(f"<section><h2>{esc(section.heading)}</h2>")
        if section.callout:
            parts.append(f'<div class="callout {section.callout_kind}">{esc(section.callout)}</div>')
        parts += [f"<p>{esc(p)}</p>" for p in section.text]
        if section.links:
            items = "".join(f'<li><a href="{esc(relative_href(h))}">{esc(label)}</a></li>'
                            for label, h in section.links)
            parts.append(f"<ul>{items}</ul>")
        parts += [t.to_html() for t in section.tables]
        parts += [f.to_html(root) for f in section.figures]
        if section.data is not None:
            parts.append(f"<pre>{esc(_json(section.data))}</pre>")
        parts.append("</section>")
    parts.append("<footer>Generated by normlab.</footer>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


def render_markdown(title: str, sections: list[Section], *, subtitle: str | None = None) -> str:
    """A Markdown summary: headings, callouts as quotes, tables, figure links, data as JSON blocks."""
    md = _md_text
    lines = [f"# {md(title)}"]
    if subtitle:
        lines += ["", f"_{md(subtitle)}_"]
    for section in sections:
        lines += ["", f"## {md(section.heading)}"]
        if section.callout:
            lines += ["", f"> {md(section.callout)}"]
        for p in section.text:
            lines += ["", md(p)]
        if section.links:
            lines += [""] + [f"- [{_md_label(label)}]({relative_href(h)})" for label, h in section.links]
        for t in section.tables:
            lines += ["", t.to_markdown()]
        for f in section.figures:
            lines += ["", f.to_markdown()]
        if section.data is not None:
            data = _json(section.data)
            fence = "`" * max(3, _longest_backtick_run(data) + 1)
            lines += ["", f"{fence}json", data, fence]
    return "\n".join(lines) + "\n"


def _md_text(text: str) -> str:
    """Markdown text with ``&``, ``<``, ``>`` escaped: raw HTML (``<script>``) shows as text, not tags; on one
    line (:func:`normlab.text.one_line`): a title with a newline cannot start a line of its own."""
    return html.escape(one_line(text), quote=False)


def _md_label(text: str) -> str:
    """A link's label: :func:`_md_text` with ``[`` and ``]`` escaped, so it cannot close the label."""
    return _md_text(text).replace("[", "\\[").replace("]", "\\]")


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)
