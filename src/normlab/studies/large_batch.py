"""Study ``large-batch``: the largest stable learning rate and the final accuracy over a batch-size x lr
grid for BN, the normalizer-free form with AGC (``nf``) and without it (``nf_noagc``), and optionally no
normalization (``none``).

De & Smith (2020) find BN's benefit is mostly that it allows larger learning rates, which matters at large
batch; Brock et al. (2021b, Sec. 4 and Fig. 1) add AGC to normalizer-free nets because without it they
become unstable at large batch (1024 and up, where their lambda = 0.01 is set) and large learning rates
(science.md sections 3 and 4). For every (variant, batch size) the study trains each lr of the grid and
reports the best stable lr with its test accuracy and the largest stable lr (stable: every seed finished,
none stalled, and the mean test accuracy reaches ``min_acc``; :func:`~normlab.studies._grid.lr_summary`).
The claim, at the largest batch (:func:`judge`):
- stability (grid outcomes, not an interval): NF+AGC is stable at a larger lr of the grid than NF without
  AGC, and at least as large as BN's; a largest stable lr at the top of the grid is ">= top" (the grid
  never reached instability), which decides only where it is the larger one;
- accuracy (an equivalence claim, "matches"): NF+AGC's and BN's accuracy at their best stable lrs are
  equivalent within the recipe's margin by the shared rule (an NF win agrees too), a BN win disagrees, an
  unresolved comparison is inconclusive with the seeds that would resolve it.
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
    "width": (int, float),
    "dataset": str,
    "subset": int,
    "variants": {"list": str},
    "batch_sizes": {"list": int},
    "lrs": {"list": float},
    # optional: "batch_lrs" = {"<batch>": [lrs]} replaces ``lrs`` at that batch size (a small batch's best
    # lr lies below a large batch's: each grid brackets its own)
    "epochs": int,
    "weight_decay": float,
    "agc_clip": float,
    "min_acc": float,
}

LABELS = {"bn": "BN", "nf": "NF+AGC", "nf_noagc": "NF without AGC", "none": "no norm"}


def batch_lrs(params: dict[str, Any]) -> dict[int, list[float]]:
    """Each batch size's lr grid: ``batch_lrs["<batch>"]`` when the recipe sets it, else ``lrs``."""
    own = params.get("batch_lrs", {})
    known = {str(b) for b in params["batch_sizes"]}
    if not isinstance(own, dict) or any(str(k) not in known for k in own):
        raise NormlabError(f"batch_lrs must be a table keyed by the recipe's batch sizes, got {own!r}")
    grids = {b: [float(lr) for lr in own.get(str(b), params["lrs"])] for b in params["batch_sizes"]}
    for b, lrs in grids.items():
        if not lrs or any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
            raise NormlabError(f"batch_lrs.{b} must be a non-empty list of positive lrs, got {lrs!r}")
    return grids


def run(ctx: StudyContext) -> StudyOutcome:
    p = ctx.params
    grids = batch_lrs(p)
    configs, keys = [], []
    for variant in p["variants"]:
        for batch in p["batch_sizes"]:
            for lr in grids[batch]:
                for seed in ctx.seeds:
                    configs.append(
                        ctx.config(
                            **base_fields(p), **budget_fields(p), **variant_fields(variant, p),
                            batch_size=batch, lr=lr, seed=seed,
                        )
                    )
                    keys.append((variant, batch, lr))
    cells = group_results(keys, ctx.train_grid(configs))

    summaries: dict[tuple[str, int], dict[str, Any]] = {}
    table = Table(
        "Best stable lr, its test accuracy (%, mean ± 95% CI) and the largest stable lr",
        ["variant", "batch", "best lr", "test acc at best lr", "largest stable lr", "diverged runs"],
        notes=[
            f"{len(ctx.seeds)} seeds; {budget_text(p)}; lr grid "
            + "; ".join(f"batch {b}: {', '.join(map(lr_text, g))}" for b, g in grids.items()) + ".",
            f"Stable lr: every seed finished and mean test accuracy >= {pct(p['min_acc'], 0)}.",
            f"NF+AGC: normalizer-free {p['model']} (Scaled WS) with AGC clip {p['agc_clip']:g}; NF without "
            "AGC: the same net, unclipped.",
        ],
    )
    for variant in p["variants"]:
        for batch in p["batch_sizes"]:
            s = lr_summary({lr: cells[(variant, batch, lr)] for lr in grids[batch]}, p["min_acc"])
            s["grid_top"] = max(grids[batch])
            summaries[(variant, batch)] = s
            table.add_row(
                LABELS.get(variant, variant),
                batch,
                lr_text(s["best_lr"]),
                pct_cell(s["acc"]),
                largest_text(s),
                f"{s['diverged']}/{s['runs']}",
            )
    verdict, agrees, discrepancy, key_figures = judge(summaries, max(p["batch_sizes"]), ctx.margin)
    figure = ctx.save_figure(
        _plot(cells, p, grids), "acc_vs_lr",
        "Final test accuracy vs learning rate per batch size (mean over seeds; x = a seed diverged).",
    )
    data = {
        "mean_test_acc": {f"{v}/{b}/{lr:g}": mean_of(r, "final_test_acc") for (v, b, lr), r in cells.items()},
        "summaries": {f"{v}/{b}": {k: s[k] for k in ("best_lr", "largest_stable_lr", "diverged")}
                      for (v, b), s in summaries.items()},
    }
    return StudyOutcome([table], [figure], verdict, agrees, discrepancy, data, key_figures)


