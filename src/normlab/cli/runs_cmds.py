"""``normlab runs list|show|export``: read the results store."""

from __future__ import annotations

import json
import sys

import typer

from normlab.cli._common import STORE_HELP, check_file_target, console, existing_store, fmt, print_json
from normlab.errors import NormlabError
from normlab.files import atomic_open

runs_app = typer.Typer(help="List, show and export the runs in the results store.", no_args_is_help=True)


@runs_app.command("list")
def runs_list(
    status: str | None = typer.Option(None, help="finished, diverged, failed or running"),
    group: str | None = typer.Option(None, help="only runs of this group"),
    limit: int | None = typer.Option(None, help="at most this many (the latest)"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """List runs, oldest first."""
    if limit is not None and limit < 1:
        raise NormlabError(f"--limit must be a positive int, got {limit}")
    with existing_store(store) as db:
        runs = db.runs(status=status, group=group)
    if limit is not None:
        runs = runs[-limit:]
    if json_output:
        print_json([run.to_dict() for run in runs])
        return
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs")
    columns = ("id", "name", "status", "convergence", "model", "norm", "batch", "lr", "seed", "steps",
               "test acc", "steps/s", "wall")
    left = ("name", "status", "convergence", "model", "norm")
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for run in runs:
        c, s = run.config, run.summary
        table.add_row(
            str(run.id), fmt(run.name), fmt(run.status), fmt(s.get("convergence") or "-"),
            fmt(str(c.get("model"))), fmt(str(c.get("norm"))), fmt(str(c.get("batch_size"))),
            fmt(c.get("lr")), fmt(str(c.get("seed"))), fmt(s.get("steps")), fmt(s.get("final_test_acc")),
            fmt(s.get("steps_per_s")), fmt(run.wall_time, 3),
        )  # fmt: skip
    console().print(table)


@runs_app.command("show")
def runs_show(
    run_id: int = typer.Argument(..., help="run id (see `normlab runs list`)"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """Show one run: config, environment, summary and its metrics' last values."""
    if not 1 <= run_id < 2**63:  # SQLite's INTEGER range; ids start at 1
        raise NormlabError(f"run id must be between 1 and 2**63-1, got {run_id}")
    with existing_store(store) as db:
        run = db.get_run(run_id)
        metrics = {name: db.metrics(run_id, name) for name in db.metric_names(run_id)}
    if json_output:
        series = {name: [[step, value] for step, value in points] for name, points in metrics.items()}
        print_json({**run.to_dict(), "metrics": series})
        return
    from rich.table import Table

    out = console()
    title = f"{fmt(run.name or '')} status={fmt(run.status)} group={fmt(run.group or '-')}"
    out.print(f"[bold]run {run.id}[/bold] {title}")
    if run.error:
        out.print(f"error: {fmt(run.error)}")
    for title, values in (("config", run.config), ("summary", run.summary), ("environment", run.environment)):
        table = Table(title=title)
        table.add_column("field")
        table.add_column("value", justify="right")
        for key, value in values.items():
            shown = json.dumps(value) if isinstance(value, (dict, list)) else value
            table.add_row(fmt(key), fmt(shown))
        out.print(table)
    table = Table(title="metrics")
    for column in ("name", "points", "last step", "last value"):
        table.add_column(column)
    for name, series in metrics.items():
        table.add_row(fmt(name), str(len(series)), str(series[-1][0]), fmt(series[-1][1]))
    out.print(table)


@runs_app.command("export")
def runs_export(
    format: str = typer.Option("csv", "--format", help="csv or json"),
    output: str | None = typer.Option(None, "--output", "-o", help="file to write (default: stdout)"),
    status: str | None = typer.Option(None, help="only runs with this status"),
    group: str | None = typer.Option(None, help="only runs of this group"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    metrics: bool = typer.Option(
        False, "--metrics", help="per-step metrics: JSON adds each run's series; CSV writes one row per "
        "point (run_id, step, name, value)"
    ),
) -> None:
    """Export runs (config and summary flattened per row for CSV; full records for JSON)."""
    from normlab.store.export import EXPORT_FORMATS

    if format not in EXPORT_FORMATS:
        raise NormlabError(f"unknown export format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    check_file_target(output, "--output")
    with existing_store(store) as db:
        if metrics:
            _export_metrics(db, output, format, status=status, group=group)
            return
        db.export(output if output is not None else sys.stdout, format, status=status, group=group)


def _export_metrics(db, output: str | None, format: str, **filters) -> None:
    """Runs with their per-step metrics: JSON records with ``metrics`` {name: [[step, value], ...]} (and
    ``schema``), or CSV rows ``run_id,step,name,value``."""
    import contextlib
    import csv

    from normlab.cli._common import JSON_SCHEMA
    from normlab.store.export import json_safe

    runs = db.runs(**filters)
    with contextlib.ExitStack() as stack:
        stream = sys.stdout if output is None else stack.enter_context(
            atomic_open(output, "w", newline="", devices=True))
        if format == "json":
            records = []
            for run in runs:
                series = {n: [[s, v] for s, v in db.metrics(run.id, n)] for n in db.metric_names(run.id)}
                records.append({"schema": JSON_SCHEMA, **run.to_dict(), "metrics": series})
            stream.write(json.dumps(json_safe(records), indent=2, allow_nan=False) + "\n")
            return
        writer = csv.writer(stream)
        writer.writerow(["run_id", "step", "name", "value"])
        for run in runs:
            for name in db.metric_names(run.id):
                writer.writerows([run.id, step, name, value] for step, value in db.metrics(run.id, name))


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
