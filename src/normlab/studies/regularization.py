"""Study ``regularization``: train/test gap vs batch size for BN, GN and no normalization.

Luo et al. 2019 (arXiv 1809.00846) decompose BN into population normalization plus an explicit
gamma-decay regularizer whose strength comes from the noise of the batch statistics, so BN's
regularization weakens as the batch grows (science.md section 5). The measurement: for every norm and batch
size, train for the same number of epochs (lr scaled as ``lr * (batch / base_batch) ** lr_power``) and
take the generalization gap ``gap = train accuracy - test accuracy`` of the final model, both in eval
mode. The claim holds when BN's gap grows more from the smallest to the largest batch than the gap of
every other norm (the per-example ones have no batch noise to lose).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.studies._grid import (
    base_fields,
    count_status,
    diff_stat,
    group_results,
    mean_of,
    pct_cell,
    pts,
    stat,
    variant_fields,
)
from normlab.studies.base import StudyContext, StudyOutcome, Table

PARAMS = {
    "model": str,
    "width": (int, float),
    "dataset": str,
    "subset": int,
    "norms": {"list": str},
    "batch_sizes": {"list": int},
    "epochs": int,
    "lr": float,
    "base_batch": int,
    "lr_power": float,
    "weight_decay": float,
    "norm_options": dict,
}


def scaled_lr(params: dict[str, Any], batch_size: int) -> float:
    """``lr * (batch_size / base_batch) ** lr_power``."""
    return params["lr"] * (batch_size / params["base_batch"]) ** params["lr_power"]


def run(ctx: StudyContext) -> StudyOutcome:
    p = ctx.params
    configs, keys = [], []
    for norm in p["norms"]:
        for batch in p["batch_sizes"]:
            for seed in ctx.seeds:
                configs.append(
                    ctx.config(
                        **base_fields(p),
                        **variant_fields(norm, p),
                        batch_size=batch,
                        lr=scaled_lr(p, batch),
                        seed=seed,
                    )
                )
                keys.append((norm, batch))
    cells = group_results(keys, ctx.train_grid(configs))

    table = Table(
        "Generalization gap vs batch size (accuracies in %, mean ± 95% CI over seeds)",
        ["norm", "batch", "lr", "train acc", "test acc", "gap (train - test)", "failed/diverged"],
        notes=[
            f"{len(ctx.seeds)} seeds; {p['epochs']} epochs at every batch size; "
            f"lr = {p['lr']:g} * (batch / {p['base_batch']}) ** {p['lr_power']:g}.",
            "Accuracies of the final model in eval mode; gap = train acc - test acc.",
        ],
    )
    gaps: dict[str, dict[int, float]] = {}
    for norm in p["norms"]:
        gaps[norm] = {}
        for batch in p["batch_sizes"]:
            runs = cells[(norm, batch)]
            gap = diff_stat(runs, "final_train_acc", "final_test_acc")
            gaps[norm][batch] = gap[0]
            table.add_row(
                norm,
                batch,
                round(scaled_lr(p, batch), 6),
                pct_cell(stat(runs, "final_train_acc")),
                pct_cell(stat(runs, "final_test_acc")),
                pct_cell(gap),
                len(runs) - count_status(runs, "finished"),
            )
    underfit = underfit_note(cells, p["norms"], max(p["batch_sizes"]))
    if underfit:
        table.notes.append(underfit)
    verdict, agrees, discrepancy = judge(gaps, p["batch_sizes"])
    caption = "Train/test accuracy gap (percentage points) vs batch size, mean ± 95% CI over seeds."
    figure = ctx.save_figure(_plot(cells, p), "gap_vs_batch", caption)
    data = {
        "gaps": {n: {str(b): g for b, g in v.items()} for n, v in gaps.items()},
        "test_acc": {f"{n}/{b}": mean_of(r, "final_test_acc") for (n, b), r in cells.items()},
    }
    return StudyOutcome([table], [figure], verdict, agrees, discrepancy, data)


def underfit_note(cells: dict, norms: list[str], batch: int, fit: float = 0.9) -> str | None:
    """A note naming the norms whose mean train accuracy at ``batch`` stays below ``fit``: their gap there
    is small partly because they underfit, not only because they generalize."""
    low = {n: mean_of(cells[(n, batch)], "final_train_acc") for n in norms}
    low = {n: v for n, v in low.items() if math.isfinite(v) and v < fit}
    if not low:
        return None
    names = ", ".join(f"{n} {100 * v:.1f}%" for n, v in low.items())
    return (f"Train accuracy at batch {batch} below {100 * fit:.0f}% ({names}): these gaps mix "
            "regularization with underfitting (equal epochs give large batches fewer steps).")


def judge(gaps: dict[str, dict[int, float]], batch_sizes: list[int]) -> tuple[str, bool | None, str | None]:
    """The verdict from the per-norm mean gaps: how much each norm's gap grows from the smallest to the
    largest batch; agrees when BN's growth exceeds every other norm's."""
    small, large = min(batch_sizes), max(batch_sizes)
    growth = {n: g[large] - g[small] for n, g in gaps.items()}
    if "bn" not in growth or len(growth) < 2 or not all(math.isfinite(v) for v in growth.values()):
        return (
            f"Undecided: a gap is missing (runs failed) between batch {small} and {large}.",
            None,
            None,
        )
    others = {n: v for n, v in growth.items() if n != "bn"}
    agrees = growth["bn"] > max(others.values())
    others_text = ", ".join(f"{pts(v)} for {n}" for n, v in others.items())
    verdict = (
        f"From batch {small} to {large}, BN's train/test gap changes from {pts(gaps['bn'][small])} to "
        f"{pts(gaps['bn'][large])} ({pts(growth['bn'])}) versus {others_text}: BN's regularization "
        + ("weakens more than the other norms' as the batch grows." if agrees else
           "does not weaken more than the other norms' as the batch grows.")
    )
    discrepancy = None
    if not agrees:
        top = max(others, key=others.get)
        discrepancy = (
            f"Luo et al. predict BN's gap to grow the most with batch size; here {top}'s grows "
            f"{pts(others[top])} against BN's {pts(growth['bn'])}."
        )
    return verdict, agrees, discrepancy


def _plot(cells: dict, p: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for norm in p["norms"]:
        batches = p["batch_sizes"]
        cis = [diff_stat(cells[(norm, b)], "final_train_acc", "final_test_acc") for b in batches]
        ax.errorbar(
            batches,
            [100 * c[0] for c in cis],
            yerr=[0 if math.isnan(c[1]) else 100 * c[1] for c in cis],
            marker="o",
            capsize=3,
            label=norm,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(p["batch_sizes"], [str(b) for b in p["batch_sizes"]])
    ax.set_xlabel("batch size")
    ax.set_ylabel("train acc - test acc (pts)")
    ax.set_title("Generalization gap vs batch size")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig
