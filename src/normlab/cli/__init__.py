"""The ``normlab`` command line: a thin shell over the Python API.

Each concern registers its commands from its own module (``register(app)``); bad input anywhere ends
in one line naming the problem and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from normlab.errors import NormlabError

app = typer.Typer(
    name="normlab",
    help="Batch Normalization, or not? Measure what BN does and train the alternatives side by side.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    from normlab.cli import (
        catalog_cmds,
        compare_cmd,
        crossval_cmds,
        probe_cmds,
        runs_cmds,
        study_cmds,
        train_cmd,
    )

    for module in (train_cmd, runs_cmds, catalog_cmds, compare_cmd, probe_cmds, study_cmds, crossval_cmds):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``normlab`` script."""
    try:
        app(args=argv)
    except (NormlabError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
