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

Protocol: norms ``none`` and ``bn``, plain SGD, constant LR, every LR and seed; every ``probe_every`` steps
:func:`normlab.probes.landscape` (train mode) logs ``probe/landscape/{loss_min, loss_max,
grad_change_min, grad_change_max, beta_smoothness}`` for the step the run takes next (its batch,
``ctx.next_batch()``, and the weights it starts from); every ``hessian_every`` steps
:func:`normlab.probes.hessian` logs ``probe/hessian/top_eigenvalue/{train, eval}``. The table averages the
landscape numbers over the probe steps (and over the first quarter of them, "early"); the Hessian numbers
are the last measurement. The verdict uses the first LR.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from normlab.stats import INCONCLUSIVE, WIN
from normlab.studies._santurkar import longer_budget, santurkar_base
from normlab.studies._series import ci, mean_curve
from normlab.studies._verdict import compare_records, inconclusive_text, record, settle_text
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
    "num_points": int,
    "eta_range": {"list": float},
    "hessian_every": int,
    "hessian_iters": int,
}

LABELS = {"none": "standard", "bn": "BN"}
LANDSCAPE_FIELDS = ("loss_min", "loss_max", "grad_change_min", "grad_change_max", "beta_smoothness")


class LandscapeProbe:
    """Trainer callback: the loss landscape along the gradient step every ``every_n_steps`` steps, and the
    top Hessian eigenvalue (train and eval mode) at every multiple of ``hessian_every``."""

    def __init__(
        self,
        every_n_steps: int,
        num_points: int,
        eta_range: tuple[float, float],
        hessian_every: int,
        hessian_iters: int,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_points = num_points
        self.eta_range = eta_range
        self.hessian_every = hessian_every
        self.hessian_iters = hessian_iters

    def __call__(self, ctx: Any) -> None:
        from normlab.probes import hessian, landscape

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
) -> list:
    """The callbacks of one run; module level so the process pool can pickle it (via ``partial``)."""
    return [LandscapeProbe(every, num_points, eta_range, hessian_every, hessian_iters)]