def judge(
    summaries: dict[tuple[str, int], dict[str, Any]], batch: int, margin: float = DEFAULT_MARGIN
) -> tuple[str, bool | None, str | None, str]:
    """The verdict at batch ``batch`` (module docstring). Returns ``(sentence, agrees, discrepancy, key
    figures)``."""
    bn, nf, noagc = (summaries.get((v, batch)) for v in ("bn", "nf", "nf_noagc"))
    if bn is None or nf is None or noagc is None:
        return (f"Inconclusive: the recipe needs bn, nf and nf_noagc at batch {batch}.", None, None, "")

    def acc(s: dict[str, Any]) -> str:
        return ci_text([r.final_test_acc for r in s["best_runs"]]) if s["best_runs"] else "n/a"

    present = {LABELS[v]: summaries[(v, batch)] for v in LABELS if (v, batch) in summaries}
    key = f"batch {batch}: " + "; ".join(
        f"{name} largest stable lr {largest_text(s)}, {acc(s)}" for name, s in present.items())
    sentence = f"At batch {batch}: " + "; ".join(
        f"{name} largest stable lr {largest_text(s)}, best test accuracy {acc(s)}"
        for name, s in present.items()) + "."
    undecided, problems = [], []
    # Stability: NF+AGC above NF without AGC, and not below BN.
    for other, label in ((noagc, "NF without AGC"), (bn, "BN")):
        strict = other is noagc
        order = _stable_order(nf, other)
        if order == "unknown":
            undecided.append(f"NF+AGC's and {label}'s largest stable lrs are both at or above the top of the "
                             f"grid ({largest_text(nf)}, {largest_text(other)})")
        elif order == "below" or (strict and order == "equal"):
            problems.append(f"NF+AGC is stable up to lr {largest_text(nf)}, {label} up to "
                            f"{largest_text(other)}")
    if bn["best_runs"] and nf["best_runs"]:
        found = decide("NF+AGC", nf["best_runs"], "BN", bn["best_runs"], margin=margin)
        sentence += " " + found.sentence()
        if found.word == INCONCLUSIVE:
            undecided.append(found.reason)
        elif found.word == UNRESOLVED:
            undecided.append(found.sentence())
        elif found.word == WIN and found.winner == "BN":
            problems.append(f"NF+AGC's best accuracy falls short of BN's beyond the margin of "
                            f"±{100 * margin:.3g} pts")
        settle = found.settle
    else:
        problems.append("NF+AGC or BN has no stable lr")
        settle = None
    if problems:
        return sentence, False, "; ".join(problems) + " (see acc_vs_lr).", key
    if undecided:
        settle = settle or "an lr grid that reaches instability (--set lrs=[...])"
        return inconclusive_text(undecided, key, settle), None, None, key
    return sentence + " AGC restores the stability BN gives, at BN's accuracy, as claimed.", True, None, key


def _stable_order(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``above`` / ``equal`` / ``below`` for a's largest stable lr against b's on the batch's grid (every
    variant shares it), ``unknown`` when both are the top of the grid: neither grid reached instability,
    so both are lower bounds. One at the top and the other below it is ordered: the other one's grid did
    reach instability."""
    top = a.get("grid_top", math.inf)
    la = -math.inf if a["largest_stable_lr"] is None else a["largest_stable_lr"]
    lb = -math.inf if b["largest_stable_lr"] is None else b["largest_stable_lr"]
    if la >= top and lb >= top:
        return "unknown"
    return "above" if la > lb else "equal" if la == lb else "below"


def _plot(cells: dict, p: dict[str, Any], grids: dict[int, list[float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = p["batch_sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches, strict=True):
        for variant in p["variants"]:
            lrs = grids[batch]
            accs = [100 * mean_of(cells[(variant, batch, lr)], "final_test_acc") for lr in lrs]
            (line,) = ax.plot(lrs, accs, marker="o", label=LABELS.get(variant, variant))
            bad = [lr for lr in lrs if any(r.status != "finished" for r in cells[(variant, batch, lr)])]
            if bad:
                ax.plot(bad, [10.0] * len(bad), "x", color=line.get_color(), markersize=9)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig
