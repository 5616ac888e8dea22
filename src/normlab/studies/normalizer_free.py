"""Study ``normalizer-free``: NF-ResNet + AGC vs BN-ResNet vs SkipInit vs an unnormalized ResNet —
accuracy, speed and stability over a learning-rate grid.

Brock et al. (2021a, b) close the gap between unnormalized and BN ResNets with Scaled Weight
Standardization, the alpha/beta residual scaling and Adaptive Gradient Clipping; De & Smith (2020) show a
zero-initialized scalar on each residual branch (SkipInit) trains deep unnormalized ResNets (science.md
sections 3 and 4). Every variant trains every lr of the grid for the same epochs at one batch size.
Per variant: the best stable lr and its test accuracy, the largest stable lr, training speed (steps/s at
the best lr) and the number of diverged runs (stability as in :func:`normlab.studies._grid.lr_summary`).
The claim holds when NF+AGC's accuracy is not beaten by BN's by the shared rule (:func:`judge`) and it is
stable up to an lr at least as large as the plain unnormalized net's.
"""

from __future__ import annotations

import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import DEFAULT_MARGIN, INCONCLUSIVE, UNRESOLVED, WIN
from normlab.studies._grid import (
    base_fields,
    budget_fields,
    budget_text,
    group_results,
    largest_text,
    lr_summary,
    lr_text,
    mean_of,
    pct,
    pct_cell,
    variant_fields,
)
from normlab.studies._verdict import ci_text, decide, inconclusive_text
from normlab.studies.base import StudyContext, StudyOutcome, Table

PARAMS = {
    "model": str,
    "depth": int,
    "width": (int, float),
    "dataset": str,
    "subset": int,
    "variants": {"list": str},
    "lrs": {"list": float},
    # optional: "variant_lrs" = {variant: [lrs]} replaces ``lrs`` for that variant (each variant's grid
    # brackets its own best lr: SkipInit diverges where NF+AGC is best)
    "batch_size": int,
    "epochs": int,
    "weight_decay": float,
    "agc_clip": float,
    "min_acc": float,
}

LABELS = {"bn": "BN-ResNet", "nf": "NF-ResNet+AGC", "skipinit": "SkipInit", "none": "no norm"}


def variant_lrs(params: dict[str, Any]) -> dict[str, list[float]]:
    """Each variant's lr grid: ``variant_lrs[variant]`` when the recipe sets it, else ``lrs``."""
    own = params.get("variant_lrs", {})
    if not isinstance(own, dict) or any(v not in params["variants"] for v in own):
        raise NormlabError(f"variant_lrs must be a table keyed by the recipe's variants, got {own!r}")
    grids = {v: [float(lr) for lr in own.get(v, params["lrs"])] for v in params["variants"]}
    for v, lrs in grids.items():
        if not lrs or any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
            raise NormlabError(f"variant_lrs.{v} must be a non-empty list of positive lrs, got {lrs!r}")
    return grids


def run(ctx: StudyContext) -> StudyOutcome:
    p = ctx.params
    grids = variant_lrs(p)
    configs, keys = [], []
    for variant in p["variants"]:
        for lr in grids[variant]:
            for seed in ctx.seeds:
                fields = {**base_fields(p), **budget_fields(p), **variant_fields(variant, p),
                          "batch_size": p["batch_size"]}
                configs.append(ctx.config(**fields, lr=lr, seed=seed))
                keys.append((variant, lr))
    cells = group_results(keys, ctx.train_grid(configs))
    summaries = {
        v: {**lr_summary({lr: cells[(v, lr)] for lr in grids[v]}, p["min_acc"]), "grid_top": max(grids[v])}
        for v in p["variants"]
    }
    table = Table(
        "Accuracy at the best stable lr, speed and stability (mean ± 95% CI over seeds)",
        ["variant", "best lr", "test acc (%)", "steps/s", "steps/s ÷ BN", "largest stable lr", "diverged"],
        notes=[
            f"{p['model']} depth {p['depth']} width {p['width']}, batch {p['batch_size']}, "
            f"{budget_text(p)}, {len(ctx.seeds)} seeds, lr grid "
            + "; ".join(f"{LABELS.get(v, v)} {', '.join(map(lr_text, g))}" for v, g in grids.items()) + ".",
            f"Stable lr: every seed finished and mean test accuracy >= {pct(p['min_acc'], 0)}. "
            f"NF-ResNet+AGC: nf_resnet (Scaled WS, alpha/beta scaling) with AGC clip {p['agc_clip']:g}.",
            "steps/s: each run's own training-loop timing; runs execute one after another, so machine load "
            "drifts between them (the cost study measures interleaved, same-run ratios).",
        ],
    )
    bn_speed = summaries.get("bn", {}).get("steps_per_s", (math.nan, math.nan))[0]
    for variant, s in summaries.items():
        speed = s["steps_per_s"]
        table.add_row(
            LABELS.get(variant, variant),
            lr_text(s["best_lr"]),
            pct_cell(s["acc"]),
            (round(speed[0], 1), round(speed[1], 1)),
            round(speed[0] / bn_speed, 3) if math.isfinite(bn_speed) and bn_speed > 0 else None,
            largest_text(s),
            f"{s['diverged']}/{s['runs']}",
        )
    verdict, agrees, discrepancy, key_figures = judge(summaries, ctx.margin)
    if discrepancy and "falls short" in discrepancy:
        # Why, as far as this scale can say: the runs converged, so the gap is not a budget artifact.
        discrepancy += (
            f" Why: every NF+AGC run at its best lr converged, so the gap is not the budget's; at this scale "
            f"({p['model']} depth {p['depth']}, width {p['width']:g}, {p['subset']} {p['dataset']} examples, "
            f"batch {p['batch_size']}, no augmentation or dropout) NF+AGC with clip {p['agc_clip']:g} stays "
            "behind BN, while Brock et al.'s match is on ImageNet ResNets with their regularized recipe "
            "and a clip tuned to the batch size (NFNets Fig. 3), which this recipe does not tune."
        )
    figure = ctx.save_figure(_plot(cells, p, grids), "acc_vs_lr",
                             "Final test accuracy vs learning rate (mean over seeds; x = a seed diverged).")
    data = {
        "mean_test_acc": {f"{v}/{lr:g}": mean_of(r, "final_test_acc") for (v, lr), r in cells.items()},
        "best_lr": {v: s["best_lr"] for v, s in summaries.items()},
        "largest_stable_lr": {v: s["largest_stable_lr"] for v, s in summaries.items()},
    }
    return StudyOutcome([table], [figure], verdict, agrees, discrepancy, data, key_figures)