def summarize_run(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Per-run numbers: the means over probe steps (all, and the first quarter for ``early_*``) of the loss
    range ``loss_max - loss_min``, the largest gradient change and beta; the last Hessian eigenvalues."""

    def series(name: str) -> list[float]:
        return [v for _, v in sorted(metrics.get(name, []))]

    def mean(values: list[float]) -> float:
        values = [v for v in values if math.isfinite(v)]
        return math.fsum(values) / len(values) if values else math.nan

    loss_range = [
        hi - lo
        for lo, hi in zip(series("probe/landscape/loss_min"), series("probe/landscape/loss_max"), strict=True)
    ]
    change, beta = series("probe/landscape/grad_change_max"), series("probe/landscape/beta_smoothness")
    early = max(1, len(beta) // 4)
    out = {
        "loss_range": mean(loss_range),
        "grad_change": mean(change),
        "beta": mean(beta),
        "early_grad_change": mean(change[:early]),
        "early_beta": mean(beta[:early]),
    }
    for mode in ("train", "eval"):
        eig = series(f"probe/hessian/top_eigenvalue/{mode}")
        out[f"eig_{mode}"] = eig[-1] if eig else math.nan
    return out


NAMES = {
    "beta": "effective beta-smoothness",
    "grad_change": "gradient change along the step",
    "loss_range": "loss variation",
}


def verdict(
    lr: float, runs: dict[str, list[dict[str, Any]]], settle: dict[str, str] | None = None,
) -> tuple[str, bool | None, str | None, str]:
    """The verdict at LR ``lr`` from ``runs[norm]``, one record per seed (``convergence`` and the
    :func:`summarize_run` numbers): ``(sentence, agrees, discrepancy, key figures)``; ``settle`` (default
    :data:`normlab.studies._verdict.SETTLE`) says what would settle an inconclusive comparison.

    Agrees with Santurkar et al. when BN has the lower loss range, gradient change and effective
    beta-smoothness than the standard network, each a win by the shared rule (:func:`normlab.stats.
    compare_arms`, paired over seeds); a tie or a standard-net win on any of them disagrees; an arm that
    did not converge (or fewer than 3 seeds) makes it inconclusive.
    """
    if "none" not in runs or "bn" not in runs:
        return "The recipe must train 'none' and 'bn' to compare their landscapes.", None, None, ""
    std, bn = runs["none"], runs["bn"]
    found = {
        key: compare_records("BN", bn, "standard", std, key, higher_is_better=False, settle=settle)
        for key in NAMES
    }

    def fig(records: list[dict[str, Any]], key: str) -> str:
        return ci(mean_ci(r[key] for r in records))

    key_figures = ", ".join(f"{NAMES[k].split()[-1]} std {fig(std, k)} -> BN {fig(bn, k)}" for k in NAMES)
    parts = [f"{text}: {fig(std, key)} -> {fig(bn, key)}" for key, text in NAMES.items()]
    sentence = (
        f"At LR {lr:g}, from the standard network to BN: " + "; ".join(parts)
        + f"; the top Hessian eigenvalue is {fig(std, 'eig_train')} vs {fig(bn, 'eig_train')} in train "
        f"mode and {fig(std, 'eig_eval')} vs {fig(bn, 'eig_eval')} in eval mode. "
        + " ".join(v.sentence(f"lower {NAMES[k]}", 1.0, "") for k, v in found.items())
    )
    undecided = [f"{NAMES[k]}: {v.reason}" for k, v in found.items() if v.word == INCONCLUSIVE]
    if undecided:
        return inconclusive_text(undecided, key_figures, settle_text(found.values())), None, None, key_figures
    failed = [
        f"BN's {NAMES[k]} is not lower beyond the seeds' spread ({v.word})"
        for k, v in found.items()
        if not (v.word == WIN and v.winner == "BN")
    ]
    discrepancy = (
        ("Santurkar et al. find all three smaller with BN, but " + "; ".join(failed) + ".")
        if failed
        else None
    )
    return sentence, not failed, discrepancy, key_figures


def run(ctx: StudyContext) -> StudyOutcome:
    norms, lrs = ctx.param("norms", list), ctx.param("lrs", list)
    eta_range = ctx.param("eta_range", list)
    if len(eta_range) != 2:
        from normlab.errors import NormlabError

        raise NormlabError(
            f"{ctx.study.path or ctx.study.name} [scale.{ctx.scale}]: eta_range must be "
            f"[low, high], got {eta_range!r}"
        )
    base = santurkar_base(ctx, "study/landscape")
    grid = [(lr, norm, seed) for lr in lrs for norm in norms for seed in ctx.seeds]
    configs = [ctx.config(**base, lr=lr, norm=norm, seed=seed) for lr, norm, seed in grid]
    factory = functools.partial(
        callbacks,
        every=ctx.param("probe_every", int),
        num_points=ctx.param("num_points", int),
        eta_range=(float(eta_range[0]), float(eta_range[1])),
        hessian_every=ctx.param("hessian_every", int),
        hessian_iters=ctx.param("hessian_iters", int),
    )
    results = ctx.train_grid(configs, callbacks_factory=factory)

    runs: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for (lr, norm, _), result in zip(grid, results, strict=True):
        metrics = {}
        if result.run_id is not None and result.status == "finished":
            metrics = {
                n: ctx.metrics(result.run_id, n)
                for n in ctx.store.metric_names(result.run_id)
                if n.startswith(("probe/landscape/", "probe/hessian/"))
            }
        numbers = {"test_acc": 100.0 * result.final_test_acc, **summarize_run(metrics)}
        runs.setdefault((lr, norm), []).append(record(result, **numbers))

    keys = (
        "test_acc",
        "loss_range",
        "grad_change",
        "beta",
        "early_grad_change",
        "early_beta",
        "eig_train",
        "eig_eval",
    )
    summary = {
        lr: {norm: {k: mean_ci(r[k] for r in runs[(lr, norm)]) for k in keys} for norm in norms} for lr in lrs
    }
    table = Table(
        "Loss landscape along the gradient step (Santurkar et al. 2018, Sec. 3.2) and Hessian top eigenvalue",
        [
            "lr",
            "network",
            "test acc %",
            "loss range",
            "max ||g - g(eta)||",
            "beta-smoothness",
            "early max ||g - g(eta)||",
            "early beta",
            "lambda_max train",
            "lambda_max eval",
            "converged",
        ],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds; landscape every {ctx.param('probe_every', int)} "
            f"steps on eta in {eta_range} x LR ({ctx.param('num_points', int)} points), train mode; "
            "early = first quarter of the probe steps; lambda_max = last Hessian measurement."
        ],
    )
    for lr in lrs:
        for norm in norms:
            s = summary[lr][norm]
            cell = runs[(lr, norm)]
            done = sum(r["convergence"] == "converged" for r in cell)
            table.add_row(lr, LABELS.get(norm, norm), *(s[k] for k in keys), f"{done}/{len(cell)}")
    settle = longer_budget({"steps": ctx.param("steps", int)})
    first = {n: runs[(lrs[0], n)] for n in norms}
    sentence, agrees, discrepancy, key_figures = verdict(lrs[0], first, settle)
    figures = [_figure(ctx, lr, norms, runs) for lr in lrs]
    data = {f"{lr}/{norm}": runs[(lr, norm)] for lr in lrs for norm in norms}
    return StudyOutcome(
        tables=[table],
        figures=figures,
        verdict=sentence,
        agrees_with_paper=agrees,
        discrepancy=discrepancy,
        data=data,
        key_figures=key_figures,
    )


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
