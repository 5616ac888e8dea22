"""Study ``small-batch``: BN, GN, batch renorm, EvalNorm and PreciseBN at small batch sizes — test error and
train/eval gap, in the layout of Group Norm's Table 2 with its ImageNet numbers printed beside ours.

Every variant x batch size x seed trains with the linear scaling rule ``lr = lr * batch / base_batch`` (as
Wu & He 2018) under the recipe's budget: equal epochs or steps, or with ``budget = "auto"`` until the run's
own plateau (capped), so that neither equal epochs nor equal steps decides the comparison. Batch renorm's
Ioffe schedule is scaled to the run's length (the cap of an auto budget). Evaluation (science.md section 5):
- ``bn``, ``gn``, ``batch_renorm``: the final model in eval mode (running / per-example statistics);
- ``precise_bn``: the BN runs with their running statistics recomputed after training by
  :func:`normlab.layers.precise_bn` over ``precise_bn_samples`` training examples in batches of the training
  batch size (Wu & Johnson 2021);
- ``evalnorm``: the BN runs too, their BN layers converted to EvalNorm layers
  (:func:`normlab.layers.convert_norm`: statistics and affine copied) with (a, b) fitted offline by
  :func:`normlab.layers.fit_evalnorm` on the same batches (Singh & Shrivastava 2019). EvalNorm trains exactly
  as BN (its correction is at evaluation; tests/test_studies_training.py checks the weights bit for bit), so
  one training serves BN, PreciseBN and EvalNorm, as the paper applies it to a BN-trained network.
Both recalibrations run on copies of the final model at the last step (a trainer callback; such runs train
one by one, so ``recalibrate_batches`` may limit them to the batch sizes a scale affords) and are stored
as the metrics ``small_batch/recalibrated_test_acc`` (PreciseBN) and ``small_batch/evalnorm_test_acc``
(NaN in the table when a BN run was found finished in a shared store without them, i.e. trained by
another study). The train/eval gap is the test
accuracy with batch statistics over batches of the training batch size minus the evaluated accuracy.
The claim holds when BN's error rises more than GN's from batch 32 (Table 2's largest; else our largest)
to the smallest batch.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import DEFAULT_MARGIN, EQUIVALENT, INCONCLUSIVE, UNRESOLVED, WIN
from normlab.studies._grid import (
    base_fields,
    budget_fields,
    budget_text,
    group_results,
    pct_cell,
    variant_fields,
    with_run_length,
)
from normlab.studies._verdict import ci_text, compare_records, inconclusive_text, record
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS = {
    "model": str,
    "width": (int, float),
    "dataset": str,
    "subset": int,
    "variants": {"list": str},
    "batch_sizes": {"list": int},
    "epochs": int,
    "lr": float,
    "base_batch": int,
    "weight_decay": float,
    "precise_bn_samples": int,
    "norm_options": dict,
}

RECALIBRATED = "small_batch/recalibrated_test_acc"  # PreciseBN's
EVALNORM = "small_batch/evalnorm_test_acc"
# Group Norm (Wu & He 2018) Table 2: ResNet-50 ImageNet val error (%) at per-GPU batch 32/16/8/4/2.
REFERENCE = {
    "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
}
REFERENCE_BATCH = 32  # the largest batch of Group Norm's Table 2
LABELS = {"bn": "BN", "gn": "GN", "batch_renorm": "BRN", "evalnorm": "EvalNorm", "precise_bn": "PreciseBN"}


class Recalibrate:
    """Trainer callback (every step) of a BN run: at its last step (``ctx.last``: a fixed budget's end, or an
    auto budget's once its cooldown set it), recalibrate two copies of the model, PreciseBN's statistics and
    EvalNorm's offline fit (BN layers converted to EvalNorm), and log their eval-mode test accuracies as
    :data:`RECALIBRATED` and :data:`EVALNORM`."""

    def __init__(self, data: Any, samples: int) -> None:
        self.data, self.samples = data, samples

    def __call__(self, ctx: Any) -> None:
        if not ctx.last:
            return
        from normlab.layers import convert_norm, fit_evalnorm, precise_bn
        from normlab.train.evaluate import evaluate

        batch = ctx.config.batch_size
        device = next(ctx.model.parameters()).device
        n = min(self.samples, self.data.x_train.shape[0]) // batch * batch
        x = self.data.x_train[:n].to(device)
        batches = [x[i : i + batch] for i in range(0, n, batch)]
        recalibrated = {
            RECALIBRATED: precise_bn(copy.deepcopy(ctx.model), batches),
            EVALNORM: fit_evalnorm(convert_norm(copy.deepcopy(ctx.model), "evalnorm"), batches),
        }
        for metric, model in recalibrated.items():
            _, acc = evaluate(
                model,
                self.data.x_test.to(device),
                self.data.y_test.to(device),
                ctx.loss_fn,
                batch_size=ctx.config.eval_batch_size,
                classification=True,
            )
            ctx.log(metric, acc)


class RecalibrationCallbacks:
    """``callbacks_factory`` of the sweep (picklable: a module-level class): a :class:`Recalibrate` at the
    last step of ``bn`` runs, over ``samples`` training examples."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def __call__(self, config: Any) -> list:
        if config.norm != "bn":
            return []
        from normlab.train.build import load_data

        return [(Recalibrate(load_data(config), self.samples), 1)]


RECALIBRATED_VARIANTS = ("precise_bn", "evalnorm")


def run(ctx: StudyContext) -> StudyOutcome:
    p = ctx.params
    # Runs that recalibrate carry a callback, so they train one by one; the others train as batched groups
    # (normlab.batched). ``recalibrate_batches`` (default: every batch size) limits PreciseBN / EvalNorm to
    # the batch sizes the recipe can afford; the verdict needs them at the smallest only.
    recalibrate = set(p.get("recalibrate_batches") or p["batch_sizes"])
    if not recalibrate <= set(p["batch_sizes"]) or min(p["batch_sizes"]) not in recalibrate:
        raise NormlabError(f"recalibrate_batches {sorted(recalibrate)} must be among batch_sizes "
                           f"{p['batch_sizes']} and include the smallest (the verdict compares there)")
    configs, keys = [], []
    for variant in p["variants"]:
        for batch in p["batch_sizes"]:
            if variant in RECALIBRATED_VARIANTS and batch not in recalibrate:
                continue
            for seed in ctx.seeds:
                steps = p["steps"] if p.get("steps") else p["epochs"] * (p["subset"] // batch)
                config = ctx.config(
                    **base_fields(p),
                    **budget_fields(p),
                    # EvalNorm and PreciseBN cells are the BN runs (one training), evaluated their ways.
                    **with_run_length(variant_fields("bn" if variant == "evalnorm" else variant, p), steps),
                    batch_size=batch,
                    lr=p["lr"] * batch / p["base_batch"],
                    seed=seed,
                )
                configs.append(config)
                keys.append((variant, batch))
    with_callbacks = [i for i, (c, (_, b)) in enumerate(zip(configs, keys, strict=True))
                      if c.norm == "bn" and b in recalibrate]
    # Smallest batches first: they take the most steps, and the pool starts groups in the order given, so the
    # longest (batch renorm's three batch-2 runs, one group stepped member by member: 97-118 s of a 5 min 28 s
    # study in a slow spell) no longer start after the short ones have taken a worker.
    one_by_one = set(with_callbacks)
    plain = sorted((i for i in range(len(configs)) if i not in one_by_one), key=lambda i: keys[i][1])
    results: list[Any] = [None] * len(configs)
    for i, r in zip(plain, ctx.train_grid([configs[i] for i in plain]), strict=True):
        results[i] = r
    factory = RecalibrationCallbacks(p["precise_bn_samples"])
    recalibrated = ctx.train_grid([configs[i] for i in with_callbacks], factory)
    for i, r in zip(with_callbacks, recalibrated, strict=True):
        results[i] = r
    cells = group_results(keys, results)
    metrics = {(v, b): [_evaluated(ctx, v, r) for r in runs] for (v, b), runs in cells.items()}

    batches = sorted(p["batch_sizes"], reverse=True)
    main = Table(
        "Test error (%) by batch size, mean ± 95% CI over seeds (Group Norm Table 2 layout)",
        ["variant", *[f"batch {b}" for b in batches]],
        notes=[
            f"{len(ctx.seeds)} seeds, lr = {p['lr']:g} * batch / {p['base_batch']}; {budget_text(p)}"
            + ("" if p.get("budget") == "auto" else
               " (equal steps: large batches see more epochs)" if p.get("steps") else
               " (equal epochs: small batches take more steps)")
            + "; each cell's steps and convergence: the train/eval gap table.",
            "Reference rows: Wu & He 2018 Table 2, ResNet-50 on ImageNet (val error %); — where their table "
            "has no such batch size.",
        ],
    )
    if "batch_renorm" in p["variants"] and p.get("budget") == "auto":
        main.notes.append(
            "BRN: Ioffe's schedule is scaled to the cap (plain BN for 5/130 of it, r_max reaching 3 at "
            "40/130, d_max 5 at 25/130); a run whose plateau comes before 40/130 of the cap stops with the "
            "clips still relaxing.")
    errors: dict[str, dict[int, tuple[float, float]]] = {}
    for variant in p["variants"]:
        errors[variant] = {}
        for b in batches:
            if (variant, b) not in metrics:  # not recalibrated at this batch size (recalibrate_batches)
                errors[variant][b] = (math.nan, math.nan)
                continue
            mean, half = mean_ci(acc for acc, _ in metrics[(variant, b)])
            errors[variant][b] = (round(100 * (1 - mean), 2), round(100 * half, 2))
        main.add_row(LABELS.get(variant, variant),
                     *[None if math.isnan(errors[variant][b][0]) else errors[variant][b] for b in batches])
    for norm, ref in REFERENCE.items():
        main.add_row(f"{LABELS[norm]} (Wu & He, ImageNet)", *[ref.get(b) for b in batches])

    gap_table = Table(
        "Train/eval gap: test accuracy with batch statistics minus evaluated accuracy (pts)",
        ["variant", "batch", "steps", "epochs", "test acc eval (%)", "test acc batch stats (%)", "gap (pts)",
         "converged"],
    )
    for variant in p["variants"]:
        for b in batches:
            if (variant, b) not in metrics:
                continue
            values = metrics[(variant, b)]
            evaluated = mean_ci(a for a, _ in values)
            train_mode = mean_ci(t for _, t in values)
            gap = mean_ci(t - a for a, t in values)
            runs = cells[(variant, b)]
            steps = mean_ci(r.steps for r in runs if r.status == "finished")
            gap_table.add_row(
                LABELS.get(variant, variant),
                b,
                (round(steps[0]), round(steps[1]) if math.isfinite(steps[1]) else steps[1])
                if math.isfinite(steps[0]) else None,
                round(steps[0] * b / p["subset"], 1) if math.isfinite(steps[0]) else None,
                pct_cell(evaluated),
                pct_cell(train_mode),
                pct_cell(gap),
                f"{sum(r.convergence == 'converged' for r in runs)}/{len(runs)}",
            )
    verdict, agrees, discrepancy, key_figures = judge(cells, metrics, p["variants"], p["batch_sizes"],
                                                      ctx.margin)
    caption = "Test error (%) vs batch size per variant, mean ± 95% CI over seeds."
    figure = ctx.save_figure(_plot(errors, batches), "error_vs_batch", caption)
    data = {"error_pct": {v: {str(b): e[0] for b, e in errs.items()} for v, errs in errors.items()}}
    return StudyOutcome([main, gap_table], [figure], verdict, agrees, discrepancy, data, key_figures)


def _evaluated(ctx: StudyContext, variant: str, result: Any) -> tuple[float, float]:
    """``(evaluated test accuracy, test accuracy with batch statistics)`` of one run (NaN if not finished)."""
    if result.status != "finished":
        return math.nan, math.nan
    acc = result.final_test_acc
    if variant in ("precise_bn", "evalnorm"):
        last = ctx.store.latest_metric(result.run_id, RECALIBRATED if variant == "precise_bn" else EVALNORM)
        acc = last[1] if last is not None else math.nan
    return acc, result.test_acc_train_mode


def rise_records(
    cells: dict, metrics: dict, variant: str, small: int, large: int
) -> list[dict[str, Any]]:
    """Per seed: the rise of ``variant``'s test error (fraction) from batch ``large`` to ``small``, with the
    worse convergence status of the seed's two runs (a rise is a result only if both runs are)."""
    out = []
    pairs = zip(cells[(variant, small)], cells[(variant, large)], metrics[(variant, small)],
                metrics[(variant, large)], strict=True)
    for run_small, run_large, (acc_small, _), (acc_large, _) in pairs:
        recs = (record(run_small), record(run_large))
        bad = [r for r in recs if r["convergence"] != "converged"]
        out.append({
            "rise": acc_large - acc_small,
            "convergence": bad[0]["convergence"] if bad else "converged",
            "convergence_reason": bad[0]["convergence_reason"] if bad else "",
        })
    return out


def judge(
    cells: dict, metrics: dict, variants: list[str], batches: list[int], margin: float = DEFAULT_MARGIN
) -> tuple[str, bool | None, str | None, str]:
    """Verdict: per seed, the rise of the test error from batch 32 (Group Norm's Table 2's largest; else
    our largest) to the smallest batch; BN's rise against GN's by the shared rule (:func:`normlab.stats.
    compare_arms`, paired over seeds, against ``margin`` in accuracy units). A win claim: agrees when BN's
    rise beats GN's; a GN win disagrees, and so does an equivalence (the rises agree within the margin)
    where Table 2's own effect over the same range exceeds the margin; an equivalence where Table 2's
    effect is itself inside the margin cannot test the claim (inconclusive), and so is an unresolved
    comparison (with the seeds that would resolve it), an unconverged run at either batch or fewer than 3
    seeds. The recalibrations (batch renorm, EvalNorm, PreciseBN) are compared with BN at the smallest
    batch and reported. Returns ``(sentence, agrees, discrepancy, key figures)``."""
    if "bn" not in variants or "gn" not in variants:
        return "Inconclusive: the study needs both bn and gn variants.", None, None, ""
    ordered = sorted(batches)
    small = ordered[0]
    large = max((b for b in ordered if b <= REFERENCE_BATCH), default=ordered[-1])
    rises = {v: rise_records(cells, metrics, v, small, large) for v in ("bn", "gn")}
    found = compare_records("BN", rises["bn"], "GN", rises["gn"], "rise", margin=margin)

    def err(variant: str, batch: int) -> str:
        return ci_text([1 - a for a, _ in metrics[(variant, batch)]])

    key = (
        f"test error batch {large} -> {small}: BN {err('bn', large)} -> {err('bn', small)}, "
        f"GN {err('gn', large)} -> {err('gn', small)}"
    )
    sentence = (
        f"From batch {large} to {small}, BN's test error goes from {err('bn', large)} to {err('bn', small)} "
        f"and GN's from {err('gn', large)} to {err('gn', small)} ({reference_rise(large, small)}). "
        f"{found.sentence(f'error rise (batch {large} -> {small})')}"
    )
    fixes = [v for v in ("batch_renorm", "evalnorm", "precise_bn") if v in variants]
    if fixes:
        def accs(variant: str) -> list[dict[str, Any]]:
            pairs = zip(cells[(variant, small)], metrics[(variant, small)], strict=True)
            return [record(r, acc=a) for r, (a, _) in pairs]

        for v in fixes:
            sentence += " " + compare_records(LABELS[v], accs(v), "BN", accs("bn"), "acc",
                                              margin=margin).sentence(f"test accuracy at batch {small}")
    if found.word == INCONCLUSIVE:
        return inconclusive_text([found.reason], key, found.settle), None, None, key
    if found.word == UNRESOLVED:
        return inconclusive_text([found.sentence("error rise")], key, found.settle), None, None, key
    agrees = found.word == WIN and found.winner == "BN"

    def rise(variant: str) -> str:
        return ci_text([r["rise"] for r in rises[variant]], unit=" pts")

    bn_ref, gn_ref = REFERENCE["bn"], REFERENCE["gn"]
    if found.word == EQUIVALENT and large in bn_ref and small in bn_ref:
        paper = (bn_ref[small] - bn_ref[large]) - (gn_ref[small] - gn_ref[large])
        if paper < 100 * margin:
            # Table 2's own effect over this range lies inside the margin: equivalence here is what the
            # paper shows too, so this range cannot test the claim (not a disagreement).
            reason = (
                f"over batch {large} -> {small} the paper's own effect (BN's rise minus GN's, {paper:.1f} "
                f"pts) lies inside the margin (±{100 * margin:.3g} pts), so equivalent rises here "
                f"({found.sentence('error rise')}) do not test it; the sharp rise is at batch 4-2 (+3.7 "
                "and +11.1 pts in Table 2)"
            )
            settle = "batch sizes down to 2-4 (--set batch_sizes=[...]) or --scale paper"
            return inconclusive_text([reason], key, settle), None, None, key
    discrepancy = None if agrees else (
        f"{reference_rise(large, small)}; here BN's rise from batch {large} to {small} ({rise('bn')}) does "
        f"not exceed GN's ({rise('gn')}) beyond the margin of ±{100 * margin:.3g} pts (see error_vs_batch)."
    )
    return sentence, agrees, discrepancy, key


def reference_rise(large: int, small: int) -> str:
    """Group Norm's Table 2 rise of BN's and GN's error over the same batch range, when the table has both
    sizes (and its 32 -> 2 rise besides), else its 32 -> 2 rise."""
    bn, gn = REFERENCE["bn"], REFERENCE["gn"]
    full = f"BN {bn[2] - bn[32]:+.1f}, GN {gn[2] - gn[32]:+.1f} pts from 32 to 2"
    if large in bn and small in bn and (large, small) != (32, 2):
        return (f"Group Norm's Table 2: BN {bn[small] - bn[large]:+.1f}, GN {gn[small] - gn[large]:+.1f} pts "
                f"from {large} to {small}; {full}")
    return f"Group Norm's Table 2: {full}"


def _plot(errors: dict[str, dict[int, tuple[float, float]]], batches: list[int]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normlab.reports.bars import clipped_yerr

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = sorted(batches)
    for variant, errs in errors.items():
        ax.errorbar(
            xs,
            [errs[b][0] for b in xs],
            yerr=clipped_yerr([errs[b][0] for b in xs], [errs[b][1] for b in xs], 0.0, 100.0),
            marker="o",
            capsize=3,
            label=LABELS.get(variant, variant),
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(b) for b in xs])
    ax.set_xlabel("batch size (examples per normalization batch)")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig

