"""Reading a study's ``outcome.json`` back (``normlab report DIR``, the index of a folder of studies).

The file is untrusted input: anyone can write one. It is read as JSON and every field a report uses is
checked to have the type :func:`normlab.studies.runner.run_study` writes, so a crafted file (no
``meta.paper``, ``meta`` a list, ``meta.seeds`` an int, ``verdict`` an int) is one NormlabError naming the
file and the field, not a TypeError deep in the report writer (issue 29).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError

_TEXT = (str,)
_NUMBER = (int, float)
# field -> (allowed types, required)
_META: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": (_TEXT, True), "title": (_TEXT, True), "claim": (_TEXT, True), "paper": (_TEXT, True),
    "scale": (_TEXT, True), "seeds": ((list,), True), "device": (_TEXT, False), "store": (_TEXT, False),
    "wall_time_s": (_NUMBER, False), "params": ((dict,), True), "environment": ((dict,), True),
    "overrides": ((dict,), False),
}  # fmt: skip
_OUTCOME: dict[str, tuple[tuple[type, ...], bool]] = {
    "tables": ((list,), True), "figures": ((list,), True), "verdict": (_TEXT, True),
    "agrees_with_paper": ((bool, type(None)), False), "discrepancy": ((str, type(None)), False),
    "data": ((dict,), False), "key_figures": (_TEXT, False),
}  # fmt: skip
_TABLE = {"title": (_TEXT, True), "columns": ((list,), True), "rows": ((list,), True),
          "notes": ((list,), False)}
_FIGURE = {"name": (_TEXT, True), "path": (_TEXT, True), "caption": (_TEXT, True)}


def read_outcome_file(file: str | Path) -> tuple[dict[str, Any], Any]:
    """``(meta, StudyOutcome)`` from ``file``.

    Raises:
        NormlabError: ``file`` is not JSON, or a field is missing or of another type (named in the message).
    """
    from normlab.studies.base import StudyOutcome

    file = Path(file)
    if not file.is_file():  # a FIFO named outcome.json would block the read
        raise NormlabError(f"{file} is not a valid study outcome: not a regular file")
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NormlabError(f"{file} is not a valid study outcome: not JSON ({exc})") from None
    if not isinstance(saved, dict):
        raise NormlabError(f"{file} is not a valid study outcome: it holds a {_kind(saved)}, not an object")
    meta = _checked(file, saved.get("meta"), "meta", _META)
    outcome = _checked(file, saved.get("outcome"), "outcome", _OUTCOME)
    for i, seed in enumerate(meta["seeds"]):
        if not isinstance(seed, int) or isinstance(seed, bool):
            _bad(file, f"meta.seeds[{i}]", "an int", seed)
    for i, table in enumerate(outcome["tables"]):
        table = _checked(file, table, f"outcome.tables[{i}]", _TABLE)
        for j, row in enumerate(table["rows"]):
            if not isinstance(row, list):
                _bad(file, f"outcome.tables[{i}].rows[{j}]", "a list", row)
    for i, figure in enumerate(outcome["figures"]):
        _checked(file, figure, f"outcome.figures[{i}]", _FIGURE)
    try:
        return meta, StudyOutcome.from_dict(outcome)
    except NormlabError as exc:  # a table row whose cells do not match its columns
        raise NormlabError(f"{file} is not a valid study outcome: {exc}") from None


def _checked(file: Path, value: Any, where: str, spec: dict[str, tuple[tuple[type, ...], bool]]) -> dict:
    if not isinstance(value, dict):
        _bad(file, where, "an object", value)
    for key, (types, required) in spec.items():
        if key not in value:
            if required:
                raise NormlabError(f"{file} is not a valid study outcome: {where}.{key} is missing")
            continue
        if not isinstance(value[key], types) or (isinstance(value[key], bool) and bool not in types):
            _bad(file, f"{where}.{key}", " or ".join(dict.fromkeys(map(_kind_name, types))), value[key])
    return value


def _bad(file: Path, where: str, wanted: str, value: Any) -> None:
    raise NormlabError(f"{file} is not a valid study outcome: {where} must be {wanted}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean",
            int: "an int", float: "a number"}.get(type(value), type(value).__name__)  # fmt: skip


def _kind_name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean",
            int: "a number", float: "a number"}[kind]  # fmt: skip
