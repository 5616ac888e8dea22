"""Study ``landscape``: does BN smooth the optimization landscape? (Santurkar et al. 2018, Sec. 3, Fig. 4).

At a training step with weights W and gradient g on the step's batch, Santurkar, Tsipras, Ilyas, Madry
(arXiv 1805.11604, Sec. 3.2) evaluate, without updating, the points ``W - eta g`` for eta in
[1/2, 4] x LR and plot over training:

- loss variation: the band between the smallest and largest loss along that line;
- gradient predictiveness: ``||grad L(W) - grad L(W - eta g)||_2`` over eta (a band as well);
- effective beta-smoothness: ``max_eta ||grad L(W) - grad L(W - eta g)|| / ||eta g||``.

With BN all three are much smaller (about two orders of magnitude for predictiveness early in training).
The study adds the top eigenvalue of the Hessian (Lanczos on Hessian-vector products), in train mode (batch
statistics: the landscape the optimizer sees) and in eval mode (running statistics).

Protocol: norms ``none`` and ``bn``, plain SGD, constant LR, every LR and seed.

1. The step range (App. A.2.2: the largest step is "slightly smaller than the learning rate at which the
   standard network diverges"). The standard net trains ``divergence_steps`` steps at each LR of the
   ascending grid ``divergence_lrs``, every seed; its divergence LR is the smallest LR of the grid at which
   no seed trained (each stalled at chance or diverged: :func:`normlab.studies._bands.trajectory_status`),
   and the line search ends at the grid's LR just below it (:func:`line_search_end`): eta in
   ``[eta_low, end / LR] x LR``.
2. Every ``dense_every`` steps up to ``dense_until`` and every ``probe_every`` after,
   :func:`normlab.probes.landscape` (train mode) logs ``probe/landscape/{loss_min, loss_max,
   grad_change_min, grad_change_max, beta_smoothness}`` for the step the run takes next (its batch,
   ``ctx.next_batch()``, and the weights it starts from); every ``hessian_every`` steps
   :func:`normlab.probes.hessian` logs ``probe/hessian/top_eigenvalue/{train, eval}``.

What is decided: BN reaches a low loss many times faster, and the landscape flattens as the loss falls, so
the arms are compared at *matched training loss* (:mod:`normlab.studies._bands`): per run, the mean over
the loss bands of each band's mean loss range ``loss_max - loss_min``, largest gradient change and beta,
compared as logarithms against the log-ratio ``margin`` (the claim is a win claim: BN lower on all three).
Same-step windows (the run's thirds), the post-convergence phase and the Hessian (last measurement) are
reported, not decided on. Arms are gated on the trajectory (left chance level, did not diverge), not on
end-of-run convergence. The verdict uses the first LR.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import EQUIVALENT, INCONCLUSIVE, UNRESOLVED, WIN, Verdict, compare_arms
from normlab.studies import _bands
from normlab.studies._santurkar import longer_budget, santurkar_base
from normlab.studies._series import ci, mean_curve
from normlab.studies._verdict import SETTLE
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS: dict[str, Any] = {
    "model": str,
    "width": float,
    "dataset": str,
    "subset": int,
    "batch_size": int,
    "steps": int,
    "lrs": {"list": float},
    "norms": {"list": str},
    "eval_every": int,
    "probe_every": int,
    "dense_every": int,
    "dense_until": int,
    "num_points": int,
    "eta_low": float,
    "divergence_lrs": {"list": float},
    "divergence_steps": int,
    "hessian_every": int,
    "hessian_iters": int,
    "loss_bands": list,
    "window": int,
    "chance_fraction": float,
    "margin": float,
}

LABELS = {"none": "standard", "bn": "BN"}
LANDSCAPE_FIELDS = ("loss_min", "loss_max", "grad_change_min", "grad_change_max", "beta_smoothness")
#: The three quantities the verdict compares, with the name of the per-probe series each is read from.
NAMES = {
    "loss_range": "loss variation",
    "grad_change": "gradient change along the step",
    "beta": "effective beta-smoothness",
}


class LandscapeProbe:
    """Trainer callback: the loss landscape along the gradient step every ``every`` steps (every
    ``dense_every`` up to ``dense_until``), and the top Hessian eigenvalue (train and eval mode) at every
    multiple of ``hessian_every``."""

    def __init__(
        self,
        every: int,
        num_points: int,
        eta_range: tuple[float, float],
        hessian_every: int,
        hessian_iters: int,
        dense_every: int = 0,
        dense_until: int = 0,
    ) -> None:
        self.every, self.dense_every, self.dense_until = every, dense_every or every, dense_until
        self.every_n_steps = self.dense_every if dense_until else every
        self.num_points = num_points
        self.eta_range = eta_range
        self.hessian_every = hessian_every
        self.hessian_iters = hessian_iters

    def __call__(self, ctx: Any) -> None:
        from normlab.probes import hessian, landscape

        if not _bands.probe_due(ctx.step, self.every, self.dense_every, self.dense_until):
            return
        # At the weights step t + 1 starts from, on the batch it will be taken on (Sec. 3.2: "at a particular
        # training step"); ctx.batch, the batch just used, would measure a second step on it.
        batch = ctx.next_batch()
        result = landscape(
            ctx.model,
            batch,
            ctx.loss_fn,
            optimizer=ctx.optimizer,
            num_points=self.num_points,
            eta_range=self.eta_range,
            mode="train",
        )
        values = {
            "loss_min": result.loss_min,
            "loss_max": result.loss_max,
            "grad_change_min": min(result.grad_change),
            "grad_change_max": max(result.grad_change),
            "beta_smoothness": result.beta_smoothness,
        }
        for name, value in values.items():
            ctx.log(f"probe/landscape/{name}", value)
        if self.hessian_every and ctx.step % self.hessian_every == 0:
            for mode in ("train", "eval"):
                # One Hutchinson sample: the trace is not used, only the Lanczos top eigenvalue.
                h = hessian(
                    ctx.model,
                    batch,
                    ctx.loss_fn,
                    top_k=1,
                    max_iter=self.hessian_iters,
                    trace_samples=1,
                    mode=mode,
                )
                ctx.log(f"probe/hessian/top_eigenvalue/{mode}", h.eigenvalues[0])


def callbacks(
    config: Any = None,
    *,
    every: int,
    num_points: int,
    eta_range: tuple[float, float],
    hessian_every: int,
    hessian_iters: int,
    dense_every: int = 0,
    dense_until: int = 0,
) -> list:
    """The callbacks of one run; module level so the process pool can pickle it (via ``partial``)."""
    return [LandscapeProbe(every, num_points, eta_range, hessian_every, hessian_iters, dense_every,
                           dense_until)]


def line_search_end(lrs: list[float], statuses: dict[float, list[str]]) -> tuple[float | None, float | None]:
    """``(end, divergence_lr)`` from the standard net's gate statuses per LR of the ascending grid ``lrs``:
    ``divergence_lr`` is the smallest LR at which no seed trained (None: some seed trained at every LR),
    ``end`` the grid's LR just below it (None: the grid's first LR already failed).

    "Diverges" is read as "does not train at all": a seed that is slow to leave chance within a short
    probe (measured: seed 2 at LR 0.2 had a smoothed loss of 2.13 at step 300 while seeds 0 and 1 trained)
    does not make an LR the divergence LR; a collapse to chance in every seed (LR 0.28) does."""
    end = divergence = None
    for lr in sorted(lrs):
        if any(s == _bands.TRAINED for s in statuses[lr]):
            end = lr
        else:
            divergence = lr
            break
    return end, divergence


def series_of(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """The per-probe series the verdict reads: ``loss_range`` (``loss_max - loss_min``), ``grad_change``
    (the largest gradient change along the line) and ``beta``."""
    lo, hi = dict(metrics.get("probe/landscape/loss_min", [])), metrics.get("probe/landscape/loss_max", [])
    return {
        "loss_range": [(s, v - lo[s]) for s, v in sorted(hi) if s in lo],
        "grad_change": sorted(metrics.get("probe/landscape/grad_change_max", [])),
        "beta": sorted(metrics.get("probe/landscape/beta_smoothness", [])),
    }


def summarize_run(
    metrics: dict[str, list[tuple[int, float]]],
    loss: list[tuple[int, float]],
    bands: list[tuple[float, float]],
    window: int,
    steps: int,
) -> dict[str, Any]:
    """Per quantity of :data:`NAMES`: ``<key>_bands`` (per band, the mean over its probes), ``<key>`` (the
    matched-loss value: their mean), ``<key>_after`` (below the lowest band), ``<key>_thirds`` (the run's
    same-step thirds); ``probes`` per band; ``eig_train`` / ``eig_eval`` (the last Hessian measurement)."""
    out: dict[str, Any] = {}
    for key, values in series_of(metrics).items():
        means, counts = _bands.band_means(values, loss, bands, window)
        out[f"{key}_bands"], out["probes"] = means, counts
        out[key] = _bands.matched_mean(means)
        out[f"{key}_after"] = _bands.phase_mean(values, loss, bands[-1][1], window)
        out[f"{key}_thirds"] = _bands.step_windows(values, [0, steps // 3, 2 * steps // 3, steps])
    for mode in ("train", "eval"):
        eig = sorted(metrics.get(f"probe/hessian/top_eigenvalue/{mode}", []))
        out[f"eig_{mode}"] = eig[-1][1] if eig else math.nan
    return out


def _log(x: float) -> float:
    return math.log(x) if x > 0 else math.nan


def compare_quantities(
    runs: dict[str, list[dict[str, Any]]], margin: float, settle: dict[str, str] | None = None,
) -> dict[str, Verdict]:
    """BN vs the standard net on each quantity of :data:`NAMES` at matched loss, as logarithms against the
    log-ratio ``margin``, paired over seeds; statuses are the trajectory gate's."""
    bn, std = runs["bn"], runs["none"]
    out = {}
    for key in NAMES:
        out[key] = compare_arms(
            "BN", [_log(r[key]) for r in bn], "standard", [_log(r[key]) for r in std],
            statuses_a=_bands.result_statuses([r["gate"] for r in bn]),
            statuses_b=_bands.result_statuses([r["gate"] for r in std]),
            higher_is_better=False, paired=len(bn) == len(std), margin=margin, settle=settle or SETTLE,
        )
    return out


