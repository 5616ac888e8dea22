"""The base every probe result derives from: a dataclass of plain numbers with ``to_dict()``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch


def _plain(value: Any) -> Any:
    # Results must survive json.dumps and the store: tensors and numpy scalars become floats / lists.
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return float(value)


def json_ready(value: Any) -> Any:
    """Strict JSON has no NaN / inf: they become None (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


@dataclasses.dataclass
class ProbeResult:
    """A probe's measurement. Every subclass has a ``mode`` field: whether BN-like layers used batch
    statistics ("train") or their running estimates ("eval") while it was taken ("train_vs_eval" for
    :func:`normlab.probes.train_eval_gap`, which compares the two)."""

    def to_dict(self) -> dict[str, Any]:
        """Field name -> float, int, str or (nested) list / dict of those; JSON-serializable."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def scalars(self) -> dict[str, float]:
        """Flat ``name -> float`` view for metric stores: scalar fields as ``field``, per-layer dict fields
        as ``field/<layer>``. Lists (curves, grids) are left to artifacts."""
        out: dict[str, float] = {}
        for name, value in self.to_dict().items():
            if isinstance(value, (bool, str)) or value is None:
                continue
            if isinstance(value, (int, float)):
                out[name] = float(value)
            elif isinstance(value, dict):
                for key, sub in value.items():
                    if isinstance(sub, (int, float)) and not isinstance(sub, bool):
                        out[f"{name}/{key}"] = float(sub)
        return out

    def arrays(self) -> dict[str, Any]:
        """The fields :meth:`scalars` leaves out that hold lists or nested data (for JSON artifacts)."""
        flat = self.scalars()
        out = {}
        for name, value in self.to_dict().items():
            nested_dict = isinstance(value, dict) and not all(f"{name}/{k}" in flat for k in value)
            if isinstance(value, list) or nested_dict:
                out[name] = value
        return out
