"""Means and 95% intervals over seeds: the one definition every table and verdict in normlab uses.

``mean_ci`` is the Student-t interval of one arm's mean; ``diff_ci`` the interval of the difference of two
arms' means: Welch's t-interval for independent seeds, or the paired t-interval over seeds both arms share
(science.md section 8).
"""

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


def t_quantile_975(df: float) -> float:
    """``t_{0.975, df}``, the two-sided 95% critical value of Student's t with ``df`` (real, >= 1) degrees of
    freedom: the CDF ``F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2`` (regularized incomplete beta ``I``, by its
    continued fraction) inverted by bisection; matches scipy to 1e-9. Infinite ``df``: the normal 1.959964."""
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not df >= 1:
        raise NormlabError(f"degrees of freedom must be a number >= 1, got {df!r}")
    if math.isinf(df):
        return 1.959963984540054
    low, high = 1.0, 13.0  # t_{0.975, 1} = 12.706 is the largest
    for _ in range(60):
        mid = (low + high) / 2
        upper_tail = 0.5 * _betainc(df / 2, 0.5, df / (df + mid * mid))
        low, high = (mid, high) if upper_tail > 0.025 else (low, mid)
    return (low + high) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` (Numerical Recipes 6.4: continued fraction, Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_beta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_beta + a * math.log(x) + b * math.log1p(-x))
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * value / a


def diff_ci(
    a: Iterable[float], b: Iterable[float], *, paired: bool = False
) -> tuple[float, float, float]:
    """Difference of means ``mean(a) - mean(b)`` with the half-width of its two-sided 95% interval.

    Independent samples (``paired=False``): Welch's interval, ``half = t_{0.975, nu} * sqrt(s_a^2/n_a +
    s_b^2/n_b)`` with the Welch-Satterthwaite ``nu``. Paired (``paired=True``, ``a[i]`` and ``b[i]`` share
    seed ``i``): the t-interval of the per-seed differences, ``n - 1`` degrees of freedom. Non-finite values
    are dropped first (pairs with one non-finite side, when paired). Returns ``(diff, half, df)``; ``half`` is
    NaN when either arm has fewer than two values (no spread to judge), and 0 when both arms are constant.
    """
    xs, ys = [float(v) for v in a], [float(v) for v in b]
    if paired:
        if len(xs) != len(ys):
            raise NormlabError(f"paired samples need equal lengths, got {len(xs)} and {len(ys)}")
        diffs = [x - y for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
        mean, half = mean_ci(diffs)
        return mean, half, float(len(diffs) - 1)
    xs, ys = [x for x in xs if math.isfinite(x)], [y for y in ys if math.isfinite(y)]
    if not xs or not ys:
        return math.nan, math.nan, math.nan
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    if len(xs) < 2 or len(ys) < 2:
        return mx - my, math.nan, math.nan
    vx = math.fsum((x - mx) ** 2 for x in xs) / (len(xs) - 1) / len(xs)
    vy = math.fsum((y - my) ** 2 for y in ys) / (len(ys) - 1) / len(ys)
    if vx + vy == 0:
        return mx - my, 0.0, math.inf
    df = (vx + vy) ** 2 / (vx**2 / (len(xs) - 1) + vy**2 / (len(ys) - 1))
    return mx - my, t_quantile_975(max(df, 1.0)) * math.sqrt(vx + vy), df
