"""CLI commands (filled in by their issue)."""

import typer


def register(app: typer.Typer) -> None:
    pass