def verdict(
    lr: float, runs: dict[str, list[dict[str, Any]]], margin: float = math.log(1.25),
    settle: dict[str, str] | None = None,
) -> tuple[str, bool | None, str | None, str]:
    """The verdict at LR ``lr`` from ``runs[norm]``, one record per seed (``gate`` and the
    :func:`summarize_run` numbers): ``(sentence, agrees, discrepancy, key figures)``.

    Santurkar et al. claim BN makes all three smaller: the study agrees when BN wins on each
    (:func:`compare_quantities`), disagrees when the standard net wins or the two are equivalent on any;
    otherwise (unresolved: the seeds that would resolve it named; or an arm that did not train) it is
    inconclusive.
    """
    if "none" not in runs or "bn" not in runs:
        return "The recipe must train 'none' and 'bn' to compare their landscapes.", None, None, ""
    std, bn = runs["none"], runs["bn"]
    found = compare_quantities(runs, margin, settle)

    def fig(records: list[dict[str, Any]], key: str) -> str:
        return ci(mean_ci(r[key] for r in records))

    key_figures = ", ".join(f"{NAMES[k].split()[-1]} std {fig(std, k)} -> BN {fig(bn, k)}" for k in NAMES)
    parts = [f"{text}: {fig(std, key)} -> {fig(bn, key)}" for key, text in NAMES.items()]
    sentence = (
        f"At LR {lr:g}, at matched training loss, from the standard network to BN: " + "; ".join(parts)
        + f"; the last top Hessian eigenvalue is {fig(std, 'eig_train')} vs {fig(bn, 'eig_train')} in "
        f"train mode and {fig(std, 'eig_eval')} vs {fig(bn, 'eig_eval')} in eval mode. "
        + " ".join(v.sentence(f"log {NAMES[k]} (lower)", 100.0, " x 0.01") for k, v in found.items())
    )
    failed = [
        f"BN's {NAMES[k]} is not lower beyond the margin "
        f"({'the standard net wins' if v.word == WIN else v.word})"
        for k, v in found.items()
        if v.word == EQUIVALENT or (v.word == WIN and v.winner != "BN")
    ]
    if failed:
        discrepancy = ("Santurkar et al. find all three smaller with BN, but at matched training loss "
                       + "; ".join(failed) + " (see the per-band figure).")
        return sentence, False, discrepancy, key_figures
    pending = [v for v in found.values() if v.word in (INCONCLUSIVE, UNRESOLVED)]
    if pending:
        why = "; ".join(dict.fromkeys(f"{NAMES[k]}: {v.reason}" for k, v in found.items() if v in pending))
        fixes = "; ".join(dict.fromkeys(v.settle for v in pending if v.settle)) or SETTLE["unconverged"]
        return (f"Inconclusive at this scale ({why}); to settle it: {fixes}. As measured (not a verdict): "
                f"{key_figures}."), None, None, key_figures
    return sentence, True, None, key_figures


