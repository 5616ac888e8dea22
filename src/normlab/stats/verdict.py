"""One rule for every sentence that ranks two arms (``compare`` and every study), read against a margin.

science.md section 8, the rule a reviewer would sign. With the two-sided 95% interval ``[low, high]`` of the
difference of means (Welch's t-interval over independent seeds, or the paired t-interval when both arms
ran the same seeds: :func:`normlab.stats.intervals.diff_ci`) and a stated margin ``delta > 0``:

- *equivalent* when the interval lies inside ``(-delta, +delta)``, whether or not it excludes 0 (equivalence
  by two one-sided tests, each at 2.5%: the 95% interval inside the margin);
- *win* for the better arm when the interval excludes 0 and is not inside the margin;
- *unresolved* otherwise: the interval includes 0 and reaches past the margin. The verdict says how many
  seeds would resolve it if the mean difference and the seeds' spread held (:func:`seeds_to_resolve`);
- *inconclusive* when an arm is not a result: fewer than ``min_seeds`` finite values, or a run that did not
  converge (``unconverged``: still improving at the end of its budget; ``stalled``: never left chance level;
  ``diverged``; ``failed``). The verdict names the reason and the flag that would settle it.

The margin is in the metric's own units: 0.01 (1 point) for an accuracy, the default; a quantity compared on
a log scale (ICS distances, landscape quantities) passes log values and a log-ratio margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from normlab.errors import NormlabError
from normlab.stats.intervals import diff_ci, t_quantile_975

WIN, EQUIVALENT, UNRESOLVED, INCONCLUSIVE = "win", "equivalent", "unresolved", "inconclusive"
#: The default margin: 1 point of accuracy (science.md section 8).
DEFAULT_MARGIN = 0.01
#: More seeds than this are not estimated ("more than 1000 seeds").
MAX_SEEDS = 1000
# Run statuses that make an arm a result; everything else (unconverged, stalled, diverged, failed) does not.
RESULT_STATUSES = ("converged",)


def rule_text(margin: float = DEFAULT_MARGIN, *, scale: float = 100.0, unit: str = " pts",
              min_seeds: int = 3) -> str:
    """The rule in one sentence, with its margin, for reports and ``--json``."""
    delta = f"±{_number(scale * margin)}{unit}"
    return (
        f"a difference is read against a margin of {delta}: equivalent when the two-sided 95% t-interval of "
        "the difference of means over seeds (paired over shared seeds, else Welch) lies inside the margin, a "
        "win when it excludes 0 and is not inside the margin, unresolved when it includes 0 and reaches past "
        f"the margin; an arm with fewer than {min_seeds} seeds or a run that did not converge makes the "
        "comparison inconclusive"
    )


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`compare_arms`.

    ``word`` is ``win``, ``equivalent``, ``unresolved`` or ``inconclusive``; ``winner`` the better arm's name
    on a win (else None); ``diff`` = mean(a) - mean(b) with its 95% interval ``[low, high]``; ``margin`` the
    delta it was read against; ``seeds`` (unresolved only) the seeds per arm that would resolve it (None:
    more than :data:`MAX_SEEDS`); ``reason`` says why (for inconclusive: what is missing, and ``settle``, the
    flag that would settle it).
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
    margin: float = DEFAULT_MARGIN
    seeds: int | None = None

    def sentence(self, metric: str = "test accuracy", scale: float = 100.0, unit: str = " pts") -> str:
        """One sentence for a report, e.g. ``bn beats gn on test accuracy by +2.1 pts (95% CI +0.4 to
        +3.8 pts, paired t over 3 seeds; margin ±1 pts).``"""
        # A win is stated from the winner's side, so its difference and interval are positive.
        sign = -1.0 if self.word == WIN and self.winner == self.b else 1.0
        lo, hi = sorted((sign * self.low, sign * self.high))
        delta = f"±{_number(scale * self.margin)}{unit}"
        interval = f"; margin {delta}"
        if math.isfinite(lo) and math.isfinite(hi):
            interval = f" (95% CI {scale * lo:+.1f} to {scale * hi:+.1f}{unit}, {self.test}{interval})"
        difference = f"{scale * sign * self.diff:+.1f}{unit}{interval}"
        if self.word == WIN:
            loser = self.b if self.winner == self.a else self.a
            return f"{self.winner} beats {loser} on {metric} by {difference}."
        if self.word == EQUIVALENT:
            return (f"{self.a} and {self.b} are equivalent on {metric} within {delta}: "
                    f"difference {difference}.")
        if self.word == UNRESOLVED:
            more = (f"about {self.seeds} seeds would resolve it ({self.settle})" if self.seeds
                    else f"more than {MAX_SEEDS} seeds would be needed to resolve it")
            return (f"{self.a} vs {self.b} on {metric} is unresolved: difference {difference}, which "
                    f"includes 0 and reaches past the margin; {more}.")
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
    margin: float = DEFAULT_MARGIN,
    settle: dict[str, str] | None = None,
) -> Verdict:
    """Win, equivalent, unresolved or inconclusive for arm ``a`` against arm ``b`` (one value per seed each).

    Args:
        values_a, values_b: the per-seed metric of each arm (NaN for runs without a result).
        statuses_a, statuses_b: each seed's convergence status (``converged``, ``unconverged``, ``stalled``,
            ``diverged``, ``failed``); None means every value is a converged result.
        higher_is_better: False for errors and losses.
        paired: the arms share seeds (``values_a[i]`` and ``values_b[i]`` from seed ``i``): paired test.
        min_seeds: fewer finite values than this in either arm is inconclusive.
        margin: the equivalence margin delta (> 0), in the metric's units (module docstring).
        settle: the flag that settles each kind of inconclusive outcome, keyed by the status (or
            ``"seeds"``, whose text for an unresolved verdict is replaced by ``--seeds N``), e.g.
            ``{"unconverged": "--budget auto", "seeds": "--seeds 3"}``.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < math.inf:
        raise NormlabError(f"the margin must be a positive number, got {margin!r}")
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
        return _inconclusive(a, b, reason, settle.get(worst), margin)
    for name, values in ((a, values_a), (b, values_b)):
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < min_seeds:
            reason = f"{name} has {len(finite)} result(s), the rule needs at least {min_seeds} seeds"
            return _inconclusive(a, b, reason, settle.get("seeds", f"--seeds {min_seeds}"), margin)
    diff, half, df = diff_ci(values_a, values_b, paired=paired)
    n = min(len([v for v in values_a if math.isfinite(v)]), len([v for v in values_b if math.isfinite(v)]))
    test = f"paired t over {n} seeds" if paired else f"Welch t, df {df:.1f}"
    low, high = diff - half, diff + half
    if -margin < low and high < margin:
        return Verdict(EQUIVALENT, a, b, diff, low, high, test, margin=margin,
                       reason="the 95% interval of the difference lies inside the margin")
    if low > 0 or high < 0:
        better_a = (diff > 0) == higher_is_better
        return Verdict(WIN, a, b, diff, low, high, test, winner=a if better_a else b, margin=margin)
    seeds = seeds_to_resolve(diff, half, n, df, margin)
    return Verdict(UNRESOLVED, a, b, diff, low, high, test, margin=margin, seeds=seeds,
                   settle=None if seeds is None else f"--seeds {seeds}",
                   reason="the 95% interval of the difference includes 0 and reaches past the margin")


