"""Run every study and summarise them in one table: ``normlab study --all``.

One row per study: its name, the paper's claim, our verdict (``agrees`` / ``disagrees`` / ``inconclusive``,
from the study's ``agrees_with_paper``), the key figures with their 95% CIs, and the wall time. The same
table leads ``<out>/index.html`` + ``index.md``, which link each study's ``<name>/report.html``.
A study that stops on bad input or an error is recorded as ``error`` with its message; the others still run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.files import atomic_write
from normlab.reports.document import ReportFiles, Section, write_report
from normlab.reports.table import Table
from normlab.studies._verdict import agreement_word
from normlab.studies.outcome_file import read_outcome_file

INDEX_FILE = "index.json"


@dataclass(frozen=True)
class SuiteRow:
    """One study's line of the ``--all`` table."""

    name: str
    claim: str
    verdict: str  # agrees / disagrees / inconclusive / error
    key_figures: str
    wall_time_s: float
    report: str  # path of the study's report.html relative to the output folder ("" on error)
    sentence: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_all(
    names: Sequence[str],
    *,
    out: str | Path = "normlab-results",
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> list[SuiteRow]:
    """Run each study of ``names`` with ``options`` (:func:`normlab.studies.run_study`'s keywords) and
    return its row; a study that raises :class:`NormlabError` or any error gets an ``error`` row."""
    from normlab.studies.runner import run_study

    report = progress or (lambda message: None)
    rows = []
    for i, name in enumerate(names, 1):
        report(f"[{i}/{len(names)}] study {name}")
        start = time.perf_counter()
        try:
            outcome, files = run_study(name, out=out, progress=progress, **options)
        except Exception as exc:  # noqa: BLE001 - one broken study must not lose the others' results
            wall = time.perf_counter() - start
            rows.append(SuiteRow(name, _claim(name), "error", f"{type(exc).__name__}: {exc}", wall, ""))
            continue
        wall = time.perf_counter() - start
        rows.append(
            SuiteRow(
                name=name,
                claim=_claim(name),
                verdict=agreement_word(outcome.agrees_with_paper),
                key_figures=outcome.key_figures,
                wall_time_s=round(wall, 1),
                report=str(Path(files.html).relative_to(Path(out))),
                sentence=outcome.verdict,
            )
        )
    return rows


def rows_from_folder(out: str | Path) -> list[SuiteRow]:
    """The rows of the study reports already under ``out`` (each ``<out>/<name>/outcome.json``), in name
    order: the ``--all`` table of studies run one by one or an interrupted ``--all``. Files that are not
    study outcomes (:func:`~normlab.studies.outcome_file.read_outcome_file`) are skipped (they are untrusted
    input: read as JSON, never executed)."""
    rows = []
    for file in sorted(Path(out).glob("*/outcome.json")):
        try:
            meta, outcome = read_outcome_file(file)
        except (NormlabError, OSError, UnicodeError):
            continue
        rows.append(SuiteRow(
            name=meta["name"],
            claim=meta["claim"],
            verdict=agreement_word(outcome.agrees_with_paper),
            key_figures=outcome.key_figures,
            wall_time_s=float(meta.get("wall_time_s", float("nan"))),
            report=f"{file.parent.name}/report.html",
            sentence=outcome.verdict,
        ))
    return rows


def index_from_folder(out: str | Path) -> ReportFiles:
    """Write ``<out>/index.html`` from the study reports already under ``out`` (:func:`rows_from_folder`);
    the subtitle's scale and seeds are those the reports record."""
    rows = rows_from_folder(out)
    if not rows:
        raise NormlabError(f"{out} holds no study output folders (no */outcome.json)")
    scales, seeds = set(), set()
    for row in rows:
        meta, _ = read_outcome_file((Path(out) / row.report).with_name("outcome.json"))
        scales.add(meta["scale"])
        seeds.add(len(meta["seeds"]))
    return write_index(out, rows, scale="/".join(sorted(scales)), seeds=max(seeds))


def _claim(name: str) -> str:
    from normlab.studies.registry import get_study

    try:
        return get_study(name).claim
    except NormlabError:
        return ""


def suite_table(rows: Sequence[SuiteRow]) -> Table:
    """The ``--all`` table: study, paper's claim, our verdict, key figures (95% CIs), wall time."""
    table = Table(
        "Every study against its paper",
        ["study", "paper's claim", "our verdict", "key figures (mean ± 95% CI over seeds)", "wall time"],
        notes=[
            "verdict: agrees / disagrees with the paper's claim, or inconclusive (an arm did not converge, "
            "fewer than 3 seeds, or the seeds' spread does not separate the arms the claim ranks).",
        ],
    )
    for row in rows:
        table.add_row(row.name, row.claim, row.verdict, row.key_figures, _duration(row.wall_time_s))
    total = sum(r.wall_time_s for r in rows)
    table.notes.append(f"total wall time {_duration(total)} for {len(rows)} studies.")
    return table


def write_index(out: str | Path, rows: Sequence[SuiteRow], *, scale: str, seeds: int) -> ReportFiles:
    """``<out>/index.html`` + ``index.md`` (the table, then a link to every study's report) and
    ``<out>/index.json`` (the rows)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / INDEX_FILE,
                 json.dumps({"scale": scale, "seeds": seeds, "rows": [r.to_dict() for r in rows]}, indent=1))
    verdicts = Section(
        "Verdicts",
        text=[f"{r.name}: {r.sentence}" for r in rows if r.sentence],
    )
    sections = [
        Section("Summary", tables=[suite_table(rows)]),
        Section("Reports", links=[(r.name, r.report) for r in rows if r.report]),
        verdicts,
    ]
    subtitle = f"normlab study --all --scale {scale} --seeds {seeds}"
    return write_report(out, "normlab studies: every claim, re-measured", sections, subtitle=subtitle,
                        stem="index")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