def run(ctx: StudyContext) -> StudyOutcome:
    where = f"{ctx.study.path or ctx.study.name} [scale.{ctx.scale}]"
    norms, lrs = ctx.param("norms", list), ctx.param("lrs", list)
    bands = _bands.check_bands(ctx.param("loss_bands", list), where)
    window, every, dense_every = ctx.param("window", int), ctx.param("probe_every", int), ctx.param(
        "dense_every", int)
    _bands.check_schedule(every, dense_every, where)
    chance_fraction = float(ctx.param("chance_fraction", (int, float)))
    margin = float(ctx.param("margin", (int, float)))
    eta_low = float(ctx.param("eta_low", (int, float)))
    probe_lrs = sorted(float(x) for x in ctx.param("divergence_lrs", list))
    if not probe_lrs or eta_low <= 0:
        raise NormlabError(f"{where}: divergence_lrs must be a non-empty list and eta_low > 0, got "
                           f"{probe_lrs!r} and {eta_low!r}")
    base = santurkar_base(ctx, "study/landscape")
    steps = base["steps"]
    chance = math.log(_classes(ctx.config(**base, lr=lrs[0], norm="none", seed=0)))

    # 1. Where the standard net stops training: the line search ends just below it (App. A.2.2).
    probe_grid = [(lr, seed) for lr in probe_lrs for seed in ctx.seeds]
    probe_configs = [ctx.config(**{**base, "steps": ctx.param("divergence_steps", int),
                                   "group": "study/landscape/lr-probe"}, lr=lr, norm="none", seed=seed)
                     for lr, seed in probe_grid]
    probe_results = ctx.train_grid(probe_configs)
    probe_status: dict[float, list[str]] = {lr: [] for lr in probe_lrs}
    for (lr, _), result in zip(probe_grid, probe_results, strict=True):
        loss = ctx.metrics(result.run_id, "train/loss") if result.run_id is not None else []
        status = _bands.trajectory_status(result.status, loss, chance, chance_fraction, window)
        probe_status[lr].append(status)
    end, divergence = line_search_end(probe_lrs, probe_status)

    # 2. The runs, probed along W - eta g for eta up to that end.
    grid = [(lr, norm, seed) for lr in lrs for norm in norms for seed in ctx.seeds]
    configs = [ctx.config(**base, lr=lr, norm=norm, seed=seed) for lr, norm, seed in grid]
    eta = {lr: (eta_low, max(eta_low, (end if end is not None else lr) / lr)) for lr in lrs}
    results = []
    for lr in lrs:
        factory = functools.partial(
            callbacks, every=every, num_points=ctx.param("num_points", int), eta_range=eta[lr],
            hessian_every=ctx.param("hessian_every", int), hessian_iters=ctx.param("hessian_iters", int),
            dense_every=dense_every, dense_until=ctx.param("dense_until", int),
        )
        results += ctx.train_grid([c for c, (r, _, _) in zip(configs, grid, strict=True) if r == lr],
                                  callbacks_factory=factory)

    runs: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for (lr, norm, _), result in zip(grid, results, strict=True):
        metrics, loss = {}, []
        if result.run_id is not None:
            loss = ctx.metrics(result.run_id, "train/loss")
            if result.status == "finished":
                metrics = {n: ctx.metrics(result.run_id, n) for n in ctx.store.metric_names(result.run_id)
                           if n.startswith(("probe/landscape/", "probe/hessian/"))}
        record = {"run_id": result.run_id, "status": result.status, "convergence": result.convergence,
                  "gate": _bands.trajectory_status(result.status, loss, chance, chance_fraction, window),
                  "test_acc": 100.0 * result.final_test_acc,
                  **summarize_run(metrics, loss, bands, window, steps)}
        runs.setdefault((lr, norm), []).append(record)

    settle = longer_budget({"steps": steps})
    first = {n: runs[(lrs[0], n)] for n in norms}
    sentence, agrees, discrepancy, key_figures = verdict(lrs[0], first, margin, settle)
    step_range = _step_range_text(lrs[0], eta[lrs[0]], end, divergence, probe_lrs,
                                  ctx.param("divergence_steps", int))
    sentence = f"{sentence} {step_range}"  # after the verdict: an inconclusive one still opens with the word
    tables = [_band_table(ctx, lrs, norms, runs, bands, margin), _probe_table(probe_lrs, probe_status, end,
                                                                             divergence)]
    figures = [f for lr in lrs for f in (_figure(ctx, lr, norms, runs), _band_figure(ctx, lr, norms, runs,
                                                                                    bands))]
    data = {f"{lr}/{norm}": runs[(lr, norm)] for lr in lrs for norm in norms}
    data["lr_probe"] = {str(lr): probe_status[lr] for lr in probe_lrs}
    return StudyOutcome(tables=tables, figures=figures, verdict=sentence, agrees_with_paper=agrees,
                        discrepancy=discrepancy, data=data, key_figures=key_figures)


