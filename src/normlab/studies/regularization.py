"""Study ``regularization``: BN's train/test gap against the size of its *statistics* batch, at a fixed
SGD batch and learning-rate grid, with GN as the flat control.

Luo et al. 2019 (arXiv 1809.00846) decompose BN into population normalization plus an explicit
gamma-decay regularizer whose strength comes from the noise of the batch statistics, so BN's regularization
weakens as the batch its statistics are computed over grows (science.md sections 5 and 8). Varying the SGD
batch would also change SGD's own noise, so the study holds the SGD batch (``batch_size``) fixed and varies
only BN's statistics batch with ghost BN (:mod:`normlab.layers.ghost_bn`, Hoffer et al. 2017: each
``virtual_batch_size`` sub-batch normalized by its own statistics; the statistics batch equal to the SGD
batch is plain BN). GN has no batch statistics: the control whose gap cannot depend on it.

Protocol, per arm (BN at every ``stat_batches`` value, and the control): every lr of ``lrs`` x seed trains
with SGD (``momentum`` from the recipe) under the recipe's budget on the training split minus a seeded
validation split (``val_fraction``); the arm's lr is the stable lr with the best mean validation accuracy
(:class:`normlab.sweep.compare.CompareCell`, the selection ``normlab compare`` makes), and its per-seed
``gap = train accuracy - test accuracy`` of the final model (both in eval mode) is the arm's result.

Verdict (:func:`judge`): BN's gap at the largest statistics batch against its gap at the smallest, paired
over seeds, by the shared rule with the recipe's margin (accuracy units). Luo et al.'s claim is a win claim:
agrees when the gap at the largest statistics batch is larger beyond the margin; an equivalence or the
reverse disagrees; unresolved is inconclusive with the seeds that would resolve it; an arm that did not
train to a result is inconclusive. The control is reported beside it and never gates the verdict (a
stalled or unconverged control says nothing about BN's statistics batch).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import DEFAULT_MARGIN, INCONCLUSIVE, UNRESOLVED, WIN
from normlab.studies._grid import base_fields, budget_fields, budget_text, pct_cell, variant_fields
from normlab.studies._verdict import ci_text, compare_records, inconclusive_text, record, untrained_clause
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS = {
    "model": str,
    "width": (int, float),
    "dataset": str,
    "subset": int,
    "val_fraction": float,
    "batch_size": int,
    "stat_batches": {"list": int},
    "control": str,
    "lrs": {"list": float},
    "momentum": float,
    "weight_decay": float,
    "norm_options": dict,
}


def arm_name(stat_batch: int | None, control: str) -> str:
    """``BN/8`` for BN over statistics batches of 8, the control's name for the control."""
    return control.upper() if stat_batch is None else f"BN/{stat_batch}"


def stat_fields(stat_batch: int, batch_size: int) -> dict[str, Any]:
    """TrainConfig norm fields of BN over statistics batches of ``stat_batch`` inside SGD batches of
    ``batch_size``: plain BN when they are equal, else ghost BN."""
    if stat_batch == batch_size:
        return {"norm": "bn"}
    return {"norm": "ghost_bn", "norm_options": {"virtual_batch_size": int(stat_batch)}}


def check_params(p: dict[str, Any]) -> None:
    bad = [b for b in p["stat_batches"] if b < 2 or p["batch_size"] % b]
    if bad or len(p["stat_batches"]) < 2:
        raise NormlabError(
            f"regularization study: stat_batches {p['stat_batches']} must be two or more divisors (>= 2) of "
            f"batch_size {p['batch_size']}; bad: {bad}")
    if not p["lrs"] or any(not (math.isfinite(lr) and lr > 0) for lr in p["lrs"]):
        raise NormlabError(f"regularization study: lrs must be positive numbers, got {p['lrs']!r}")


def run(ctx: StudyContext) -> StudyOutcome:
    from normlab.sweep.compare import summarize_compare

    p = ctx.params
    check_params(p)
    arms: dict[str, dict[str, Any]] = {
        arm_name(b, p["control"]): stat_fields(b, p["batch_size"]) for b in sorted(p["stat_batches"])}
    arms[arm_name(None, p["control"])] = variant_fields(p["control"], p)
    configs, keys = [], []
    for arm, fields in arms.items():
        for lr in p["lrs"]:
            for seed in ctx.seeds:
                configs.append(ctx.config(
                    **base_fields(p), **budget_fields(p), **fields, batch_size=p["batch_size"], lr=lr,
                    momentum=float(p["momentum"]), val_fraction=float(p["val_fraction"]), seed=seed))
                keys.append((arm, lr))
    results = ctx.train_grid(configs)
    chosen: dict[str, list[Any]] = {}
    table = Table(
        f"Train/test gap vs BN's statistics batch at SGD batch {p['batch_size']} (accuracies in %, mean ± "
        f"95% CI over {len(ctx.seeds)} seeds, each arm at its lr chosen on validation)",
        ["arm", "statistics batch", "lr (chosen on validation)", "lr grid", "train acc", "test acc",
         "gap (train - test)", "converged"],
        notes=[
            f"{p['model']} on {p['dataset']} ({p['subset']} examples, {100 * p['val_fraction']:g}% held out "
            f"for validation); SGD batch {p['batch_size']}, momentum {p['momentum']:g}, weight decay "
            f"{p['weight_decay']:g}; {budget_text(p)}.",
            "BN/b: BN whose statistics come from sub-batches of b (ghost BN; b = the SGD batch is plain BN). "
            f"{p['control'].upper()}: the control without batch statistics.",
            "lr: the stable lr with the best mean validation accuracy ('edge': the grid's smallest or "
            "largest, so not bracketed). Accuracies of the final model in eval mode.",
        ],
    )
    for arm in arms:
        runs = {lr: [r for (a, l), r in zip(keys, results, strict=True) if a == arm and l == lr]
                for lr in p["lrs"]}
        cell = summarize_compare([r for rs in runs.values() for r in rs])[0]
        best = cell.best
        chosen[arm] = runs[best.lr] if best is not None else runs[min(p["lrs"])]
        edge = f" (edge: {cell.best_edge})" if cell.best_edge else ""
        done = [r for r in chosen[arm] if r.status == "finished"]
        stat_batch = arm.split("/")[1] if arm.startswith("BN/") else "-"
        table.add_row(
            arm, stat_batch, (f"{best.lr:g}{edge}" if best else "none stable"),
            ", ".join(f"{lr:g}" for lr in p["lrs"]),
            pct_cell(mean_ci(r.final_train_acc for r in done)),
            pct_cell(mean_ci(r.final_test_acc for r in done)),
            pct_cell(mean_ci(r.final_train_acc - r.final_test_acc for r in done)),
            f"{sum(r.convergence == 'converged' for r in chosen[arm])}/{len(chosen[arm])}",
        )
    verdict, agrees, discrepancy, key_figures = judge(chosen, p["control"], ctx.margin)
    figure = ctx.save_figure(_plot(chosen, p), "gap_vs_stat_batch",
                             "Train/test gap (pts) vs BN's statistics batch at a fixed SGD batch, mean ± "
                             f"95% CI over seeds; dashed: {p['control'].upper()} (no batch statistics).")
    data = {"gaps": {arm: [r.final_train_acc - r.final_test_acc if r.status == "finished" else math.nan
                           for r in runs] for arm, runs in chosen.items()},
            "lr": {arm: runs[0].config.get("lr") if runs else None for arm, runs in chosen.items()}}
    return StudyOutcome([table], [figure], verdict, agrees, discrepancy, data, key_figures)


def gap_records(runs: list[Any]) -> list[dict[str, Any]]:
    """Per seed: the run's train/test gap (NaN when it did not finish) and its convergence."""
    return [record(r, gap=r.final_train_acc - r.final_test_acc) for r in runs]


def judge(
    chosen: dict[str, list[Any]], control: str = "gn", margin: float = DEFAULT_MARGIN
) -> tuple[str, bool | None, str | None, str]:
    """The verdict from each arm's runs at its chosen lr (module docstring): BN's gap at the largest
    statistics batch against the smallest. Returns ``(sentence, agrees, discrepancy, key figures)``."""
    bn = sorted((int(a.split("/")[1]), a) for a in chosen if a.startswith("BN/"))
    if len(bn) < 2:
        return "The recipe must train BN at two or more statistics batches.", None, None, ""
    (small, lo), (large, hi) = bn[0], bn[-1]
    gaps = {arm: gap_records(runs) for arm, runs in chosen.items()}

    def gap(arm: str) -> str:
        return ci_text([g["gap"] for g in gaps[arm]], unit=" pts")

    found = compare_records(hi, gaps[hi], lo, gaps[lo], "gap", margin=margin)
    key = "train/test gap: " + ", ".join(f"{arm} {gap(arm)}" for arm in chosen)
    sentence = (f"At a fixed SGD batch, BN's train/test gap is {gap(lo)} with statistics over {small} "
                f"examples and {gap(hi)} over {large}. "
                + found.sentence(f"train/test gap (the larger: less regularized; statistics batch {large} "
                                 f"vs {small})"))
    control_arm = arm_name(None, control)
    if control_arm in chosen:
        sentence += f" {control_arm}, without batch statistics, has {gap(control_arm)}"
        clause = untrained_clause(control_arm, chosen[control_arm])
        sentence += f" ({clause}; a control: reported, not gating)." if clause else "."
    if found.word == INCONCLUSIVE:
        return inconclusive_text([found.reason], key, found.settle), None, None, key
    if found.word == UNRESOLVED:
        return inconclusive_text([found.sentence("train/test gap")], key, found.settle), None, None, key
    if found.word == WIN and found.winner == hi:
        return (sentence + " BN regularizes more as its statistics batch shrinks, as Luo et al. predict.",
                True, None, key)
    how = ("equal within the margin" if found.word != WIN else "larger at the small statistics batch")
    return sentence, False, (
        f"Luo et al. predict BN's gap to grow with its statistics batch (the noise of the statistics is "
        f"the regularizer); here, at a fixed SGD batch and lr tuned per arm, the gaps at statistics batch "
        f"{small} and {large} are {how} (±{100 * margin:.3g} pts; see gap_vs_stat_batch)."
    ), key


def _plot(chosen: dict[str, list[Any]], p: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cell(runs: list[Any]) -> tuple[float, float]:
        mean, half = mean_ci(100 * (r.final_train_acc - r.final_test_acc)
                             for r in runs if r.status == "finished")
        return mean, 0.0 if not math.isfinite(half) else half

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = sorted(p["stat_batches"])
    cis = [cell(chosen[arm_name(b, p["control"])]) for b in xs]
    ax.errorbar(xs, [c[0] for c in cis], yerr=[c[1] for c in cis], marker="o", capsize=3, label="BN")
    control = chosen.get(arm_name(None, p["control"]))
    if control:
        ax.axhline(cell(control)[0], linestyle="--", color="gray", label=p["control"].upper())
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(b) for b in xs])
    ax.set_xlabel(f"BN's statistics batch (SGD batch {p['batch_size']})")
    ax.set_ylabel("train acc - test acc (pts)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig
