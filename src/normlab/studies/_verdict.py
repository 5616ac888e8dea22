"""How every study turns seeds into a sentence: the shared rule on converged arms, against a margin.

science.md section 8: compare only converged arms, and read the 95% interval of the difference over >= 3
seeds against a stated margin: win, equivalent or unresolved (:func:`normlab.stats.compare_arms`; each
function here takes ``margin``, in the metric's units, default 1 point of accuracy). This module adapts
that rule to the studies' inputs:

- :func:`arm` reads one arm's per-seed values and convergence statuses from its ``RunResult`` s (a run that
  did not finish gives NaN and its status; ``RunResult.convergence`` says whether a finished run plateaued);
- :func:`decide` compares two arms of runs; :func:`decide_values` two arms of measurements that involve no
  training (probes at initialization, timings), where every value is a result;
- :func:`training_gate` says, before any verdict, which arms did not train to a result and why, so a study
  reports "inconclusive at this scale" instead of deciding on an arm that did not train.

A study's overall answer is ``agrees_with_paper``: True (agrees), False (disagrees) or None (inconclusive);
:func:`agreement_word` names it for tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from normlab.stats import DEFAULT_MARGIN, EQUIVALENT, INCONCLUSIVE, UNRESOLVED, WIN, Verdict, compare_arms

__all__ = [
    "EQUIVALENT",
    "INCONCLUSIVE",
    "SETTLE",
    "UNRESOLVED",
    "WIN",
    "Verdict",
    "agreement_word",
    "arm",
    "decide",
    "decide_values",
    "training_gate",
]

#: What settles each kind of inconclusive outcome at a study's scale.
SETTLE = {
    "unconverged": "a longer budget: more of the scale table's steps or epochs with --set (e.g. --set "
                   "steps=N; the report's Configuration lists the fields), or --scale paper",
    "stalled": "a smaller learning rate or a longer budget (--set on the scale table's lr or steps)",
    "diverged": "a smaller learning rate (--set on the scale table's lr or lrs)",
    "failed": "the run's error in the results store (normlab runs show)",
    "seeds": "--seeds 3",
}


def final_test_acc(result: Any) -> float:
    return float(result.final_test_acc)


def arm(
    results: Sequence[Any], value: Callable[[Any], float] = final_test_acc
) -> tuple[list[float], list[str]]:
    """One arm's per-seed ``value(result)`` (NaN for a run that did not finish) and convergence statuses.

    A finished run without a convergence status (stored before the rule existed) counts as ``unconverged``:
    nothing shows that it plateaued.
    """
    values, statuses = [], []
    for result in results:
        finished = result.status == "finished"
        values.append(float(value(result)) if finished else math.nan)
        status = getattr(result, "convergence", "") or ("unconverged" if finished else result.status)
        statuses.append(status)
    return values, statuses


def decide(
    a: str,
    results_a: Sequence[Any],
    b: str,
    results_b: Sequence[Any],
    *,
    value: Callable[[Any], float] | tuple[Sequence[float], Sequence[float]] = final_test_acc,
    higher_is_better: bool = True,
    paired: bool = True,
    margin: float = DEFAULT_MARGIN,
) -> Verdict:
    """:func:`normlab.stats.compare_arms` on two arms of runs (same seeds in the same order: paired).

    ``value`` reads the metric from a ``RunResult``, or is the pair ``(values_a, values_b)`` of per-seed
    numbers measured elsewhere (from the store); the runs then only supply the convergence statuses.
    """
    if callable(value):
        va, sa = arm(results_a, value)
        vb, sb = arm(results_b, value)
    else:
        (_, sa), (_, sb) = arm(results_a, lambda r: 0.0), arm(results_b, lambda r: 0.0)
        va, vb = [float(v) for v in value[0]], [float(v) for v in value[1]]
    paired = paired and len(va) == len(vb)
    return compare_arms(
        a, va, b, vb, statuses_a=sa, statuses_b=sb, higher_is_better=higher_is_better, paired=paired,
        margin=margin, settle=SETTLE,
    )


def decide_values(
    a: str,
    values_a: Sequence[float],
    b: str,
    values_b: Sequence[float],
    *,
    higher_is_better: bool = True,
    paired: bool = True,
    margin: float = DEFAULT_MARGIN,
) -> Verdict:
    """:func:`normlab.stats.compare_arms` on per-seed measurements that need no training."""
    paired = paired and len(values_a) == len(values_b)
    return compare_arms(
        a, list(values_a), b, list(values_b), higher_is_better=higher_is_better, paired=paired,
        margin=margin, settle=SETTLE,
    )


def training_gate(arms: dict[str, Sequence[Any]]) -> str | None:
    """None when every run of every arm converged; else why the study is inconclusive at this scale, one
    clause per arm that did not train to a result (:func:`untrained_clause`)."""
    problems = [c for name, results in arms.items() if (c := untrained_clause(name, results)) is not None]
    if not problems:
        return None
    return "not every arm trained to a result: " + "; ".join(problems)


def untrained_clause(name: str, results: Sequence[Any]) -> str | None:
    """``"<name>: 1 stalled of 3 run(s) (<first bad run's reason>)"`` for an arm with runs that did not
    converge, None when all did."""
    bad = [r for r in results if (getattr(r, "convergence", "") or "unconverged") != "converged"]
    if not bad:
        return None
    counts: dict[str, int] = {}
    for r in bad:
        status = getattr(r, "convergence", "") or ("unconverged" if r.status == "finished" else r.status)
        counts[status] = counts.get(status, 0) + 1
    kinds = ", ".join(f"{n} {s}" for s, n in counts.items())
    reason = getattr(bad[0], "convergence_reason", "") or bad[0].status
    return f"{name}: {kinds} of {len(results)} run(s) ({reason})"


def agreement_word(agrees: bool | None) -> str:
    """``agrees`` / ``disagrees`` / ``inconclusive`` for a study's ``agrees_with_paper``."""
    return {True: "agrees", False: "disagrees"}.get(agrees, "inconclusive")  # type: ignore[arg-type]