def _classes(config: Any) -> int:
    from normlab.train.build import load_data

    return load_data(config).num_classes


def _step_range_text(lr, eta, end, divergence, probe_lrs, steps) -> str:
    if divergence is None:
        where = f"the standard net trained at every LR up to {probe_lrs[-1]:g} (>= that LR)"
    else:
        where = f"the standard net stops training at LR {divergence:g} within {steps} steps"
    last = (f"the grid's LR below it, {end:g}" if end is not None
            else f"the run's LR {lr:g}")
    return (f"Step range: {where}, so the line search runs over eta in [{eta[0]:g}, {eta[1]:.3g}] x LR, "
            f"ending at {last} (App. A.2.2).")


def _probe_table(probe_lrs, probe_status, end, divergence) -> Table:
    table = Table(
        "Where the standard network stops training (the line search's end, App. A.2.2)",
        ["lr", "seeds that trained", "statuses", "role"],
        notes=["trained: left chance level and did not diverge within the probe's steps."],
    )
    for lr in probe_lrs:
        statuses = probe_status[lr]
        role = "line search ends here" if lr == end else ("divergence LR" if lr == divergence else "")
        table.add_row(lr, f"{sum(s == _bands.TRAINED for s in statuses)}/{len(statuses)}",
                      ", ".join(statuses), role)
    return table


