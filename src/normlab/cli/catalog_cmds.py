"""``normlab models`` and ``normlab norms``: what can be built, with its options."""

from __future__ import annotations

import typer

from normlab.cli._common import console, print_json


def models_command(json_output: bool = typer.Option(False, "--json", help="print JSON only")) -> None:
    """List the models and their options (every model also takes norm, width, depth)."""
    from normlab.models import list_models, model_options

    rows = [{"name": name, "options": model_options(name)} for name in list_models()]
    _print_rows(rows, "models", json_output)


def norms_command(json_output: bool = typer.Option(False, "--json", help="print JSON only")) -> None:
    """List the normalization layers and their options (and nf, the normalizer-free model variant)."""
    from normlab.layers import list_norms, norm_options

    rows = [{"name": name, "options": norm_options(name)} for name in list_norms()]
    rows.append({"name": "nf", "options": [], "note": "model's normalizer-free variant (Scaled WS; use AGC)"})
    _print_rows(rows, "norms", json_output)


def _print_rows(rows: list[dict], title: str, json_output: bool) -> None:
    if json_output:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column("name")
    table.add_column("options")
    for row in rows:
        table.add_row(row["name"], ", ".join(row["options"]) or row.get("note", "-"))
    console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models_command)
    app.command("norms")(norms_command)
