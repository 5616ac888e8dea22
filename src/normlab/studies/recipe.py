"""Load and validate a study recipe (TOML) into a :class:`~normlab.studies.base.Study`.

Recipe layout::

    name = "regularization"            # str, equals the file stem
    title = "..."                      # str
    claim = "..."                      # str, the paper's claim in one sentence
    paper = "Luo et al. 2019, ..."     # str, citation
    module = "regularization"          # str, normlab/studies/<module>.py defines run(ctx), or
                                       # "plugin:<name>", entry point <name> of group "normlab.studies"
    margin = 0.01                      # optional float > 0: the equivalence margin of every verdict
                                       # (science.md section 8), in margin_unit; default 0.01
    margin_unit = "accuracy (0.01 = 1 point)"   # optional str: what the margin is measured in
    [scale.tiny]                       # fast-tier tests (seconds)
    [scale.quick]                      # CPU minutes (default)
    [scale.paper]                      # the paper's settings, for a GPU user

A study module may declare ``PARAMS = {"field": type or (types...)}``; every scale table is then checked
against it when the study is loaded, so a typo fails before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from normlab.errors import NormlabError
from normlab.studies.base import SCALES, Study

_FIELDS: dict[str, type] = {"name": str, "title": str, "claim": str, "paper": str, "module": str}
# Optional top-level fields: the margin is part of the claim, not of a scale, so it sits beside it.
_OPTIONAL: dict[str, type | tuple[type, ...]] = {"margin": float, "margin_unit": str}


def load_recipe(path: str | Path) -> Study:
    """Parse and validate the recipe at ``path``.

    Raises:
        NormlabError: unreadable TOML, a missing or wrong-typed field, or a missing scale table; the
            message names the file, the field and the expected type.
    """
    path = Path(path)
    if not path.is_file():
        raise NormlabError(f"recipe {path} does not exist or is not a file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise NormlabError(f"recipe {path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise NormlabError(f"recipe {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return parse_recipe(raw, source=str(path), path=path)


def parse_recipe(raw: dict[str, Any], source: str = "<recipe>", path: Path | None = None) -> Study:
    """Validate an already parsed recipe dict (``source`` names it in errors)."""
    for name, kind in _FIELDS.items():
        _check(raw, name, kind, source)
    scale = _check(raw, "scale", dict, source)
    scales: dict[str, dict[str, Any]] = {}
    for s in SCALES:
        scales[s] = _check(scale, s, dict, source, prefix="scale.")
    extra = sorted(set(scale) - set(SCALES))
    if extra:
        raise NormlabError(
            f"recipe {source}: unknown scale(s) {', '.join(extra)}; allowed: {', '.join(SCALES)}"
        )
    unknown = sorted(set(raw) - set(_FIELDS) - set(_OPTIONAL) - {"scale"})
    if unknown:
        raise NormlabError(
            f"recipe {source}: unknown field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join([*_FIELDS, *_OPTIONAL, 'scale'])}"
        )
    optional = {name: _check(raw, name, kind, source) for name, kind in _OPTIONAL.items() if name in raw}
    if "margin" in optional:
        optional["margin"] = check_margin(optional["margin"], f"recipe {source}: field 'margin'")
    _refuse_model_code(scales, source)
    return Study(
        name=raw["name"],
        title=raw["title"],
        claim=raw["claim"],
        paper=raw["paper"],
        module=raw["module"],
        scales=scales,
        path=path,
        **optional,
    )


def check_margin(value: Any, where: str = "--margin") -> float:
    """``value`` as a float when it is a finite number > 0, else NormlabError naming ``where``."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise NormlabError(f"{where} must be a positive number (the equivalence margin), got {value!r}")
    return float(value)


def validate_params(study: Study, spec: dict[str, Any]) -> None:
    """Check every scale table of ``study`` against ``spec``.

    ``spec`` maps a field to a type, a tuple of types, or ``{"list": T}`` for a list whose every item is a
    ``T`` (T itself a type or tuple). An int is accepted where a float is expected; a bool never passes as
    an int.
    """
    source = str(study.path or study.name)
    for scale, params in study.scales.items():
        for name, kind in spec.items():
            if isinstance(kind, dict) and "list" in kind:
                values = _check(params, name, list, source, prefix=f"scale.{scale}.")
                item = kind["list"]
                for i, v in enumerate(values):
                    if not _is(v, item):
                        raise NormlabError(
                            f"recipe {source}: field scale.{scale}.{name}[{i}] must be {_names(item)}, "
                            f"got {type(v).__name__} {v!r}"
                        )
            else:
                _check(params, name, kind, source, prefix=f"scale.{scale}.")


def _check(table: dict[str, Any], name: str, kind: Any, source: str, prefix: str = "") -> Any:
    if name not in table:
        raise NormlabError(f"recipe {source}: missing field {prefix}{name!r} (expected {_names(kind)})")
    value = table[name]
    if not _is(value, kind):
        raise NormlabError(
            f"recipe {source}: field {prefix}{name!r} must be {_names(kind)}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _is(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass: ``steps = true`` must not pass as an int.
    if isinstance(value, bool) and bool not in kinds:
        return False
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _names(kind: Any) -> str:
    if isinstance(kind, dict):
        return f"list of {_names(kind['list'])}"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"dict": "table"}.get(k.__name__, k.__name__) for k in kinds)


def _refuse_model_code(value: Any, source: str) -> None:
    # A recipe is a file from elsewhere: it may name registered models, never code to import
    # (``module:factory`` specs; docs/external.md).
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "model" and isinstance(item, str) and ":" in item:
                raise NormlabError(
                    f"recipe {source} names model code {item!r}; recipes may name registered models only"
                )
            _refuse_model_code(item, source)
    elif isinstance(value, list):
        for item in value:
            _refuse_model_code(item, source)
