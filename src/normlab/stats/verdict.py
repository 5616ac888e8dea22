"""One rule for every sentence that ranks two arms (``compare`` and every study): win, tie or inconclusive.

science.md section 8, the rule a reviewer would sign:

- *inconclusive* when an arm is not a result: fewer than ``min_seeds`` finite values, or a run that did not
  converge (``unconverged``: still improving at the end of its budget; ``stalled``: never left chance level;
  ``diverged``; ``failed``). The verdict names the reason and the flag that would settle it.
- *win* for the better arm when the two-sided 95% interval of the difference of means excludes 0: Welch's
  t-interval over independent seeds, or the paired t-interval when both arms ran the same seeds
  (:func:`normlab.stats.intervals.diff_ci`).
- *tie* otherwise: the seeds' spread does not separate the arms (which is not proof that they are equal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from normlab.stats.intervals import diff_ci

WIN, TIE, INCONCLUSIVE = "win", "tie", "inconclusive"
# Run statuses that make an arm a result; everything else (unconverged, stalled, diverged, failed) does not.
RESULT_STATUSES = ("converged",)
RULE = (
    "a difference is a win when the two-sided 95% t-interval of the difference of means over seeds "
    "(paired over shared seeds, else Welch) excludes 0; otherwise a tie; an arm with fewer than {min_seeds} "
    "seeds or a run that did not converge makes the comparison inconclusive"
)


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`compare_arms`.

    ``word`` is ``win``, ``tie`` or ``inconclusive``; ``winner`` the better arm's name on a win (else None);
    ``diff`` = mean(a) - mean(b) with its 95% interval ``[low, high]``; ``reason`` says why (for
    inconclusive: what is missing, and ``settle``, the flag that would settle it).
    """

    word: str
    a: str
    b: str
    diff: float
    low: float
    high: float
    test: str
    winner: str | None = None
    reason: str = ""
    settle: str | None = None

    def sentence(self, metric: str = "test accuracy", scale: float = 100.0, unit: str = " pts") -> str:
        """One sentence for a report, e.g. ``bn beats gn on test accuracy by +2.1 pts (95% CI +0.4 to
        +3.8, paired t over 3 seeds).``"""
        # A win is stated from the winner's side, so its difference and interval are positive.
        sign = -1.0 if self.word == WIN and self.winner == self.b else 1.0
        lo, hi = sorted((sign * self.low, sign * self.high))
        interval = ""
        if math.isfinite(lo) and math.isfinite(hi):
            interval = f" (95% CI {scale * lo:+.1f} to {scale * hi:+.1f}{unit}, {self.test})"
        if self.word == WIN:
            loser = self.b if self.winner == self.a else self.a
            margin = f"{scale * sign * self.diff:+.1f}{unit}"
            return f"{self.winner} beats {loser} on {metric} by {margin}{interval}."
        if self.word == TIE:
            difference = f"{scale * self.diff:+.1f}{unit}{interval}"
            return f"{self.a} and {self.b} tie on {metric}: difference {difference}, which includes 0."
        settle = f" To settle it: {self.settle}." if self.settle else ""
        return f"{self.a} vs {self.b} on {metric} is inconclusive: {self.reason}.{settle}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_arms(
    a: str,
    values_a: Sequence[float],
    b: str,
    values_b: Sequence[float],
    *,
    statuses_a: Sequence[str] | None = None,
    statuses_b: Sequence[str] | None = None,
    higher_is_better: bool = True,
    paired: bool = False,
    min_seeds: int = 3,
    settle: dict[str, str] | None = None,
) -> Verdict:
    """Win, tie or inconclusive for arm ``a`` against arm ``b`` (one value per seed each).

    Args:
        values_a, values_b: the per-seed metric of each arm (NaN for runs without a result).
        statuses_a, statuses_b: each seed's convergence status (``converged``, ``unconverged``, ``stalled``,
            ``diverged``, ``failed``); None means every value is a converged result.
        higher_is_better: False for errors and losses.
        paired: the arms share seeds (``values_a[i]`` and ``values_b[i]`` from seed ``i``): paired test.
        min_seeds: fewer finite values than this in either arm is inconclusive.
        settle: the flag that settles each kind of inconclusive outcome, keyed by the status (or
            ``"seeds"``), e.g. ``{"unconverged": "--budget auto", "seeds": "--seeds 3"}``.
    """
    settle = settle or {}
    # Every arm's runs that are not results, named together (both arms may have failed to train).
    problems = [
        (status, f"{sum(s == status for s in statuses or ())} run(s) of {name} {_describe(status)}")
        for name, statuses in ((a, statuses_a), (b, statuses_b))
        for status in _not_results(statuses)
    ]
    if problems:
        worst = min(problems, key=lambda p: _SEVERITY.get(p[0], len(_SEVERITY)))[0]
        reason = "; ".join(dict.fromkeys(text for _, text in problems))  # an arm judged alone: once
        return _inconclusive(a, b, reason, settle.get(worst))
    for name, values in ((a, values_a), (b, values_b)):
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < min_seeds:
            reason = f"{name} has {len(finite)} result(s), the rule needs at least {min_seeds} seeds"
            return _inconclusive(a, b, reason, settle.get("seeds", f"--seeds {min_seeds}"))
    diff, half, df = diff_ci(values_a, values_b, paired=paired)
    n = len([v for v in values_a if math.isfinite(v)])
    test = f"paired t over {n} seeds" if paired else f"Welch t, df {df:.1f}"
    low, high = diff - half, diff + half
    if low > 0 or high < 0:
        better_a = (diff > 0) == higher_is_better
        return Verdict(WIN, a, b, diff, low, high, test, winner=a if better_a else b)
    return Verdict(TIE, a, b, diff, low, high, test, reason="the 95% interval of the difference includes 0")


_SEVERITY = {"failed": 0, "diverged": 1, "stalled": 2, "unconverged": 3}  # which problem's remedy comes first


def _not_results(statuses: Sequence[str] | None) -> list[str]:
    order = ("failed", "diverged", "stalled", "unconverged")
    present = {s for s in statuses or () if s not in RESULT_STATUSES}
    return [s for s in order if s in present] + sorted(present - set(order))


def _describe(status: str) -> str:
    return {
        "failed": "failed",
        "diverged": "diverged",
        "stalled": "stalled at chance level",
        "unconverged": "had not converged when the budget ended",
    }.get(status, f"ended {status}")


def _inconclusive(a: str, b: str, reason: str, settle: str | None) -> Verdict:
    nan = math.nan
    return Verdict(INCONCLUSIVE, a, b, nan, nan, nan, "", reason=reason, settle=settle)
