"""Show a :class:`~normlab.crossval.compare.CrossvalReport`: rich tables, JSON, and an HTML section.

The model table has one row per layer (graph order) and one column per backend pair with
``delta_L = mean|L_1 - L_2|``; cells above the noise floor are red, the first inconsistent layer's row is
highlighted and the layer with the highest introduction rate R_L (CRADLE's localization) is marked.
"""

from __future__ import annotations

import html
import json
import math

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from normlab.crossval.compare import CrossvalReport
from normlab.crossval.probe import BNProbe


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _pair_name(pair) -> str:
    return f"{pair.backends[0]}|{pair.backends[1]}"


def backend_rows(report: CrossvalReport) -> list[list[str]]:
    return [
        [
            s.name,
            s.status,
            f"{s.seconds:.3f}",
            _fmt(s.delta_to_truth),
            "; ".join([s.message, *s.notes]).strip("; "),
        ]
        for s in report.backends
    ]


def pair_columns(report: CrossvalReport) -> list[str]:
    """The pair table's columns: class and localization columns only for models, stats only for BN."""
    cols = ["pair", "mean |O1-O2|", "max |O1-O2|", "max D_MAD"]
    if any(p.d_class is not None for p in report.pairs):
        cols.append("max D_CLASS")
    if any(p.stats_d_mad for p in report.pairs):
        cols.append("stats D_MAD")
    if any(p.layers for p in report.pairs):
        cols += ["first inconsistent layer", "localized (max R_L)"]
    return [*cols, "verdict"]


def pair_rows(report: CrossvalReport) -> list[list[str]]:
    cols = pair_columns(report)
    rows = []
    for p in report.pairs:
        cells = {
            "pair": _pair_name(p),
            "mean |O1-O2|": _fmt(p.delta),
            "max |O1-O2|": _fmt(p.max_abs),
            "max D_MAD": _fmt(max(p.d_mad, default=0.0)),
            "max D_CLASS": "-" if p.d_class is None else _fmt(max(p.d_class, default=0.0)),
            "stats D_MAD": ", ".join(f"{k} {_fmt(v)}" for k, v in p.stats_d_mad.items()) or "-",
            "first inconsistent layer": p.first_inconsistent or "-",
            "localized (max R_L)": p.localized or "-",
            "verdict": "INCONSISTENT: " + "; ".join(p.reasons) if p.inconsistent else "consistent",
        }
        rows.append([cells[c] for c in cols])
    return rows


_BACKEND_COLS = ["backend", "status", "seconds", "mean |O - G|", "notes"]


def layer_rows(report: CrossvalReport) -> tuple[list[str], list[list[str]], set[int]]:
    """Header, rows, and the indices of rows that are some pair's first inconsistent layer."""
    pairs = [p for p in report.pairs if p.layers]
    if not pairs:
        return [], [], set()
    header = ["layer", "op", *[_pair_name(p) for p in pairs], "marks"]
    rows, first = [], set()
    for i, base in enumerate(pairs[0].layers):
        marks = []
        for p in pairs:
            if p.first_inconsistent == base.layer:
                marks.append(f"first inconsistent ({_pair_name(p)})")
                first.add(i)
            if p.localized == base.layer:
                marks.append(f"localized, R_L={_fmt(p.layers[i].rate)} ({_pair_name(p)})")
        rows.append([base.layer, base.op, *[_fmt(p.layers[i].delta) for p in pairs], "; ".join(marks)])
    return header, rows, first


def _table(title: str, header: list[str], rows: list[list[str]], highlight: set[int] = frozenset()) -> Table:
    table = Table(title=title, show_lines=False)
    for col in header:
        table.add_column(col, overflow="fold")
    for i, row in enumerate(rows):
        table.add_row(*[Text(c) for c in row], style="bold red" if i in highlight else None)
    return table


def render(report: CrossvalReport, console: Console | None = None) -> None:
    """Print the report's tables (backends, pairs, per-layer distances, convention differences)."""
    console = console or Console()
    parts = [
        _table(f"crossval {report.target}: backends", _BACKEND_COLS, backend_rows(report)),
        _table(
            f"pairwise distances (T_MAD={report.thresholds.t_mad}, T_C={report.thresholds.t_class}, "
            f"p={report.thresholds.p})",
            pair_columns(report),
            pair_rows(report),
        ),
    ]
    header, rows, first = layer_rows(report)
    if rows:
        parts.append(
            _table(
                "per-layer delta_L = mean|L1 - L2| (first inconsistent layer highlighted)",
                header,
                rows,
                first,
            )
        )
    if report.conventions:
        parts.append(
            _table(
                "convention differences (not bugs)",
                ["pair", "what", "values", "expected", "measured", "note"],
                [
                    [
                        f"{c.backends[0]}|{c.backends[1]}",
                        c.what,
                        " vs ".join(c.values),
                        _fmt(c.expected),
                        _fmt(c.measured),
                        c.note,
                    ]
                    for c in report.conventions
                ],
            )
        )
    console.print(Group(*parts))


def to_json(obj: CrossvalReport | list[BNProbe]) -> str:
    """JSON text; non-finite floats become strings so any JSON reader accepts it."""
    data = [p.to_dict() for p in obj] if isinstance(obj, list) else obj.to_dict()
    return json.dumps(_finite(data), indent=2)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _html_table(header: list[str], rows: list[list[str]], highlight: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="crossval-first"' if i in highlight else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def report_html(report: CrossvalReport) -> str:
    """An HTML ``<section>`` (escaped strings, tables) for normlab's reports."""
    header, rows, first = layer_rows(report)
    parts = [
        f'<section class="crossval"><h2>Cross-backend validation: {html.escape(report.target)}</h2>',
        f"<p>Verdict: {'INCONSISTENT' if report.inconsistent else 'consistent'} "
        f"(T_MAD={report.thresholds.t_mad}, T_C={report.thresholds.t_class}, p={report.thresholds.p}).</p>",
        _html_table(_BACKEND_COLS, backend_rows(report)),
        _html_table(pair_columns(report), pair_rows(report)),
    ]
    if rows:
        parts.append(_html_table(header, rows, first))
    if report.conventions:
        parts.append(
            _html_table(
                ["pair", "what", "expected", "measured", "note"],
                [
                    [" | ".join(c.backends), c.what, _fmt(c.expected), _fmt(c.measured), c.note]
                    for c in report.conventions
                ],
            )
        )
    parts.append("</section>")
    return "\n".join(parts)


_PROBE_COLS = [
    "backend",
    "library",
    "eps default",
    "momentum default",
    "new-batch weight (1 step)",
    "momentum meaning",
    "running var",
    "batch size 1, training",
    "float16",
    "bfloat16",
]


def probe_rows(probes: list[BNProbe]) -> list[list[str]]:
    rows = []
    for p in probes:
        if p.skipped:
            rows.append([p.backend, "skipped: " + p.skipped] + [""] * (len(_PROBE_COLS) - 2))
            continue
        rows.append(
            [
                p.backend,
                p.library,
                _fmt(p.eps_default),
                _fmt(p.momentum_default),
                _fmt(p.new_batch_weight),
                p.momentum_meaning,
                p.running_var,
                p.batch1_train,
                p.half.get("float16", "-"),
                p.half.get("bfloat16", "-"),
            ]
        )
    return rows


def render_probes(probes: list[BNProbe], console: Console | None = None) -> None:
    (console or Console()).print(_table("BatchNorm conventions, measured", _PROBE_COLS, probe_rows(probes)))


def conventions_html(probes: list[BNProbe]) -> str:
    """An HTML ``<section>`` with the measured conventions table."""
    return (
        '<section class="crossval-conventions"><h2>BatchNorm conventions (measured)</h2>'
        + _html_table(_PROBE_COLS, probe_rows(probes))
        + "</section>"
    )
