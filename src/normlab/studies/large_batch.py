"""Study ``large-batch``: final accuracy and largest stable learning rate over a batch-size x lr grid for
BN, no normalization, and the normalizer-free form with AGC.

De & Smith (2020) find BN's benefit is mostly that it allows larger learning rates, which matters at large
batch; Brock et al. (2021b) add AGC to normalizer-free nets to recover that stability at large batch
(science.md sections 3 and 4). For every (variant, batch size) the study trains each lr of the grid for
the same epochs and reports the best stable lr with its test accuracy and the largest stable lr (stable:
every seed finished and the mean test accuracy reaches ``min_acc``; see :func:`~normlab.studies._grid.
lr_summary`). The claim holds when, at the largest batch, BN's largest stable lr is at least that of the
unnormalized net and NF+AGC's best accuracy is not beaten by BN's by the shared rule (:func:`judge`).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import INCONCLUSIVE, WIN
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

LABELS = {"bn": "BN", "none": "no norm", "nf": "NF+AGC"}


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
            f"NF+AGC: normalizer-free {p['model']} (Scaled WS) with AGC clip {p['agc_clip']:g}.",
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
    verdict, agrees, discrepancy, key_figures = judge(summaries, max(p["batch_sizes"]))
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
    summaries: dict[tuple[str, int], dict[str, Any]], batch: int
) -> tuple[str, bool | None, str | None, str]:
    """Verdict at the largest batch: BN's largest stable lr vs no-norm's (grid outcome: every seed stable),
    and NF+AGC's accuracy vs BN's at their best stable lrs by the shared rule (:func:`normlab.stats.
    compare_arms`): a tie or an NF win recovers BN's accuracy. Returns ``(sentence, agrees, discrepancy,
    key figures)``."""
    bn, none, nf = (summaries.get((v, batch)) for v in ("bn", "none", "nf"))
    if bn is None or bn["best_lr"] is None:
        return f"Inconclusive: BN has no stable learning rate at batch {batch}.", None, None, ""

    def stable_lr(s: dict[str, Any] | None) -> float:
        return -math.inf if s is None or s["largest_stable_lr"] is None else s["largest_stable_lr"]

    def acc(s: dict[str, Any]) -> str:
        return ci_text([r.final_test_acc for r in s["best_runs"]])

    present = {name: s for name, s in (("BN", bn), ("no norm", none), ("NF+AGC", nf)) if s is not None}
    key = f"batch {batch}: " + "; ".join(
        f"{name} {acc(s) if s['best_runs'] else 'n/a'}, largest stable lr {largest_text(s)}"
        for name, s in present.items()
    )
    sentence = f"At batch {batch}: " + "; ".join(
        f"{name} largest stable lr {largest_text(s)}, best test accuracy "
        f"{acc(s) if s['best_runs'] else 'n/a'}" for name, s in present.items()
    ) + "."
    problems = []
    if none is not None and bn["largest_stable_lr"] < stable_lr(none):
        problems.append(
            f"the unnormalized net is stable up to lr {largest_text(none)}, above BN's {largest_text(bn)}"
        )
    if nf is not None:
        if not nf["best_runs"]:
            problems.append("NF+AGC has no stable lr")
        else:
            found = decide("NF+AGC", nf["best_runs"], "BN", bn["best_runs"])
            sentence += " " + found.sentence()
            if found.word == INCONCLUSIVE:
                return inconclusive_text([found.reason], key, found.settle), None, None, key
            if found.word == WIN and found.winner == "BN":
                problems.append("NF+AGC's best accuracy falls short of BN's beyond the seeds' spread")
    discrepancy = "; ".join(problems) + " (see acc_vs_lr)." if problems else None
    return sentence, not problems, discrepancy, key


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