def _band_table(ctx, lrs, norms, runs, bands, margin) -> Table:
    table = Table(
        "Loss landscape along the gradient step at matched training loss (Santurkar et al. 2018, Sec. 3.2)",
        ["lr", "network", "band", "probes", "loss range", "max ||g - g(eta)||", "beta-smoothness",
         "lambda_max train", "lambda_max eval", "test acc %", "trained"],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds; a probe is filed under the band of its run's "
            f"training loss (mean of the logged batch losses over the {ctx.param('window', int)} steps "
            "before it); "
            "'matched' is the mean of the bands, the number the verdict compares (as a log, margin "
            f"±{margin:.3g}, a ratio of {math.exp(margin):.3g}); 'after' the post-convergence phase and "
            "'thirds' the same-step windows, reported and not decided on; lambda_max = last Hessian "
            "measurement; trained: left chance level and did not diverge.",
        ],
    )
    keys = list(NAMES)
    for lr in lrs:
        for norm in norms:
            cell = runs[(lr, norm)]
            trained = f"{sum(r['gate'] == _bands.TRAINED for r in cell)}/{len(cell)}"
            label = LABELS.get(norm, norm)
            extra = [mean_ci(r[k] for r in cell) for k in ("eig_train", "eig_eval", "test_acc")]
            for i, (hi, lo) in enumerate(bands):
                table.add_row(lr, label, f"[{hi:g}, {lo:g})", "/".join(str(r["probes"][i]) for r in cell),
                              *(mean_ci(r[f"{k}_bands"][i] for r in cell) for k in keys), "", "", "", trained)
            table.add_row(lr, label, "matched", "", *(mean_ci(r[k] for r in cell) for k in keys), *extra,
                          trained)
            table.add_row(lr, label, f"after (< {bands[-1][1]:g})", "",
                          *(mean_ci(r[f"{k}_after"] for r in cell) for k in keys), "", "", "", trained)
            for i, third in enumerate(("first", "middle", "last")):
                table.add_row(lr, label, f"{third} third of steps", "",
                              *(mean_ci(r[f"{k}_thirds"][i] for r in cell) for k in keys), "", "", "",
                              trained)
    return table


