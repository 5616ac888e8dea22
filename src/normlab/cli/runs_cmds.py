"""``normlab runs list|show|export``: read the results store."""

from __future__ import annotations

import json
import sys

import typer

from normlab.cli._common import STORE_HELP, console, existing_store, fmt, print_json
from normlab.errors import NormlabError

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
            str(run.id), fmt(run.name), run.status, s.get("convergence") or "-", str(c.get("model")),
            str(c.get("norm")), str(c.get("batch_size")), fmt(c.get("lr")), str(c.get("seed")),
            fmt(s.get("steps")), fmt(s.get("final_test_acc")), fmt(s.get("steps_per_s")),
            fmt(run.wall_time, 3),
        )  # fmt: skip
    console().print(table)


@runs_app.command("show")
def runs_show(
    run_id: int = typer.Argument(..., help="run id (see `normlab runs list`)"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print JSON only"),
) -> None:
    """Show one run: config, environment, summary and its metrics' last values."""
    with existing_store(store) as db:
        run = db.get_run(run_id)
        metrics = {name: db.metrics(run_id, name) for name in db.metric_names(run_id)}
    if json_output:
        series = {name: [[step, value] for step, value in points] for name, points in metrics.items()}
        print_json({**run.to_dict(), "metrics": series})
        return
    from rich.table import Table

    out = console()
    from rich.markup import escape

    title = f"{escape(run.name or '')} status={run.status} group={escape(run.group or '-')}"
    out.print(f"[bold]run {run.id}[/bold] {title}")
    if run.error:
        out.print(f"error: {escape(run.error)}")
    for title, values in (("config", run.config), ("summary", run.summary), ("environment", run.environment)):
        table = Table(title=title)
        table.add_column("field")
        table.add_column("value", justify="right")
        for key, value in values.items():
            table.add_row(key, fmt(value) if not isinstance(value, (dict, list)) else json.dumps(value))
        out.print(table)
    table = Table(title="metrics")
    for column in ("name", "points", "last step", "last value"):
        table.add_column(column)
    for name, series in metrics.items():
        table.add_row(name, str(len(series)), str(series[-1][0]), fmt(series[-1][1]))
    out.print(table)


@runs_app.command("export")
def runs_export(
    format: str = typer.Option("csv", "--format", help="csv or json"),
    output: str | None = typer.Option(None, "--output", "-o", help="file to write (default: stdout)"),
    status: str | None = typer.Option(None, help="only runs with this status"),
    group: str | None = typer.Option(None, help="only runs of this group"),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Export runs (config and summary flattened per row for CSV; full records for JSON)."""
    from normlab.store.export import EXPORT_FORMATS

    if format not in EXPORT_FORMATS:
        raise NormlabError(f"unknown export format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    with existing_store(store) as db:
        db.export(output if output is not None else sys.stdout, format, status=status, group=group)


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