def seeds_to_resolve(diff: float, half: float, n: int, df: float, margin: float) -> int | None:
    """The fewest seeds per arm that would resolve an unresolved difference, if its mean and spread held.

    The interval resolves when its half-width falls below ``max(|diff|, margin - |diff|)``: below ``|diff|``
    it excludes 0 (a win), below ``margin - |diff|`` it lies inside the margin (equivalent); science.md's
    "half-width below delta" is this bound where the difference is near 0. With ``n`` seeds and ``df``
    degrees of freedom the spread is ``s = half * sqrt(n) / t_{0.975, df}``; ``n'`` seeds give ``t_{0.975,
    df'} * s / sqrt(n')`` with ``df' = df * (n' - 1) / (n - 1)``. None when more than :data:`MAX_SEEDS`.
    """
    target = max(abs(diff), margin - abs(diff))
    if not (math.isfinite(half) and half > 0 and n >= 2 and math.isfinite(df) and df >= 1):
        return None
    spread = half * math.sqrt(n) / t_quantile_975(df)
    for seeds in range(n + 1, MAX_SEEDS + 1):
        if t_quantile_975(max(1.0, df * (seeds - 1) / (n - 1))) * spread / math.sqrt(seeds) < target:
            return seeds
    return None


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


def _number(x: float) -> str:
    """A margin as written: ``1``, ``0.5``, ``0.25`` (no trailing zeros)."""
    return f"{x:.3g}"


def _inconclusive(a: str, b: str, reason: str, settle: str | None, margin: float) -> Verdict:
    nan = math.nan
    return Verdict(INCONCLUSIVE, a, b, nan, nan, nan, "", reason=reason, settle=settle, margin=margin)
