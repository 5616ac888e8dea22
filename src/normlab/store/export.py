"""Runs as flat records: CSV, JSON and pandas views of the store."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from normlab.errors import NormlabError
from normlab.files import atomic_open
from normlab.store.records import Run

EXPORT_FORMATS = ("csv", "json")
_BASE_COLUMNS = (
    "id", "name", "group", "status", "config_key", "started_at", "finished_at", "wall_time", "error",
)


def flatten(prefix: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}`` (``"a.b"`` for an empty prefix); lists are kept whole
    (JSON text in CSV)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, Mapping) and item:
            out.update(flatten(name, item))
        else:
            out[name] = item
    return out


def run_record(run: Run) -> dict[str, Any]:
    """One flat row: the run's columns, then ``config.*`` and ``summary.*``."""
    row = {column: getattr(run, column) for column in _BASE_COLUMNS}
    row.update(flatten("config", run.config))
    row.update(flatten("summary", run.summary))
    return row


def json_safe(value: Any) -> Any:
    """Strict JSON has no NaN/inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_runs(runs: Iterable[Run], dest: str | Path | TextIO, format: str) -> None:
    """Write ``runs`` to ``dest`` (path or text stream): ``csv`` flat rows, ``json`` a list of full runs."""
    if format not in EXPORT_FORMATS:
        raise NormlabError(f"unknown export format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    runs = list(runs)
    if isinstance(dest, (str, Path)):
        with atomic_open(dest, "w", newline="", devices=True) as stream:
            _write(runs, stream, format)
    else:
        _write(runs, dest, format)


def _write(runs: list[Run], stream: TextIO, format: str) -> None:
    if format == "json":
        json.dump([json_safe(run.to_dict()) for run in runs], stream, indent=2, allow_nan=False)
        stream.write("\n")
        return
    rows = [run_record(run) for run in runs]
    columns = list(_BASE_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    stream.write(buffer.getvalue())


def _pandas():
    try:
        import pandas
    except ImportError:
        raise NormlabError(
            "to_pandas needs pandas, which is not installed: pip install 'normlab[pandas]'"
        ) from None
    return pandas


def runs_frame(runs: Iterable[Run]):
    """One row per run (see :func:`run_record`)."""
    pandas = _pandas()
    return pandas.DataFrame([run_record(run) for run in runs])


def metrics_frame(rows: Iterable[tuple[int, int, str, float]]):
    """Long-form metrics: columns run_id, step, name, value."""
    pandas = _pandas()
    return pandas.DataFrame(list(rows), columns=["run_id", "step", "name", "value"])
