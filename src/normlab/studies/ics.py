"""Study ``ics``: does BN reduce internal covariate shift? (Santurkar et al. 2018, Sec. 2.2, Fig. 3).

Santurkar, Tsipras, Ilyas, Madry (arXiv 1805.11604) define the ICS of layer i at step t (Definition 2.1) on
the same batch as the change of that layer's gradient caused by the updates of the layers before it:

    G  = grad_{W_i} L(W_1^t, ..., W_k^t)
    G' = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

and report ``||G - G'||_2`` and ``cos(G, G')`` over training for a standard and a BN network, a VGG on
CIFAR-10 and a 25-layer deep linear network (DLN). Their finding: BN does not reduce ICS; the BN nets show
similar or higher ICS, and in the DLN the standard net has almost none while with BN G and G' are almost
uncorrelated.

Protocol: for every network table of the recipe (``[scale.<s>.nets.<name>]``: TrainConfig fields) and every
norm of ``norms``, train with every seed; every ``probe_every`` steps :func:`normlab.probes.ics` measures
both numbers for every layer with a weight (train mode, the trainer's real optimizer step) and logs them as
``probe/ics/l2/<layer>`` and ``probe/ics/cos/<layer>``. The summary averages over probe steps and over
layers 2..k: layer 1 has no earlier layer, so G' = G exactly and it carries no information.

NOTE (DLN loss scale): the trainer's regression loss is the *mean* squared error over the batch and the 10
outputs, the paper's ``||W_k...W_1 x - A x||^2`` summed over its 1000 samples; the gradients differ by a
factor 10^4, so the paper's LR 1e-6 is LR 1e-2 here (the recipes use it).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from normlab.studies._series import ci, mean_curve
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS: dict[str, Any] = {"nets": dict, "norms": {"list": str}, "probe_every": int}

NORM_LABELS = {"none": "standard", "bn": "BN"}
#: "similar or higher": BN's ICS l2 counts as not reduced down to half the standard net's.
L2_RATIO_FLOOR = 0.5
#: cos(G, G') counts as not improved by BN up to this much above the standard net's.
COS_TOLERANCE = 0.05


class ICSProbe:
    """Trainer callback: :func:`normlab.probes.ics` every ``every_n_steps`` steps, logged per layer."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps

    def __call__(self, ctx: Any) -> None:
        from normlab.probes import ics

        result = ics(ctx.model, ctx.optimizer, ctx.batch, ctx.loss_fn, mode="train")
        for position, layer in enumerate(result.l2):
            # The store keeps names, not order; the position says which layer is the first.
            ctx.log(f"probe/ics/position/{layer}", position)
            ctx.log(f"probe/ics/l2/{layer}", result.l2[layer])
            ctx.log(f"probe/ics/cos/{layer}", result.cos[layer])


def callbacks(config: Any = None, *, every: int) -> list:
    """The callbacks of one ICS run (module level so the process pool can pickle it via ``partial``)."""
    return [ICSProbe(every)]


def layer_series(
    metrics: dict[str, list[tuple[int, float]]], kind: str
) -> dict[str, list[tuple[int, float]]]:
    """``{layer: [(step, value)]}`` of ``probe/ics/<kind>/<layer>`` in forward order
    (``probe/ics/position/<layer>``)."""
    prefix = f"probe/ics/{kind}/"
    position = {
        name[len("probe/ics/position/") :]: series[0][1]
        for name, series in metrics.items()
        if name.startswith("probe/ics/position/") and series
    }
    layers = sorted(
        (name[len(prefix) :] for name in metrics if name.startswith(prefix)),
        key=lambda layer: position.get(layer, math.inf),
    )
    return {layer: metrics[prefix + layer] for layer in layers}


def run_ics(series: dict[str, list[tuple[int, float]]]) -> float:
    """Mean over probe steps and over layers 2..k (layer 1's G' equals G by definition)."""
    layers = list(series)[1:] or list(series)
    values = [v for layer in layers for _, v in series[layer] if math.isfinite(v)]
    return math.fsum(values) / len(values) if values else math.nan


def verdict(
    summary: dict[str, dict[str, dict[str, tuple[float, float]]]],
) -> tuple[str, bool | None, str | None]:
    """The verdict from ``summary[net][norm] = {"l2": (mean, hw), "cos": (mean, hw)}``.

    Agrees with the paper when, in every network, BN does not reduce ICS: its l2 is at least
    ``L2_RATIO_FLOOR`` times the standard net's and its cosine at most ``COS_TOLERANCE`` above it.
    """
    parts, failed = [], []
    for net, by_norm in summary.items():
        if "none" not in by_norm or "bn" not in by_norm:
            continue
        std, bn = by_norm["none"], by_norm["bn"]
        if not all(math.isfinite(v) for v in (std["l2"][0], bn["l2"][0], std["cos"][0], bn["cos"][0])):
            parts.append(f"{net}: no finite ICS (a run diverged)")
            continue
        ratio = bn["l2"][0] / std["l2"][0] if std["l2"][0] > 0 else math.inf
        parts.append(
            f"{net}: ICS l2 {ci(bn['l2'])} with BN vs {ci(std['l2'])} standard ({ratio:.3g}x), "
            f"cos(G, G') {ci(bn['cos'])} vs {ci(std['cos'])}"
        )
        if ratio < L2_RATIO_FLOOR:
            failed.append(f"in the {net} BN reduced the ICS l2 to {ratio:.3g}x the standard net's")
        if bn["cos"][0] > std["cos"][0] + COS_TOLERANCE:
            failed.append(f"in the {net} BN raised cos(G, G') from {std['cos'][0]:.3g} to {bn['cos'][0]:.3g}")
    if not parts:
        return "The recipe must train both 'none' and 'bn' to compare ICS.", None, None
    decided = not any("no finite" in p for p in parts)
    sentence = "; ".join(parts) + (
        ": BN does not reduce internal covariate shift."
        if decided and not failed
        else ": BN reduces internal covariate shift here."
        if failed
        else "."
    )
    if not decided:
        return sentence, None, None
    discrepancy = (
        ("Santurkar et al. find BN's ICS similar or higher, but " + "; ".join(failed) + ".")
        if failed
        else None
    )
    return sentence, not failed, discrepancy


