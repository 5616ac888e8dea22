"""Canonical form and hash of a run configuration, used to recognise a run that is already in the store.

Two configs have the same key exactly when their canonical JSON is equal: keys sorted, no whitespace,
tuples written as lists, floats written by ``repr`` (so ``0.1`` and ``0.10000000000000001`` agree and
``0.1`` and ``0.1000001`` do not). The key is the first 16 hex digits of its SHA-256 (64 bits: a
collision among a million runs has probability about 3e-8).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from normlab.errors import NormlabError


def canonical_json(config: Mapping[str, Any]) -> str:
    """``config`` as JSON with sorted keys and no whitespace; NaN/inf and non-JSON values are refused."""
    _check_finite(config, "config")
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except TypeError as exc:
        raise NormlabError(
            f"config must hold only JSON values (str, int, float, bool, None, list, dict): {exc}"
        ) from None


def config_key(config: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over :func:`canonical_json` of ``config``."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def _check_finite(value: Any, where: str) -> None:
    # json.dumps would write NaN as an invalid token; report which field holds it instead.
    if isinstance(value, float) and not math.isfinite(value):
        raise NormlabError(f"{where} is {value!r}; stored configs must be finite numbers")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")
