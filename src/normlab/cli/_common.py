"""Helpers every CLI module shares: the store options, JSON and table output, list parsing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import typer

from normlab.errors import NormlabError

#: Version of the JSON that ``--json`` prints (docs/json.md): an object carries ``"schema": JSON_SCHEMA``.
#: Raise it when a field is renamed or removed or changes meaning; adding a field keeps it.
JSON_SCHEMA = 1

STORE_HELP = "results store (SQLite file); default $NORMLAB_STORE or ./.normlab/results.sqlite"


def print_json(value: Any) -> None:
    """``value`` as strict JSON (NaN/inf -> null); an object gets ``"schema": JSON_SCHEMA`` first."""
    from normlab.store.export import json_safe

    if isinstance(value, dict):
        value = {"schema": JSON_SCHEMA, **value}
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
    return open_store(str(file))


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for None/NaN, ``digits`` significant digits for floats, markup escaped."""
    from rich.markup import escape

    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return escape(str(value))


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


def refuse_model_code_from(source: str, values: dict[str, Any], given_model: str | None) -> None:
    """A config read from ``source`` (a file: config, checkpoint, recipe) may name a registered model, but
    never user code to import: a model spec (``module:factory`` / ``file.py:factory``) in it is refused
    unless the same spec was given as ``--model`` on the command line (docs/external.md)."""
    from normlab.external import is_model_spec

    named = values.get("model")
    if is_model_spec(named) and named != given_model:
        raise NormlabError(
            f"{source} names model code {named!r}; normlab imports user code only when it is given on the "
            f"command line: add --model {named}"
        )