def run(ctx: StudyContext) -> StudyOutcome:
    nets = ctx.param("nets", dict)
    norms = ctx.param("norms", list)
    every = ctx.param("probe_every", int)
    grid = [(net, norm, seed) for net in nets for norm in norms for seed in ctx.seeds]
    configs = [
        ctx.config(**{**nets[net], "norm": norm, "seed": seed, "group": f"study/ics/{net}"})
        for net, norm, seed in grid
    ]
    results = ctx.train_grid(configs, callbacks_factory=functools.partial(callbacks, every=every))

    per_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (net, norm, _seed), result in zip(grid, results, strict=True):
        record: dict[str, Any] = {
            "status": result.status,
            "l2": math.nan,
            "cos": math.nan,
            "final": _final(result),
            "series": {},
        }
        if result.run_id is not None and result.status == "finished":
            names = ctx.store.metric_names(result.run_id)
            metrics = {n: ctx.metrics(result.run_id, n) for n in names if n.startswith("probe/ics/")}
            l2, cos = layer_series(metrics, "l2"), layer_series(metrics, "cos")
            record.update(l2=run_ics(l2), cos=run_ics(cos), series={"l2": l2, "cos": cos})
        per_run.setdefault((net, norm), []).append(record)

    summary = {
        net: {
            norm: {
                "l2": mean_ci(r["l2"] for r in per_run[(net, norm)]),
                "cos": mean_ci(r["cos"] for r in per_run[(net, norm)]),
            }
            for norm in norms
        }
        for net in nets
    }
    sentence, agrees, discrepancy = verdict(summary)
    table = Table(
        "Internal covariate shift (Santurkar et al. 2018, Def. 2.1), mean over training and layers 2..k",
        ["network", "norm", "ICS l2 ||G - G'||", "cos(G, G')", "final metric", "runs finished"],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds; probe every {every} steps, train mode.",
            "final metric: test accuracy (classification) or test MSE (DLN regression).",
        ],
    )
    for net in nets:
        for norm in norms:
            runs = per_run[(net, norm)]
            table.add_row(
                net,
                NORM_LABELS.get(norm, norm),
                summary[net][norm]["l2"],
                summary[net][norm]["cos"],
                mean_ci(r["final"] for r in runs),
                f"{sum(r['status'] == 'finished' for r in runs)}/{len(runs)}",
            )
    figures = [_figure(ctx, net, norms, per_run) for net in nets]
    data = {
        f"{net}/{norm}": [{k: v for k, v in r.items() if k != "series"} for r in per_run[(net, norm)]]
        for net in nets
        for norm in norms
    }
    return StudyOutcome(
        tables=[table],
        figures=figures,
        verdict=sentence,
        agrees_with_paper=agrees,
        discrepancy=discrepancy,
        data=data,
    )


def _final(result: Any) -> float:
    acc = result.final_test_acc
    return acc if math.isfinite(acc) else result.final_test_loss


def _figure(ctx: StudyContext, net: str, norms: list[str], per_run: dict) -> Any:
    """Santurkar Fig. 3: l2 and cosine over training for a middle and the last layer, standard vs BN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    for norm in norms:
        runs = [r for r in per_run[(net, norm)] if r["series"]]
        if not runs:
            continue
        layers = list(runs[0]["series"]["l2"])
        picks = [layers[len(layers) // 2], layers[-1]] if layers else []
        for col, layer in enumerate(picks):
            for row, kind in enumerate(("l2", "cos")):
                curves = [r["series"][kind].get(layer, []) for r in runs]
                steps, mean = mean_curve(curves)
                axes[row][col].plot(steps, mean, label=NORM_LABELS.get(norm, norm))
                axes[row][col].set_title(
                    f"{net} layer {layer}: " + ("||G - G'||_2" if kind == "l2" else "cos(G, G')"), fontsize=9
                )
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0][0].set_yscale("log")
    axes[0][1].set_yscale("log")
    fig.tight_layout()
    return ctx.save_figure(
        fig,
        f"ics_{net}",
        f"{net}: internal covariate shift over training, standard vs BN "
        "(Santurkar et al. 2018, Fig. 3); mean over seeds.",
    )
