"""Helpers every CLI module shares: the store options, JSON and table output, list parsing."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import typer

from normlab.errors import NormlabError

STORE_HELP = "results store (SQLite file); default $NORMLAB_STORE or ./.normlab/results.sqlite"


def print_json(value: Any) -> None:
    from normlab.store.export import json_safe

    typer.echo(json.dumps(json_safe(value), indent=2, allow_nan=False))


def console():
    from rich.console import Console

    # Piped output has no terminal width; rich's 80-column default would truncate the run tables.
    return Console() if sys.stdout.isatty() else Console(width=160)


def open_store(path: str | None):
    from normlab.store import Store

    return Store(path)


def existing_store(path: str | None):
    """The store for read-only commands: a missing file is an error, not a new empty store."""
    from normlab.store import default_store_path

    file = Path(path) if path is not None else default_store_path()
    if not file.exists():
        raise NormlabError(f"no results store at {str(file)!r}; train something first or pass --store")
    from normlab.store import Store

    # Read-only: a reading command never writes, never turns a stray file into a store, and works on a
    # store it may not write (a read-only file system, someone else's file).
    return Store(str(file), readonly=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for None/NaN, ``digits`` significant digits for floats, markup escaped and
    control characters shown as escapes (see :func:`safe_text`)."""
    from rich.markup import escape

    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return escape(safe_text(str(value)))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_text(text: str) -> str:
    """``text`` with terminal control characters (ESC sequences, BEL, CR...) written as ``\\xNN``.

    Run names and errors come from the store, which anyone can write: printed raw, an escape sequence
    could rewrite the terminal (clear it, retitle it, hide lines).
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def csv_list(text: str, kind: type, what: str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise NormlabError(f"{what} is empty; give a comma-separated list, e.g. {what}=16,128")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise NormlabError(f"{what}={text!r} must be a comma-separated list of {kind.__name__}s") from None


def check_norms(norms: list[str]) -> None:
    from normlab.layers import list_norms

    valid = [*list_norms(), "nf"]
    unknown = [n for n in norms if n not in valid]
    if unknown:
        raise NormlabError(f"unknown norm(s) {', '.join(unknown)}; valid norms: {', '.join(valid)}")