def judge(
    summaries: dict[str, dict[str, Any]], margin: float = DEFAULT_MARGIN
) -> tuple[str, bool | None, str | None, str]:
    """NF+AGC's accuracy vs BN's, each at its best stable lr, by the shared rule (:func:`normlab.stats.
    compare_arms`, paired over seeds, against ``margin`` in accuracy units). "Matches" is an equivalence
    claim: equivalent within the margin agrees (an NF win too: it does not fall short), a BN win "falls
    short", an unresolved comparison is inconclusive with the seeds that would resolve it; and NF+AGC's
    largest stable lr vs the unnormalized net's. Returns ``(sentence, agrees, discrepancy, key figures)``.
    """
    bn, nf = summaries.get("bn"), summaries.get("nf")
    if bn is None or nf is None or bn["best_lr"] is None or nf["best_lr"] is None:
        return "Inconclusive: BN or NF+AGC missing, or one of them has no stable lr.", None, None, ""
    parts = [f"{LABELS.get(v, v)} {ci_text([r.final_test_acc for r in s['best_runs']])} (largest stable lr "
             f"{largest_text(s)}, {s['diverged']}/{s['runs']} diverged)"
             for v, s in summaries.items()]
    key = "; ".join(f"{LABELS.get(v, v)} {ci_text([r.final_test_acc for r in s['best_runs']])} at lr "
                    f"{lr_text(s['best_lr'])}" for v, s in summaries.items())
    found = decide("NF+AGC", nf["best_runs"], "BN", bn["best_runs"], margin=margin)
    sentence = "Test accuracy at each variant's best stable lr: " + "; ".join(parts) + ". " + found.sentence()
    none = summaries.get("none")

    def largest(s: dict[str, Any] | None) -> float:
        return -math.inf if s is None or s["largest_stable_lr"] is None else s["largest_stable_lr"]

    stable = none is None or largest(nf) >= largest(none)
    nf_lr = largest_text(nf)
    if stable:
        sentence += f" NF+AGC is stable up to lr {nf_lr}."
    else:
        sentence += f" NF+AGC is less stable than the unnormalized net (lr {nf_lr} vs " \
                    f"{largest_text(none)})."
    if found.word == INCONCLUSIVE:
        return inconclusive_text([found.reason], key, found.settle), None, None, key
    if found.word == UNRESOLVED:
        return inconclusive_text([found.sentence()], key, found.settle), None, None, key
    problems = []
    if found.word == WIN and found.winner == "BN":
        problems.append(f"NF+AGC's accuracy falls short of BN's beyond the margin of ±{100 * margin:.3g} pts "
                        "(see acc_vs_lr)")
    if not stable:
        problems.append("NF+AGC's largest stable lr is below the unnormalized net's")
    return sentence, not problems, ("; ".join(problems) + ".") if problems else None, key


def _plot(cells: dict, p: dict[str, Any], grids: dict[str, list[float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for variant in p["variants"]:
        lrs = grids[variant]
        accs = [100 * mean_of(cells[(variant, lr)], "final_test_acc") for lr in lrs]
        (line,) = ax.plot(lrs, accs, marker="o", label=LABELS.get(variant, variant))
        bad = [lr for lr in lrs if any(r.status != "finished" for r in cells[(variant, lr)])]
        if bad:
            ax.plot(bad, [10.0] * len(bad), "x", color=line.get_color(), markersize=9)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig
