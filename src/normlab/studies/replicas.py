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

Verdicts (science.md section 8), per R > 1, on the final test accuracy, paired over seeds (every arm uses
the same seeds), by the studies' shared rule (:func:`normlab.studies._verdict.decide`): the difference
``local - sync`` (and ``local - GN``) is a win / loss only when its 95% t-interval over >= 3 seeds excludes 0,
else a tie; "inconclusive" when a run of an arm did not converge (``RunResult.convergence``: unconverged,
stalled, diverged or failed). The claim holds when sync BN wins over local BN at the smallest per-replica
batch.
"""

from __future__ import annotations

import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import EQUIVALENT, INCONCLUSIVE, UNRESOLVED, Verdict
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
from normlab.studies._verdict import decide, training_gate
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
        "Differences in test accuracy (pts, paired over seeds; win only if the 95% CI excludes 0)",
        ["replicas R", "per-replica batch", "comparison", "difference", "verdict"],
        notes=["A win needs >= 3 seeds and a 95% t-interval on the per-seed differences that excludes 0; "
               "otherwise a tie. Inconclusive: an arm did not converge at this budget."],
    )
    verdicts: dict[tuple[int, str], str] = {}
    halves: dict[tuple[int, str], float] = {}  # half-width of each difference's 95% interval
    for r in p["replicas"]:
        if r == 1 or "local" not in p["variants"]:
            continue
        for other in ("sync", "gn"):
            if other not in p["variants"]:
                continue
            a, b = ("local", r), (other, r)
            outcome, diff = word(decide(LABELS["local"], cells[a], LABELS[other], cells[b]))
            verdicts[(r, other)], halves[(r, other)] = outcome, diff[1]
            better = {"win": LABELS["local"], "loss": LABELS[other]}
            name = f"{better[outcome]} better" if outcome in better else outcome
            comparisons.add_row(r, g // r, f"{LABELS['local']} - {LABELS[other]}", pct_cell(diff), name)

    verdict, agrees, discrepancy = judge(cells, verdicts, p["replicas"], g, halves)
    figure = ctx.save_figure(_plot(cells, p), "acc_vs_replica_batch",
                             "Test accuracy vs per-replica batch (mean ± 95% CI): local BN depends on it, "
                             "sync BN and GN do not (one set of runs each).")
    data = {
        "test_acc": {f"{v}/{r}": [x.final_test_acc for x in runs] for (v, r), runs in cells.items()},
        "converged": {f"{v}/{r}": c for (v, r), c in converged.items()},
        "verdicts": {f"local-{o}/{r}": v for (r, o), v in verdicts.items()},
    }
    return StudyOutcome([table, comparisons], [figure], verdict, agrees, discrepancy, data)


def _log_every(p: dict[str, Any], g: int) -> int:
    steps = p["epochs"] * (p["subset"] // g)
    # About 200 points over the budget (or the auto budget's cap): a run that stops at its plateau well
    # before the cap still has enough logged losses in each window of the plateau rule.
    return max(1, steps // 200)


def _acc(runs: list[Any]) -> tuple[float, float]:
    return mean_ci(x.final_test_acc for x in finished(runs))


def word(verdict: Verdict) -> tuple[str, tuple[float, float]]:
    """``win`` (local BN better), ``loss``, ``tie`` or ``inconclusive``, and the difference local - other
    with the half-width of its 95% interval."""
    half = (verdict.high - verdict.low) / 2
    if verdict.word == INCONCLUSIVE:
        return "inconclusive", (verdict.diff, half)
    if verdict.word in (EQUIVALENT, UNRESOLVED):
        return "tie", (verdict.diff, half)
    return ("win" if verdict.winner == verdict.a else "loss"), (verdict.diff, half)


def judge(cells: dict, verdicts: dict[tuple[int, str], str], replicas: list[int], g: int,
          halves: dict[tuple[int, str], float] | None = None) -> tuple[str, bool | None, str | None]:
    """The claim at the largest R (smallest per-replica batch): sync BN beats local BN.

    A tie is "inconclusive at this scale" when Table 2's own rise of BN's error from per-GPU batch 32 to
    this per-replica batch is no larger than the half-width of our interval (``halves``, fractions; the
    scale cannot resolve it, or unknown); a tie that could have resolved it disagrees."""
    r = max(replicas)
    if (r, "sync") not in verdicts:
        return "Undecided: the recipe has no local-vs-sync comparison at R > 1.", None, None
    outcome = verdicts[(r, "sync")]
    local, sync = _acc(cells[("local", r)]), _acc(cells[("sync", r)])
    sentence = (f"With global batch {g} over {r} replicas (per-replica batch {g // r}), local BN reaches "
                f"{pct(local[0])} and sync BN {pct(sync[0])} ({pts(local[0] - sync[0])}, local - sync)")
    if ("gn", r) in cells:
        sentence += f"; GN {pct(_acc(cells[('gn', r)])[0])}"
    r0 = min(replicas)
    if ("local", r0) in cells and r0 != r:
        gaps = [mean_ci(x.train_eval_gap for x in finished(cells[("local", k)]))[0] for k in (r0, r)]
        sentence += (f"; local BN's train/eval gap goes from {pts(gaps[0])} at per-replica batch {g // r0} "
                     f"to {pts(gaps[1])} at {g // r}")
    if outcome == "loss":
        return sentence + ": synchronizing BN's statistics helps at this per-replica batch, as claimed.", \
            True, None
    if outcome == "win":
        return sentence + ": local BN is better here.", False, (
            f"local BN's per-replica statistics (batch {g // r}) beat the global batch's beyond the seeds' "
            "spread: at this budget the extra noise regularizes (as Hoffer et al.'s ghost BN) rather than "
            "hurts.")
    if outcome == "tie":
        b = g // r
        paper = REFERENCE_BN.get(b)
        rise = None if paper is None else paper - REFERENCE_BN[32]
        half = None if halves is None else halves.get((r, "sync"))
        seeds = len(cells[("sync", r)])
        if rise is not None and half is not None and math.isfinite(half) and rise > 100 * half:
            sentence += (f": a tie (95% interval half-width {100 * half:.1f} pts), although Table 2's "
                         f"rise of BN's error from per-GPU batch 32 to {b} ({rise:.1f} pts) is larger.")
            why = (f"Wu & He's BN loses {rise:.1f} pts from per-GPU batch 32 to {b} (Table 2); here local BN "
                   f"over {r} replicas of batch {b} ties sync BN within {100 * half:.1f} pts over {seeds} "
                   f"seeds. Table 2 shrinks the total batch with the per-GPU one (8 GPUs x {b}); here the "
                   f"global batch stays {g}, so each gradient averages the noise of {r} sub-batches' "
                   "statistics (see acc_vs_replica_batch).")
            return sentence, False, why
        why = (f" Wu & He's own rise of BN's error from per-GPU batch 32 to {b} is {rise:.1f} pts (Table 2), "
               f"below what {seeds} seeds resolve here; per-replica batches of 2-4 (where Table 2's rise is "
               "3.7-11.1 pts) settle it") if rise is not None else ""
        return (sentence + ": a tie (the 95% interval of the difference contains 0), inconclusive at this "
                "scale." + why + "."), None, None
    return sentence + ": inconclusive (an arm did not converge at this budget).", None, None


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
