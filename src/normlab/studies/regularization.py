"""Study ``regularization``: train/test gap vs batch size for BN, GN and no normalization.

Luo et al. 2019 (arXiv 1809.00846) decompose BN into population normalization plus an explicit
gamma-decay regularizer whose strength comes from the noise of the batch statistics, so BN's
regularization weakens as the batch grows (science.md section 5). The measurement: for every norm and batch
size, train under the recipe's budget (equal epochs or steps, or with ``budget = "auto"`` each run until
its own plateau, capped; lr scaled as ``lr * (batch / base_batch) ** lr_power``) and take the
generalization gap ``gap = train accuracy - test accuracy`` of the final model, both in eval
mode. The claim holds when BN's gap grows more from the smallest to the largest batch than the gap of
every other norm (the per-example ones have no batch noise to lose).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.stats import INCONCLUSIVE, WIN
from normlab.studies._grid import (
    base_fields,
    budget_fields,
    budget_text,
    diff_stat,
    group_results,
    mean_of,
    pct_cell,
    stat,
    variant_fields,
)
from normlab.studies._verdict import ci_text, compare_records, inconclusive_text, record, settle_text
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
                        **budget_fields(p),
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
        ["norm", "batch", "lr", "steps", "train acc", "test acc", "gap (train - test)", "converged"],
        notes=[
            f"{len(ctx.seeds)} seeds; {budget_text(p)}; "
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
                mean_steps(runs),
                pct_cell(stat(runs, "final_train_acc")),
                pct_cell(stat(runs, "final_test_acc")),
                pct_cell(gap),
                f"{sum(r.convergence == 'converged' for r in runs)}/{len(runs)}",
            )
    underfit = underfit_note(cells, p["norms"], max(p["batch_sizes"]))
    if underfit:
        table.notes.append(underfit)
    verdict, agrees, discrepancy, key_figures = judge(cells, p["norms"], p["batch_sizes"])
    caption = "Train/test accuracy gap (percentage points) vs batch size, mean ± 95% CI over seeds."
    figure = ctx.save_figure(_plot(cells, p), "gap_vs_batch", caption)
    data = {
        "gaps": {n: {str(b): g for b, g in v.items()} for n, v in gaps.items()},
        "test_acc": {f"{n}/{b}": mean_of(r, "final_test_acc") for (n, b), r in cells.items()},
    }
    return StudyOutcome([table], [figure], verdict, agrees, discrepancy, data, key_figures)


def underfit_note(cells: dict, norms: list[str], batch: int, fit: float = 0.9) -> str | None:
    """A note naming the norms whose mean train accuracy at ``batch`` stays below ``fit``: their gap there
    is small partly because they underfit, not only because they generalize."""
    low = {n: mean_of(cells[(n, batch)], "final_train_acc") for n in norms}
    low = {n: v for n, v in low.items() if math.isfinite(v) and v < fit}
    if not low:
        return None
    names = ", ".join(f"{n} {100 * v:.1f}%" for n, v in low.items())
    return (f"Train accuracy at batch {batch} below {100 * fit:.0f}% ({names}): these gaps mix "
            "regularization with underfitting.")


def mean_steps(runs: list[Any]) -> int | None:
    """The mean step count of a cell's finished runs (an auto budget stops each at its own plateau)."""
    steps = [r.steps for r in runs if r.status == "finished" and r.steps]
    return round(sum(steps) / len(steps)) if steps else None


def growth_records(cells: dict, norm: str, small: int, large: int) -> list[dict[str, Any]]:
    """Per seed: the growth of the train/test gap from batch ``small`` to ``large`` (fractions), with the
    worse convergence status of the seed's two runs (a growth is a result only if both runs are)."""
    out = []
    for a, b in zip(cells[(norm, small)], cells[(norm, large)], strict=True):
        ra, rb = record(a), record(b)
        gap = [r.final_train_acc - r.final_test_acc if r.status == "finished" else math.nan for r in (a, b)]
        statuses = [ra["convergence"], rb["convergence"]]
        worst = next((s for s in statuses if s != "converged"), "converged")
        reason = next((r["convergence_reason"] for r in (ra, rb) if r["convergence"] != "converged"), "")
        out.append({"growth": gap[1] - gap[0], "convergence": worst, "convergence_reason": reason})
    return out


def judge(
    cells: dict, norms: list[str], batch_sizes: list[int]
) -> tuple[str, bool | None, str | None, str]:
    """The verdict: per seed, how much each norm's train/test gap grows from the smallest to the largest
    batch; BN against every other norm by the shared rule (:func:`normlab.stats.compare_arms`, paired over
    seeds). Agrees when BN's growth beats every other norm's; a tie or a loss disagrees; an unconverged run
    at either batch size (or fewer than 3 seeds) makes it inconclusive. Returns ``(sentence, agrees,
    discrepancy, key figures)``."""
    small, large = min(batch_sizes), max(batch_sizes)
    if "bn" not in norms or len(norms) < 2:
        return "The recipe must train bn and at least one other norm.", None, None, ""
    growth = {n: growth_records(cells, n, small, large) for n in norms}
    others = [n for n in norms if n != "bn"]
    found = {n: compare_records("BN", growth["bn"], n, growth[n], "growth") for n in others}
    key = ", ".join(f"{n} {ci_text([r['growth'] for r in growth[n]], unit=' pts')}" for n in norms)
    key = f"gap growth from batch {small} to {large}: {key}"
    sentence = (
        f"From batch {small} to {large}, the train/test gap grows by {key.split(': ', 1)[1]}. "
        + " ".join(v.sentence(f"gap growth (batch {small} -> {large})") for v in found.values())
    )
    undecided = [v.reason for v in found.values() if v.word == INCONCLUSIVE]
    if undecided:  # what settles it follows why: a stalled arm needs a smaller lr, not more steps
        return inconclusive_text(undecided, key, settle_text(found.values())), None, None, key
    lost = [n for n, v in found.items() if not (v.word == WIN and v.winner == "BN")]
    if not lost:
        return sentence + " BN's regularization weakens more than the other norms' as the batch grows.", \
            True, None, key
    discrepancy = (
        f"Luo et al. predict BN's gap to grow the most with batch size; here BN's growth does not exceed "
        f"{', '.join(lost)}'s beyond the seeds' spread (see the gap figure)."
    )
    fit = [mean_of(runs, "final_train_acc") for runs in cells.values()]
    fit = [v for v in fit if math.isfinite(v)]
    per_example = [n for n in lost if n in ("gn", "ln", "in")]
    if per_example and fit and min(fit) >= 0.99:
        n = per_example[0]
        discrepancy += (
            f" Why: every cell fits its training set (mean train accuracy >= {100 * min(fit):.1f}%), so the "
            f"gap is the test error, which grows with the batch for every norm (the large-batch "
            f"generalization gap): BN's growth ({ci_text([r['growth'] for r in growth['bn']], unit=' pts')}) "
            f"matches {n}'s ({ci_text([r['growth'] for r in growth[n]], unit=' pts')}), which has no batch "
            "noise, so no BN-specific loss of regularization shows at this scale.")
    return sentence, False, discrepancy, key


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
