"""``normlab report STORE``: every run in a results store as tables (one per run group), with the
status counts, the config fields that vary inside the group, and the numeric summary values."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from normlab.reports.document import ReportFiles, Section, write_report
from normlab.reports.table import Table

# Summary fields not worth a column in an overview (bulky or duplicated elsewhere).
_SKIP_SUMMARY = {"run_id", "config"}


def store_report(store: Any, out_dir: str | Path) -> ReportFiles:
    """Write ``<out_dir>/report.html`` + ``report.md`` describing every run of ``store``."""
    runs = store.runs()
    groups: dict[str, list[Any]] = defaultdict(list)
    for run in runs:
        groups[run.group or "(no group)"].append(run)
    counts = Counter(run.status for run in runs)
    overview = Table(
        "Runs by status",
        ["status", "runs"],
        [[s, counts[s]] for s in ("finished", "diverged", "failed", "running") if counts[s]],
    )
    sections = [
        Section(
            "Overview",
            text=[f"{len(runs)} runs in {len(groups)} group(s), store {store.path}."],
            tables=[overview],
        )
    ]
    for name, members in sorted(groups.items()):
        configs = [run.config for run in members]
        varying = set(varying_fields(configs)) if len(configs) > 1 else set()
        common = {k: v for k, v in configs[0].items() if k not in varying}
        sections.append(Section(f"Group {name}", text=["Settings shared by every run of the group:"],
                                tables=[runs_table(name, members)], data=common))
    failed = [run for run in runs if run.status in ("failed", "diverged") and run.error]
    if failed:
        errors = Table("Failed and diverged runs", ["run", "status", "error"])
        for run in failed:
            errors.add_row(run.id, run.status, run.error)
        sections.append(Section("Errors", tables=[errors]))
    environments = {json.dumps(run.environment, sort_keys=True) for run in runs}
    if environments:
        distinct = [json.loads(e) for e in sorted(environments)]
        sections.append(Section("Environment", data={"environments": distinct}))
    return write_report(out_dir, f"normlab results: {Path(store.path).name}", sections)


def runs_table(title: str, runs: list[Any]) -> Table:
    """One row per run: id, status, the config fields that differ between ``runs``, numeric summaries."""
    varying = varying_fields([run.config for run in runs])
    summary_keys = sorted(
        {k for run in runs for k, v in run.summary.items() if _is_number(v) and k not in _SKIP_SUMMARY}
    )
    table = Table(title, ["run", "status", *varying, *summary_keys, "wall time (s)"])
    for run in runs:
        table.add_row(
            run.id,
            run.status,
            *[_scalar(run.config.get(k)) for k in varying],
            *[run.summary.get(k) for k in summary_keys],
            run.wall_time,
        )
    return table


def varying_fields(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose value is not the same in every config (all keys when there is one config)."""
    keys = sorted({k for c in configs for k in c})
    if len(configs) <= 1:
        return keys
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)
