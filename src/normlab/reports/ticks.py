"""Readable ticks on log-scale axes: one label per value plotted, never matplotlib's overlapping
``2x10^-1 3x10^-1 ...`` minor labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tick_label(value: float) -> str:
    """``0.0025``, ``0.01``, ``3.2``, ``1e-05``: at most 3 significant digits, no trailing zeros."""
    return f"{value:.3g}"


def set_log_ticks(ax: Any, values: Sequence[float], axis: str = "x", base: float = 10) -> None:
    """Log-scale ``axis`` of ``ax`` with a major tick and a plain label at each of ``values`` (sorted,
    unique) and no minor labels; labels are rotated when there are more than 4."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = sorted({float(v) for v in values if v > 0})
    scale = ax.set_xscale if axis == "x" else ax.set_yscale
    scale("log", base=base)
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())
    labels = [tick_label(v) for v in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=45 if len(ticks) > 4 else 0)
    else:
        ax.set_yticks(ticks, labels)


def plain_log_axis(ax: Any, axis: str = "y") -> None:
    """Log-scale ``axis`` labelled with plain numbers at 1, 2 and 5 of every decade (``0.2  0.5  1  2``),
    never ``2x10^0``; no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda value, _: tick_label(value)))
    target.set_minor_formatter(NullFormatter())