def _band_figure(ctx: StudyContext, lr: float, norms: list[str], runs: dict, bands: list) -> Any:
    """Per quantity, its value in each loss band for both arms (mean over seeds, 95% CI bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NAMES), figsize=(5 * len(NAMES), 3.6), squeeze=False)
    labels = [f"[{hi:g}, {lo:g})" for hi, lo in bands]
    for ax, (key, name) in zip(axes[0], NAMES.items(), strict=True):
        for i, norm in enumerate(norms):
            cells = [mean_ci(r[f"{key}_bands"][b] for r in runs[(lr, norm)]) for b in range(len(bands))]
            means = [m for m, _ in cells]
            errs = [h if math.isfinite(h) else 0.0 for _, h in cells]
            ax.errorbar([b + 0.1 * i for b in range(len(bands))], means, yerr=errs, fmt="-o", ms=4, capsize=3,
                        label=LABELS.get(norm, norm))
        ax.set_xticks(range(len(bands)), labels)
        ax.set_xlabel("training-loss band")
        ax.set_yscale("log")
        ax.set_title(f"{name}, lr {lr:g}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig, f"landscape_bands_lr{lr:g}",
        f"Loss variation, largest gradient change and effective beta-smoothness per training-loss band at lr "
        f"{lr:g}, standard vs BN (mean ± 95% CI over seeds): the comparison the verdict makes.")


def _figure(ctx: StudyContext, lr: float, norms: list[str], runs: dict) -> Any:
    """Santurkar Fig. 4: (a) loss variation band, (b) gradient predictiveness band, (c) beta-smoothness,
    plus the top Hessian eigenvalue, over training; first seed for the bands, mean over seeds for beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, norm in enumerate(norms):
        color, label = f"C{i}", LABELS.get(norm, norm)
        ids = [r["run_id"] for r in runs[(lr, norm)] if r["run_id"] is not None and r["status"] == "finished"]
        if not ids:
            continue
        for ax, (lo, hi) in zip(
            axes[:2], (("loss_min", "loss_max"), ("grad_change_min", "grad_change_max")), strict=True
        ):
            steps, low = mean_curve([ctx.metrics(j, f"probe/landscape/{lo}") for j in ids])
            _, high = mean_curve([ctx.metrics(j, f"probe/landscape/{hi}") for j in ids])
            ax.fill_between(steps, low, high, color=color, alpha=0.35, lw=0, label=label)
        steps, beta = mean_curve([ctx.metrics(j, "probe/landscape/beta_smoothness") for j in ids])
        axes[2].plot(steps, beta, color=color, label=label)
        for mode, style in (("train", "-o"), ("eval", "--s")):
            steps, eig = mean_curve([ctx.metrics(j, f"probe/hessian/top_eigenvalue/{mode}") for j in ids])
            axes[3].plot(steps, eig, style, color=color, ms=4, label=f"{label}, {mode} mode")
    titles = (
        "loss landscape (loss along W - eta g)",
        "gradient predictiveness ||g - g(eta)||",
        "effective beta-smoothness",
        "Hessian top eigenvalue",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(f"{title}, lr {lr:g}", fontsize=9)
        ax.set_xlabel("step")
        # Eigenvalues can be negative early in training: symlog keeps them on the plot.
        ax.set_yscale("symlog" if ax is axes[3] else "log", **({"linthresh": 1e-2} if ax is axes[3] else {}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return ctx.save_figure(
        fig,
        f"landscape_lr{lr:g}",
        f"Loss landscape, gradient predictiveness, beta-smoothness "
        f"(Santurkar et al. 2018, Fig. 4) and Hessian top eigenvalue at lr {lr:g}; mean over seeds.",
    )
