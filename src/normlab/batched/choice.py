"""Choosing an implementation by timing without making runs irreproducible.

The batched engine times interchangeable implementations (forward modes, convolution kernels) that compute
the same numbers up to rounding. Rounding differs between them, and a run of thousands of steps amplifies
it: a held-out accuracy one example apart moves the plateau rule's stopping step. A pick that flips between
two processes on timing noise therefore changes results. Measured: six identical MNIST-1D CNN groups timed
the same evaluation convolution as a near tie and picked differently once; two default compares on one
machine ended bn at batch 16 at different steps (96.8 / 96.6% mean test accuracy).

Measured after a first remedy (keep a preferred implementation unless another is more than 1.25x faster):
two identical compares still differed in 5 of 8 groups, picks now flipping around the margin. So the
engine decides by fixed rules (grouped mode where available; the im2col convolution where it applies) and
times only when asked (``ModeChooser(timed=True)``, the benchmarks), where :func:`prefer` still keeps near
ties on the preferred implementation.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFER_MARGIN = 1.25  # another implementation must take less than 1 / 1.25 = 80% of the preferred one's time


def prefer(times: Mapping[str, float], preferred: str, margin: float = PREFER_MARGIN) -> str:
    """``preferred`` unless the fastest of ``times`` (seconds per name) is more than ``margin`` times
    faster; then the fastest. ``preferred`` must be a key of ``times``."""
    fastest = min(times, key=times.__getitem__)
    return fastest if times[fastest] * margin < times[preferred] else preferred
