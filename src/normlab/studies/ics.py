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
``probe/ics/l2/<layer>`` and ``probe/ics/cos/<layer>``. The probe runs after step t and measures step t + 1
as the definition has it: on the batch of step t + 1 (``ctx.next_batch()``, which the run then trains on),
from the weights that step starts at; measuring on the batch just used (a second step on it) is not the
definition. The summary averages over probe steps and over
layers 2..k: layer 1 has no earlier layer, so G' = G exactly and it carries no information.

NOTE (DLN loss scale): the trainer's regression loss is the *mean* squared error over the batch and the 10
outputs, the paper's ``||W_k...W_1 x - A x||^2`` summed over its 1000 samples; the gradients differ by a
factor 10^4, so the paper's LR 1e-6 is LR 1e-2 here (the recipes use it).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from normlab.stats import INCONCLUSIVE, WIN, compare_arms
from normlab.studies._santurkar import longer_budget
from normlab.studies._series import ci, mean_curve
from normlab.studies._verdict import SETTLE, inconclusive_text, settle_text
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS: dict[str, Any] = {"nets": dict, "norms": {"list": str}, "probe_every": int}

NORM_LABELS = {"none": "standard", "bn": "BN"}


class ICSProbe:
    """Trainer callback: :func:`normlab.probes.ics` every ``every_n_steps`` steps, logged per layer."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps

    def __call__(self, ctx: Any) -> None:
        from normlab.probes import ics

        # Definition 2.1 at step t + 1: G at the current weights on the batch that step will be taken on,
        # W^{t+2} by its real update. ctx.batch would be a second step on the batch just used.
        result = ics(ctx.model, ctx.optimizer, ctx.next_batch(), ctx.loss_fn, mode="train")
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
    per_run: dict[tuple[str, str], list[dict[str, Any]]], settle: dict[str, dict[str, str]] | None = None,
) -> tuple[str, bool | None, str | None, str]:
    """The verdict from ``per_run[(net, norm)]``: one record per seed with ``l2`` and ``cos`` (ICS averaged
    over training and layers 2..k) and ``convergence`` (the run's status). Returns ``(sentence, agrees,
    discrepancy, key figures)``.

    Per network, BN vs the standard net by the shared rule (:func:`normlab.stats.compare_arms`, paired over
    seeds): the claim ("BN does not reduce ICS") fails when BN has the lower ``||G - G'||`` or the higher
    ``cos(G, G')`` beyond the seeds' spread; it is inconclusive when an arm did not converge or has fewer
    than 3 seeds. ``settle[net]`` (default :data:`SETTLE`) says what would settle that network's comparison.
    """
    nets = sorted({net for net, _ in per_run}, key=list(dict.fromkeys(n for n, _ in per_run)).index)
    parts, failed, undecided, keys, decided, pending = [], [], [], [], [], []
    for net in nets:
        if (net, "none") not in per_run or (net, "bn") not in per_run:
            continue
        std, bn = per_run[(net, "none")], per_run[(net, "bn")]
        found = {}
        for metric, lower_is_less_shift in (("l2", True), ("cos", False)):
            found[metric] = compare_arms(
                "BN", [r[metric] for r in bn], "standard", [r[metric] for r in std],
                statuses_a=[r["convergence"] for r in bn], statuses_b=[r["convergence"] for r in std],
                higher_is_better=not lower_is_less_shift, paired=len(bn) == len(std),
                settle=(settle or {}).get(net, SETTLE),
            )
        l2, cos = found["l2"], found["cos"]
        keys.append(
            f"{net}: ||G-G'|| BN {_fig(bn, 'l2')} vs std {_fig(std, 'l2')}, "
            f"cos BN {_fig(bn, 'cos')} vs std {_fig(std, 'cos')}"
        )
        parts.append(
            f"{net}: {l2.sentence('less ICS (lower ||G - G_prime||)', 1.0, '')} "
            f"{cos.sentence('less ICS (higher cos(G, G_prime))', 1.0, '')}"
        )
        if INCONCLUSIVE not in (l2.word, cos.word):
            decided.append(parts[-1])
        for v, what in ((l2, "||G - G'||"), (cos, "cos(G, G')")):
            if v.word == INCONCLUSIVE:
                undecided.append(f"{net} {what}: {v.reason}")
                pending.append(v)
            elif v.word == WIN and v.winner == "BN":
                failed.append(f"in the {net} BN has less ICS by {what} beyond the seeds' spread")
    if not parts:
        return "The recipe must train both 'none' and 'bn' to compare ICS.", None, None, ""
    sentence = " ".join(parts)
    key = "; ".join(keys)
    if undecided:
        # A network whose arms both converged is still decided: say so beside the inconclusive one.
        text = inconclusive_text(undecided, key, settle_text(pending))
        if decided:
            text += " Decided on converged arms (not the study's verdict): " + " ".join(decided)
        return text, None, None, key
    if failed:
        discrepancy = "Santurkar et al. find BN's ICS similar or higher, but " + "; ".join(failed) + "."
        return sentence + " BN reduces internal covariate shift here.", False, discrepancy, key
    return sentence + " BN does not reduce internal covariate shift.", True, None, key


def _fig(records: list[dict[str, Any]], key: str) -> str:
    return ci(mean_ci(r[key] for r in records))


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
        done = result.status == "finished"
        record: dict[str, Any] = {
            "status": result.status,
            "convergence": result.convergence or ("unconverged" if done else result.status),
            "convergence_reason": result.convergence_reason,
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
    settle = {net: longer_budget({f"nets.{net}.steps": table["steps"]}) for net, table in nets.items()
              if isinstance(table.get("steps"), int)}  # a net on an epochs budget keeps the generic text
    sentence, agrees, discrepancy, key_figures = verdict(per_run, settle)
    table = Table(
        "Internal covariate shift (Santurkar et al. 2018, Def. 2.1), mean over training and layers 2..k",
        ["network", "norm", "ICS l2 ||G - G'||", "cos(G, G')", "final metric", "converged"],
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
                f"{sum(r['convergence'] == 'converged' for r in runs)}/{len(runs)}",
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
        key_figures=key_figures,
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
