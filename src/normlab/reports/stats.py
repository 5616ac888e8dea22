"""Mean and 95% confidence interval over seeds: the one definition every table in normlab uses."""

from __future__ import annotations

import math
from collections.abc import Iterable

from normlab.errors import NormlabError


def mean_ci(values: Iterable[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t confidence interval.

    ``half = t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample (n-1) standard deviation. Non-finite
    values (diverged runs) are dropped first; one value gives ``(x, nan)``; none gives ``(nan, nan)``.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(var / n)


# Two-sided 95% Student-t critical values t_{0.975, df} (standard tables, 4 decimals).
_T975 = {
    1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
    10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098,
    18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595,
    26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799,
}  # fmt: skip
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: tabulated up to 30, then interpolated linearly in ``1/df`` (exact to ~1e-4)."""
    if not isinstance(df, int) or df < 1:
        raise NormlabError(f"degrees of freedom must be a positive int, got {df!r}")
    if df in _T975:
        return _T975[df]
    knots = [(k, v) for k, v in sorted(_T975.items()) if k >= 30] + [(math.inf, _Z975)]
    for (d0, t0), (d1, t1) in zip(knots, knots[1:], strict=False):
        if d0 < df < d1:
            w = (1 / d0 - 1 / df) / (1 / d0 - (0 if math.isinf(d1) else 1 / d1))
            return t0 + w * (t1 - t0)
    raise AssertionError("unreachable")
