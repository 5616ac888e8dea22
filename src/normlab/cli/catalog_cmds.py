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
    from normlab.layers import default_groups, list_norms, norm_options

    rows = [{"name": name, "options": norm_options(name)} for name in list_norms()]
    for row in rows:
        note = _NORM_NOTES.get(row["name"])
        if note:
            row["note"] = note
        if row["name"] == "gn":
            row["default_groups"] = {str(c): default_groups(c) for c in _EXAMPLE_WIDTHS}
    rows.append({"name": "nf", "options": [], "note": "model's normalizer-free variant (Scaled WS; use AGC)"})
    _print_rows(rows, "norms", json_output)


# What the names mean (ln and in are easily swapped: both are GroupNorm with an extreme group count).
_NORM_NOTES = {
    "gn": "Group Norm (Wu & He 2018); default groups: largest divisor of C up to 32 with >= 2 channels "
    "per group",
    "ln": "Layer Norm over C and all spatial dims of each example (GroupNorm with 1 group)",
    "in": "Instance Norm: each channel of each example over its spatial dims (GroupNorm with C groups)",
}
_EXAMPLE_WIDTHS = (16, 24, 25, 32, 48, 64, 96, 100, 128, 256, 512)


def _print_rows(rows: list[dict], title: str, json_output: bool) -> None:
    if json_output:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column("name")
    table.add_column("options")
    for row in rows:
        text = ", ".join(row["options"])
        if row.get("note"):
            text = f"{text} ({row['note']})" if text else row["note"]
        if "default_groups" in row:
            pairs = ", ".join(f"{c}->{g}" for c, g in row["default_groups"].items())
            text += f"; default groups by C: {pairs}"
        table.add_row(row["name"], text or "-")
    console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models_command)
    app.command("norms")(norms_command)
