"""Matched training-loss bands, and the gate of a trajectory claim (Santurkar et al. 2018's studies).

Santurkar et al. plot ICS (Fig. 3) and the landscape (Fig. 4) over training *steps*. With BN the loss falls
many times faster, so at a given step (or averaged over a run) a BN net that has already converged, with
small gradients, is set against a standard net that is still learning: the comparison then measures how far
along each net is, not the mechanism (issue 26; science.md section 2: 78% of BN's ICS probes came after its
convergence). Here a probe is filed under the *training-loss band* its run was in when it was taken, e.g.
``[2, 1)``, ``[1, 0.5)``, ``[0.5, 0.05)``, and two nets are compared band by band: where they are equally far
along.

- The training loss at a probe step ``s`` is the mean of the run's logged training-batch losses over the
  ``window`` steps up to ``s``, ``(s - window, s]`` (:func:`smoothed_loss`): one batch's loss is too noisy to
  file a probe by.
- A band ``[high, low)`` holds the losses from ``high`` down to, not including, ``low``: ``low < loss <=
  high`` (the notation of the issue's ``[2, 1), [1, 0.5), [0.5, 0.05)``); bands do not overlap
  (:func:`check_bands`).
- :func:`band_means`: per band, the mean of a probe series over the probes in that band (NaN where none);
  :func:`matched_mean`: the mean of the per-band means, every band weighted alike (NaN unless every band
  has a probe), the one number per run that a verdict compares over seeds.

A *trajectory* claim ("BN's ICS is similar or higher while it trains") needs its arms to have trained
within the window, not to have converged at its end: :func:`trajectory_status` is ``trained`` when the run
left chance level (its smoothed loss fell below ``chance_fraction`` x the chance loss) and did not diverge
(the trainer's divergence, or a loss that climbed back above that threshold after leaving it).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

from normlab.errors import NormlabError

#: A run that left chance level and did not diverge within its window (:func:`trajectory_status`).
TRAINED = "trained"

Series = Sequence[tuple[int, float]]


def probe_due(step: int, every: int, dense_every: int, dense_until: int) -> bool:
    """Whether a probe runs after ``step``: every ``dense_every`` steps up to ``dense_until`` (BN crosses
    the upper bands in a few hundred steps), then every ``every``."""
    return step % every == 0 or (step <= dense_until and step % dense_every == 0)


def check_schedule(every: int, dense_every: int, where: str) -> None:
    """NormlabError unless ``every`` is a positive multiple of ``dense_every`` (the callback runs every
    ``dense_every`` steps, so any other ``every`` would be skipped)."""
    if dense_every < 1 or every < 1 or every % dense_every:
        raise NormlabError(f"{where}: probe_every ({every}) must be a positive multiple of dense_every "
                           f"({dense_every})")


def check_bands(bands: Any, where: str) -> list[tuple[float, float]]:
    """``[[high, low], ...]`` as ``[(high, low), ...]``, or NormlabError: each band needs ``high > low >= 0``
    and the bands must not overlap (listed from the highest loss down)."""
    if not isinstance(bands, (list, tuple)) or not bands:
        raise NormlabError(
            f"{where}: loss_bands must be a non-empty list of [high, low] pairs, got {bands!r}")
    out = []
    for band in bands:
        ok = isinstance(band, (list, tuple)) and len(band) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in band)
        if not ok or not band[0] > band[1] >= 0:
            raise NormlabError(f"{where}: a loss band must be [high, low] with high > low >= 0, got {band!r}")
        if out and band[0] > out[-1][1]:
            raise NormlabError(
                f"{where}: loss bands must not overlap, listed from the highest loss down; "
                f"{list(band)!r} starts above {list(out[-1])!r} ends")
        out.append((float(band[0]), float(band[1])))
    return out


def smoothed_loss(loss: Series, step: int, window: int) -> float:
    """Mean of the logged losses at steps in ``(step - window, step]`` (``loss`` sorted by step); NaN when
    none was logged there."""
    steps = [s for s, _ in loss]
    lo, hi = bisect.bisect_right(steps, step - window), bisect.bisect_right(steps, step)
    values = [v for _, v in loss[lo:hi]]
    return math.fsum(values) / len(values) if values else math.nan


def band_index(value: float, bands: Sequence[tuple[float, float]]) -> int | None:
    """The index of the band ``[high, low)`` holding ``value`` (``low < value <= high``), or None (NaN, or
    outside every band)."""
    for i, (high, low) in enumerate(bands):
        if low < value <= high:
            return i
    return None


def band_means(
    values: Series, loss: Series, bands: Sequence[tuple[float, float]], window: int
) -> tuple[list[float], list[int]]:
    """Per band, the mean of the finite ``values`` (a ``(step, value)`` probe series) whose step's smoothed
    training loss lies in it, and the number of such probes; NaN for a band without any."""
    loss = sorted(loss)
    sums: list[list[float]] = [[] for _ in bands]
    for step, value in values:
        i = band_index(smoothed_loss(loss, step, window), bands)
        if i is not None and math.isfinite(value):
            sums[i].append(value)
    return [math.fsum(v) / len(v) if v else math.nan for v in sums], [len(v) for v in sums]


def matched_mean(means: Sequence[float]) -> float:
    """The mean of the per-band means (each band weighted alike); NaN unless every band has a value."""
    if not means or not all(math.isfinite(m) for m in means):
        return math.nan
    return math.fsum(means) / len(means)


def phase_mean(values: Series, loss: Series, below: float, window: int) -> float:
    """The mean of the finite ``values`` taken where the smoothed training loss is at or below ``below``
    (the post-convergence phase, reported and not decided on); NaN when none."""
    loss = sorted(loss)
    kept = [v for s, v in values if math.isfinite(v) and smoothed_loss(loss, s, window) <= below]
    return math.fsum(kept) / len(kept) if kept else math.nan


def step_windows(values: Series, edges: Sequence[int]) -> list[float]:
    """The mean of the finite ``values`` in each same-step window ``(edges[i], edges[i + 1]]``."""
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        kept = [v for s, v in values if lo < s <= hi and math.isfinite(v)]
        out.append(math.fsum(kept) / len(kept) if kept else math.nan)
    return out


def trajectory_status(status: str, loss: Series, chance: float, chance_fraction: float, window: int) -> str:
    """:data:`TRAINED`, ``stalled``, ``diverged`` or the run's own status (``failed``).

    ``status`` is the run's (``finished``, ``diverged``, ``failed``); ``loss`` its logged training losses;
    ``chance`` the loss at chance level (``ln(classes)``; for regression the run's first smoothed loss). A
    finished run is ``stalled`` when its smoothed loss never fell below ``chance_fraction * chance``, and
    ``diverged`` when it did and its last smoothed loss is back above that threshold.
    """
    if status != "finished":
        return status
    loss = sorted(loss)
    if not loss:
        return "stalled"
    threshold = chance_fraction * chance
    smooth = [smoothed_loss(loss, s, window) for s, _ in loss]
    if not any(v < threshold for v in smooth):
        return "stalled"
    return "diverged" if not smooth[-1] < threshold else TRAINED


def result_statuses(statuses: Sequence[str]) -> list[str]:
    """Gate statuses as :func:`normlab.stats.compare_arms` reads them: a :data:`TRAINED` run is a result
    (the rule's ``converged``), ``stalled`` / ``diverged`` / ``failed`` are not."""
    return ["converged" if s == TRAINED else s for s in statuses]
