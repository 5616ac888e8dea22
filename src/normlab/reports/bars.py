"""Error bars that stay inside a metric's range: an accuracy's 95% interval ends at 100%, not past it."""

from __future__ import annotations

import math
from collections.abc import Sequence


def clipped_yerr(means: Sequence[float], halves: Sequence[float], low: float | None = None,
                 high: float | None = None) -> list[list[float]]:
    """matplotlib's asymmetric ``yerr`` ``[below, above]`` for intervals ``mean ± half``, each side cut at
    the metric's range ``[low, high]`` (None: unbounded); a NaN half-width (one seed) draws no bar.

    The t-interval is symmetric by construction and can pass a bound that the metric cannot (a mean of
    99.5% with a half-width of 1.2 pts); the values it covers beyond the bound are impossible, so the bar
    shows the possible part, ``[max(low, mean - half), min(high, mean + half)]``.
    """
    below, above = [], []
    for mean, half in zip(means, halves, strict=True):
        if not (math.isfinite(mean) and math.isfinite(half)):
            below.append(0.0)
            above.append(0.0)
            continue
        lower = mean - half if low is None else max(low, mean - half)
        upper = mean + half if high is None else min(high, mean + half)
        below.append(max(0.0, mean - lower))
        above.append(max(0.0, upper - mean))
    return [below, above]