def ci_text(values: Sequence[float], scale: float = 100.0, unit: str = "%", digits: int = 1) -> str:
    """``mean ± half`` of the finite ``values`` (x ``scale``), e.g. ``95.2 ± 0.4%``; ``n/a`` when none."""
    from normlab.stats import mean_ci

    mean, half = mean_ci(values)
    if not math.isfinite(mean):
        return "n/a"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * half:.{digits}f}{unit}" if math.isfinite(half) else unit)


def record(result: Any, **values: float) -> dict[str, Any]:
    """A study's per-seed record of one run: its ids and statuses, plus ``values`` (NaN when the run did
    not finish)."""
    done = result.status == "finished"
    return {
        "run_id": result.run_id,
        "status": result.status,
        "convergence": getattr(result, "convergence", "") or ("unconverged" if done else result.status),
        "convergence_reason": getattr(result, "convergence_reason", ""),
        **{k: (float(v) if done else math.nan) for k, v in values.items()},
    }


def compare_records(
    a: str,
    records_a: Sequence[dict[str, Any]],
    b: str,
    records_b: Sequence[dict[str, Any]],
    key: str,
    *,
    higher_is_better: bool = True,
    settle: dict[str, str] | None = None,
    margin: float = DEFAULT_MARGIN,
) -> Verdict:
    """:func:`normlab.stats.compare_arms` on ``record[key]`` of two arms of per-seed records (each with
    ``convergence``; records without it count as results, e.g. measurements at initialization);
    ``settle`` replaces :data:`SETTLE` (what settles each kind of inconclusive outcome)."""
    va, vb = [float(r[key]) for r in records_a], [float(r[key]) for r in records_b]
    sa = [r["convergence"] for r in records_a] if all("convergence" in r for r in records_a) else None
    sb = [r["convergence"] for r in records_b] if all("convergence" in r for r in records_b) else None
    return compare_arms(
        a, va, b, vb, statuses_a=sa, statuses_b=sb, higher_is_better=higher_is_better,
        paired=len(va) == len(vb), margin=margin, settle=settle or SETTLE,
    )


def settle_text(verdicts: Sequence[Verdict]) -> str | None:
    """What settles the inconclusive ones among ``verdicts``, each text once ("; "-joined), or None."""
    texts = [v.settle for v in verdicts if v.word == INCONCLUSIVE and v.settle]
    return "; ".join(dict.fromkeys(texts)) or None


def inconclusive_text(reasons: Sequence[str], key_figures: str, settle: str | None = None) -> str:
    """The verdict sentence of a study that cannot decide: why (each reason once), what settles it, and the
    numbers as measured, marked as not a verdict."""
    why = "; ".join(dict.fromkeys(r for r in reasons if r))
    settle = settle or SETTLE["unconverged"]
    text = f"Inconclusive at this scale ({why}); to settle it: {settle}."
    return text + (f" As measured (not a verdict): {key_figures}." if key_figures else "")
