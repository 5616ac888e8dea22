"""``--set FIELD=VALUE``: change one field of a study's scale table from the command line.

A study at ``--scale quick`` may say "inconclusive at this scale" because an arm needs more steps than the
quick budget gives it; the settling run is the same recipe with a longer budget, e.g.::

    normlab study noisy-bn --set steps=6000
    normlab study ics --set nets.vgg.steps=10000 --set nets.dln.steps=10000

``FIELD`` is a dotted path into the ``[scale.<scale>]`` table (``nets.vgg.steps`` is the field ``steps``
of the table ``[scale.quick.nets.vgg]``); it must already exist there, so a typo fails before any training
instead of being ignored. ``VALUE`` is a TOML value (``6000``, ``0.05``, ``[0.1, 0.5]``, ``"auto"``; a bare
word is read as a string) of the field's own type (an int where a float is expected). A whole table is
not replaced: set its fields one by one. The runs land in the store under their own configs, and the
report names the fields that were set.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import tomllib

from normlab.errors import NormlabError


def parse_overrides(texts: Sequence[str]) -> dict[str, Any]:
    """``["steps=6000", "lrs=[0.1, 0.5]"]`` -> ``{"steps": 6000, "lrs": [0.1, 0.5]}`` (in order; a field
    set twice keeps the last value). Raises NormlabError naming the bad ``--set``."""
    overrides: dict[str, Any] = {}
    for text in texts:
        field, sep, raw = text.partition("=")
        parts, raw = [p.strip() for p in field.split(".")], raw.strip()
        if not sep or not raw or not all(parts):
            raise NormlabError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set steps=6000")
        overrides[".".join(parts)] = _parse_value(raw, text)
    return overrides


def _parse_value(raw: str, text: str) -> Any:
    if "\n" in raw or "\r" in raw:
        raise NormlabError(f"--set {text!r}: the value must be on one line")
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        if _bare(raw):
            return raw  # a bare word: --set budget=auto
        raise NormlabError(
            f"--set {text!r}: {raw!r} is not a TOML value (numbers, true/false, \"text\", [lists])"
        ) from None
    return parsed["value"]


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """A deep copy of the scale table ``params`` with ``overrides`` (dotted field -> value) set.

    ``where`` names the table in errors (``scale.quick of recipe noisy-bn``). Raises NormlabError for a
    field the table does not have, a path through a non-table, a table replaced whole, or a value of
    another type than the field's."""
    result = copy.deepcopy(params)
    for field, value in overrides.items():
        table, parts = result, field.split(".")
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth]) or "the table"
            if not isinstance(table, dict):
                raise NormlabError(f"--set {field}: {here} of {where} is not a table")
            if part not in table:
                fields = ", ".join(sorted(table)) or "none"
                raise NormlabError(
                    f"--set {field}: {where} has no field {'.'.join(parts[: depth + 1])!r} "
                    f"(fields of {here}: {fields})"
                )
            if depth < len(parts) - 1:
                table = table[part]
        old = table[parts[-1]]
        if isinstance(old, dict):
            raise NormlabError(f"--set {field}: that is a table of {where}; set its fields one by one")
        if not _same_kind(value, old):
            raise NormlabError(f"--set {field}: expected {_kind(old)} like the recipe's {old!r}, "
                               f"got {_kind(value)} {value!r}")
        table[parts[-1]] = _like(value, old)
    return result


def _like(value: Any, old: Any) -> Any:
    """``value`` with ints made floats where the recipe has floats (``lrs=[1, 2]`` for ``[0.1, 0.5]``)."""
    if isinstance(old, float):
        return float(value)
    if isinstance(old, list) and old and all(isinstance(v, float) for v in old):
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def override_flags(overrides: dict[str, Any]) -> str:
    """The ``--set`` flags that reproduce ``overrides`` (for report subtitles), e.g. ``--set steps=6000``."""
    return " ".join(f"--set {field}={_toml(value)}" for field, value in overrides.items())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if _bare(value) else f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _bare(word: str) -> bool:
    """A word TOML would need quoted but ``--set`` takes bare: letters, digits, ``_`` and ``-``."""
    return word.replace("_", "").replace("-", "").isalnum()


def _same_kind(value: Any, old: Any) -> bool:
    if isinstance(old, bool) or isinstance(value, bool):
        return isinstance(old, bool) and isinstance(value, bool)
    if isinstance(old, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(old))


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an int", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )
