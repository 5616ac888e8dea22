"""Small helpers the mechanism studies share: averaging step series over seeds and printing mean ± CI."""

from __future__ import annotations

import math


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Average ``(step, value)`` series over seeds at the steps every series has."""
    if not curves or not all(curves):
        return [], []
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    lookup = [dict(c) for c in curves]
    return steps, [math.fsum(d[s] for d in lookup) / len(lookup) for s in steps]


def ci(cell: tuple[float, float], pct: bool = False) -> str:
    """``mean ± half_width`` with 3 and 2 significant digits (in % when ``pct``); no ± for one seed."""
    mean, half = cell
    scale, unit = (100.0, "%") if pct else (1.0, "")
    text = f"{mean * scale:.3g}{unit}"
    return text + (f" ± {half * scale:.2g}{unit}" if math.isfinite(half) else "")
