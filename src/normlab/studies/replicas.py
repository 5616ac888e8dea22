"""Study ``replicas``: one global batch G split over R = 1, 2, 4... data-parallel replicas, with BN statistics
local to each replica, synchronized across replicas, or GN — accuracy, and BN's dependence on the
per-replica batch b = G / R.

Across devices BN changes meaning: DDP's default normalizes each replica's sub-batch with its own statistics
(ghost BN in effect, Hoffer et al. 2017), so the noise of BN's statistics is that of batch b, not G; the
small-batch degradation of Wu & He (2018, Fig. 1 / Table 2) is a degradation in the *per-GPU* batch, and
synchronized ("cross-GPU") BN (Peng et al. 2018, MegDet) removes it. GN has no batch statistics.

How the replicas are run: simulated in one process, which is exact for training.
- ``local`` with R replicas = ghost BN with virtual batch b on the global batch (same forward, same gradients,
  same weights after every step; tests/test_distributed.py checks 2 gloo processes against it). The only
  difference: ghost BN moves the running statistics R times per step (once per ghost batch), DDP keeps rank
  0's, moved once per step from rank 0's sub-batch — both are averages of b-sample statistics.
- ``sync`` = BN on the global batch (cross-replica BN equals it to 1e-10, tests/test_distributed.py), so its
  runs do not depend on R and are trained once; ``gn`` likewise.
Run real processes with ``normlab train --nproc R --bn-sync local|sync``.

Verdict (science.md section 8): a trend test. Per seed, the least-squares slope of local BN's final test
accuracy against ``log2(b)`` over every R of the recipe (accuracy per doubling of the per-replica batch;
R = 1 is plain BN), read by the shared rule (:func:`normlab.stats.compare_arms`: the slopes over seeds
against 0) with the recipe's ``margin`` *per log2 step* (0.01: 1 point of accuracy per doubling). The
claim holds when the slope is positive beyond the margin (local BN loses accuracy as b shrinks); an
equivalence (the slope's interval inside +-margin: no dependence worth a point per doubling) or a negative
slope disagrees; an unresolved slope is inconclusive with the seeds that would resolve it; a run that did
not converge (``RunResult.convergence``) makes it inconclusive. Sync BN and GN are one set of runs for
every R (their slope is 0 by construction). Beside the trend, per R > 1, ``local - sync`` and
``local - GN`` by the same rule and margin (reported, not deciding).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import DEFAULT_MARGIN, EQUIVALENT, INCONCLUSIVE, UNRESOLVED, WIN, Verdict, rule_text
from normlab.studies._grid import (
    base_fields,
    budget_fields,
    budget_text,
    finished,
    group_results,
    pct,
    pct_cell,
    pts,
)
from normlab.studies._verdict import (
    ci_text,
    compare_records,
    decide,
    inconclusive_text,
    record,
    training_gate,
)
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci
from normlab.studies.small_batch import REFERENCE

PARAMS = {
    "model": str,
    "width": (int, float),
    "dataset": str,
    "subset": int,
    "epochs": int,
    "global_batch": int,
    "replicas": {"list": int},
    "variants": {"list": str},
    "lr": float,
    "weight_decay": float,
    "gn_groups": int,
}

LABELS = {"local": "local BN", "sync": "sync BN", "gn": "GN"}
REFERENCE_BN = REFERENCE["bn"]  # Group Norm's Table 2: BN's ImageNet val error (%) by per-GPU batch
VARIANTS = tuple(LABELS)
LOSS = "train/loss"


def arm_fields(variant: str, replicas: int, params: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields of ``variant`` over ``replicas`` replicas of the global batch (simulated)."""
    if variant == "gn":
        return {"norm": "gn", "norm_options": {"groups": int(params["gn_groups"])}}
    if variant == "sync" or replicas == 1:
        return {"norm": "bn"}
    if variant == "local":
        vbs = params["global_batch"] // replicas
        return {"norm": "ghost_bn", "norm_options": {"virtual_batch_size": vbs}}
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def run(ctx: StudyContext) -> StudyOutcome:
    p = ctx.params
    unknown = [v for v in p["variants"] if v not in VARIANTS]
    if unknown:
        raise NormlabError(f"replicas study: unknown variant(s) {', '.join(unknown)}; "
                           f"valid: {', '.join(VARIANTS)}")
    g = p["global_batch"]
    bad = [r for r in p["replicas"] if r < 1 or g % r or g // r < 2]
    if bad:
        raise NormlabError(f"replicas study: global_batch {g} does not split into replicas {bad} "
                           "of >= 2 samples each")
    configs, keys = [], []
    for variant in p["variants"]:
        for r in p["replicas"]:
            for seed in ctx.seeds:
                configs.append(ctx.config(**base_fields(p), **budget_fields(p), **arm_fields(variant, r, p),
                                          batch_size=g,
                                          lr=p["lr"], seed=seed, log_every=_log_every(p, g)))
                keys.append((variant, r))
    cells = group_results(keys, ctx.train_grid(configs))
    converged = {k: training_gate({"arm": runs}) is None for k, runs in cells.items()}

    table = Table(
        f"Test accuracy (%, mean ± 95% CI over {len(ctx.seeds)} seeds) with global batch {g} over R replicas",
        ["arm", "replicas R", "per-replica batch", "BN statistics over", "test acc", "train/eval gap (pts)",
         "converged"],
        notes=[
            f"{p['model']} on {p['dataset']} ({p['subset']} examples), {budget_text(p)}, lr {p['lr']:g}.",
            "Replicas simulated in one process: local BN over R replicas = ghost BN with virtual batch G/R "
            "(identical training, tested against 2 gloo processes); sync BN = BN on G (cross-replica BN "
            "equals it to 1e-10), trained once for every R; GN does not depend on R.",
            "train/eval gap: test accuracy with batch statistics (per-replica batches) minus eval mode.",
            "Converged: every seed's run converged by normlab's plateau rule (normlab.train.convergence).",
        ],
    )
    for (variant, r), runs in cells.items():
        gap = mean_ci(x.train_eval_gap for x in finished(runs))
        stats_over = {"local": g // r, "sync": g}.get(variant, "-")
        table.add_row(LABELS[variant], r, g // r, stats_over, pct_cell(_acc(runs)),
                      pct_cell(gap), "yes" if converged[(variant, r)] else "no")

    comparisons = Table(
        "Differences in test accuracy (pts, paired over seeds) against the margin",
        ["replicas R", "per-replica batch", "comparison", "difference", "verdict"],
        notes=[f"The shared rule: {rule_text(ctx.margin)}."],
    )
    verdicts: dict[tuple[int, str], Verdict] = {}
    for r in p["replicas"]:
        if r == 1 or "local" not in p["variants"]:
            continue
        for other in ("sync", "gn"):
            if other not in p["variants"]:
                continue
            found = decide(LABELS["local"], cells[("local", r)], LABELS[other], cells[(other, r)],
                           margin=ctx.margin)
            verdicts[(r, other)] = found
            name = f"{found.winner} better" if found.word == WIN else found.word
            comparisons.add_row(r, g // r, f"{LABELS['local']} - {LABELS[other]}",
                                pct_cell((found.diff, (found.high - found.low) / 2)), name)

    verdict, agrees, discrepancy = judge(cells, p["replicas"], g, ctx.margin, verdicts)
    figure = ctx.save_figure(_plot(cells, p), "acc_vs_replica_batch",
                             "Test accuracy vs per-replica batch (mean ± 95% CI): local BN depends on it, "
                             "sync BN and GN do not (one set of runs each).")
    data = {
        "test_acc": {f"{v}/{r}": [x.final_test_acc for x in runs] for (v, r), runs in cells.items()},
        "converged": {f"{v}/{r}": c for (v, r), c in converged.items()},
        "verdicts": {f"local-{o}/{r}": v.word for (r, o), v in verdicts.items()},
        "slopes": [rec["slope"] for rec in slope_records(cells, p["replicas"], g)],
    }
    return StudyOutcome([table, comparisons], [figure], verdict, agrees, discrepancy, data,
                        key_figures(cells, p["replicas"], g))


def _log_every(p: dict[str, Any], g: int) -> int:
    steps = p["epochs"] * (p["subset"] // g)
    # About 200 points over the budget (or the auto budget's cap): a run that stops at its plateau well
    # before the cap still has enough logged losses in each window of the plateau rule.
    return max(1, steps // 200)


def _acc(runs: list[Any]) -> tuple[float, float]:
    return mean_ci(x.final_test_acc for x in finished(runs))


def slope_records(cells: dict, replicas: list[int], g: int) -> list[dict[str, Any]]:
    """Per seed: the least-squares slope of local BN's test accuracy against ``log2(G / R)`` over
    ``replicas`` (accuracy per doubling of the per-replica batch; R = 1 is plain BN) and the worst
    convergence status among that seed's runs (a seed with a run that did not converge is not a result)."""
    xs = [math.log2(g // r) for r in replicas]
    x_mean = sum(xs) / len(xs)
    sxx = sum((x - x_mean) ** 2 for x in xs)
    arms = [cells[("local", r)] for r in replicas]
    out = []
    for seed_runs in zip(*arms, strict=True):
        recs = [record(run) for run in seed_runs]
        bad = [rec for rec in recs if rec["convergence"] != "converged"]
        ys = [float(run.final_test_acc) if run.status == "finished" else math.nan for run in seed_runs]
        y_mean = sum(ys) / len(ys)
        slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sxx
        out.append({"slope": slope,
                    "convergence": bad[0]["convergence"] if bad else "converged",
                    "convergence_reason": bad[0]["convergence_reason"] if bad else ""})
    return out


def trend(cells: dict, replicas: list[int], g: int, margin: float = DEFAULT_MARGIN) -> Verdict:
    """Local BN's slope (accuracy per log2 step of the per-replica batch) over seeds against 0, by the
    shared rule with ``margin`` per log2 step (module docstring)."""
    slopes = slope_records(cells, replicas, g)
    flat = [{"slope": 0.0} for _ in slopes]  # no dependence: what sync BN and GN are by construction
    return compare_records("local BN's slope", slopes, "no dependence", flat, "slope", margin=margin)


def key_figures(cells: dict, replicas: list[int], g: int) -> str:
    if not all(("local", r) in cells for r in replicas) or len(replicas) < 2:
        return ""
    slopes = [rec["slope"] for rec in slope_records(cells, replicas, g)]
    lo, hi = g // max(replicas), g // min(replicas)
    return (f"local BN per doubling of the per-replica batch {ci_text(slopes, unit=' pts')} "
            f"(batch {lo}: {pct(_acc(cells[('local', max(replicas))])[0])}, batch {hi}: "
            f"{pct(_acc(cells[('local', min(replicas))])[0])})")


def judge(cells: dict, replicas: list[int], g: int, margin: float = DEFAULT_MARGIN,
          verdicts: dict[tuple[int, str], Verdict] | None = None) -> tuple[str, bool | None, str | None]:
    """The claim as a trend (module docstring): local BN's accuracy rises with ``log2`` of the per-replica
    batch by more than ``margin`` per doubling. ``verdicts`` (local vs sync / GN per R) are quoted at the
    smallest per-replica batch."""
    replicas = sorted(replicas)
    if "local" not in {v for v, _ in cells} or len(replicas) < 3:
        return "Undecided: the trend test needs local BN at 3 or more replica counts.", None, None
    found = trend(cells, replicas, g, margin)
    r = replicas[-1]
    b_lo, b_hi = g // r, g // replicas[0]
    local_lo, local_hi = _acc(cells[("local", r)])[0], _acc(cells[("local", replicas[0])])[0]
    sentence = (f"With global batch {g} over R = {', '.join(map(str, replicas))} replicas, local BN reaches "
                f"{pct(local_hi)} at per-replica batch {b_hi} and {pct(local_lo)} at {b_lo}")
    if ("sync", r) in cells:
        sentence += f" (sync BN {pct(_acc(cells[('sync', r)])[0])}"
        sentence += f", GN {pct(_acc(cells[('gn', r)])[0])})" if ("gn", r) in cells else ")"
    gaps = [mean_ci(x.train_eval_gap for x in finished(cells[("local", k)]))[0] for k in (replicas[0], r)]
    sentence += (f"; its train/eval gap goes from {pts(gaps[0])} to {pts(gaps[1])}. "
                 + found.sentence(f"accuracy per doubling of the per-replica batch (batch {b_lo} to {b_hi})"))
    if verdicts and (r, "sync") in verdicts:
        sentence += " At per-replica batch " + f"{b_lo}: " + verdicts[(r, "sync")].sentence()
    if found.word == INCONCLUSIVE:
        return inconclusive_text([found.reason], key_figures(cells, replicas, g), found.settle), None, None
    if found.word == UNRESOLVED:
        return sentence + " Inconclusive at this scale: " + (
            f"{found.seeds} seeds ({found.settle}) would resolve the slope." if found.seeds
            else "the slope's spread is too wide to resolve with seeds."), None, None
    if found.word == WIN and found.winner == found.a:
        return sentence + " Local BN depends on the per-replica batch and sync BN removes it, as claimed.", \
            True, None
    paper = REFERENCE_BN[2] - REFERENCE_BN[32]
    direction = ("is flat within the margin" if found.word == EQUIVALENT
                 else "falls as the per-replica batch grows")
    return sentence, False, (
        f"Wu & He's BN loses {paper:.1f} pts from per-GPU batch 32 to 2 (Table 2, {paper / 4:.1f} pts per "
        f"doubling); here local BN's accuracy {direction} (±{100 * margin:.3g} pts per doubling) over per-"
        f"replica batches {b_lo}-{b_hi}. Table 2 shrinks the total batch with the per-GPU one (8 GPUs x b); "
        f"here the global batch stays {g}, so each gradient averages the noise of R sub-batches' statistics "
        "(see acc_vs_replica_batch).")


def _plot(cells: dict, p: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = p["global_batch"]
    batches = [g // r for r in p["replicas"]]
    from normlab.reports.bars import clipped_yerr

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for variant in p["variants"]:
        stats = [_acc(cells[(variant, r)]) for r in p["replicas"]]
        means = [100 * m for m, _ in stats]
        halves = [100 * h if math.isfinite(h) else 0.0 for _, h in stats]
        ax.errorbar(batches, means, yerr=clipped_yerr(means, halves, 0.0, 100.0), marker="o", capsize=3,
                    label=LABELS[variant])
    ax.set_xscale("log", base=2)
    ax.invert_xaxis()
    ax.set_xlabel(f"per-replica batch (global batch {g})")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
