"""Study ``ics``: does BN reduce internal covariate shift? (Santurkar et al. 2018, Sec. 2.2, Fig. 3).

Santurkar, Tsipras, Ilyas, Madry (arXiv 1805.11604) define the ICS of layer i at step t (Definition 2.1) on
the same batch as the change of that layer's gradient caused by the updates of the layers before it:

    G  = grad_{W_i} L(W_1^t, ..., W_k^t)
    G' = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

and plot ``||G - G'||_2`` (log axis) and ``cos(G, G')`` over training for a standard and a BN network, a VGG
on CIFAR-10 (LR 0.1 and 0.01) and a 25-layer deep linear network (DLN; LR 1e-6 and 1e-7). Their finding: BN
does not reduce ICS, the BN nets show similar or higher ICS; the DLN headline ("the standard network
experiences almost no ICS; with BN, G and G' are almost uncorrelated") is the 1e-7 row.

Protocol: for every network table of the recipe (``[scale.<s>.nets.<name>]``: TrainConfig fields, plus the
study's ``loss_bands`` and ``paper_layers``) and every norm of ``norms``, train with every seed; the probe
(:func:`normlab.probes.ics`, train mode, the trainer's real optimizer step, on the batch of the step the
run takes next) logs ``probe/ics/{l2, cos, grad}/<layer>`` every ``dense_every`` steps up to step
``dense_until`` and every ``probe_every`` steps after, so that BN, which crosses the upper loss bands in a
few hundred steps, has several probes in each.

What is decided (issue 26; science.md section 2): BN reaches a low loss many times faster, so a whole-run
average sets BN's converged phase (small gradients) against a standard net still learning. The verdict
compares the arms at *matched training loss* (:mod:`normlab.studies._bands`): per run, the mean over layers
2..k (layer 1 has no earlier layer: G' = G) of each band's mean, averaged over the bands. Two numbers, both
scale-free: ``cos(G, G')`` (margin ``cos_margin``) and the relative distance ``||G - G'|| / ||G||``,
compared as logarithms against the log-ratio margin ``distance_margin``. The raw l2 (the paper's axis) is
plotted per layer and tabulated, not decided on: it scales with the gradient. Same-step windows and the
post-convergence phase (smoothed loss below the lowest band) are reported, not decided on.

Arms are gated on the trajectory, not on end-of-run convergence (:func:`normlab.studies._bands.
trajectory_status`): a run that left chance level and did not diverge within its window is a result.

NOTE (DLN loss scale): the trainer's regression loss is the *mean* squared error over the batch and the 10
outputs, the paper's ``||W_k...W_1 x - A x||^2`` summed over its 1000 samples; the gradients differ by a
factor 10^4, so the paper's LR 1e-6 is LR 1e-2 here and 1e-7 is 1e-3 (the recipe runs both).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from normlab.errors import NormlabError
from normlab.stats import INCONCLUSIVE, UNRESOLVED, WIN, Verdict, compare_arms
from normlab.studies import _bands
from normlab.studies._santurkar import longer_budget
from normlab.studies._series import ci, mean_curve
from normlab.studies._verdict import SETTLE
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS: dict[str, Any] = {
    "nets": dict,
    "norms": {"list": str},
    "probe_every": int,
    "dense_every": int,
    "dense_until": int,
    "window": int,
    "chance_fraction": float,
    "cos_margin": float,
    "distance_margin": float,
}

NORM_LABELS = {"none": "standard", "bn": "BN"}
#: Keys of a network table that are the study's, not TrainConfig fields.
NET_KEYS = ("loss_bands", "paper_layers")
KINDS = ("l2", "cos", "grad")


class ICSProbe:
    """Trainer callback: :func:`normlab.probes.ics` at the steps :func:`normlab.studies._bands.probe_due`
    names (every ``every_n_steps`` when ``dense_until`` is 0), logged per layer."""

    def __init__(self, every: int, dense_every: int = 0, dense_until: int = 0) -> None:
        self.every, self.dense_every, self.dense_until = every, dense_every or every, dense_until
        self.every_n_steps = self.dense_every if dense_until else every

    def __call__(self, ctx: Any) -> None:
        from normlab.probes import ics

        if not _bands.probe_due(ctx.step, self.every, self.dense_every, self.dense_until):
            return
        # Definition 2.1 at step t + 1: G at the current weights on the batch that step will be taken on,
        # W^{t+2} by its real update. ctx.batch would be a second step on the batch just used.
        result = ics(ctx.model, ctx.optimizer, ctx.next_batch(), ctx.loss_fn, mode="train")
        for position, layer in enumerate(result.l2):
            # The store keeps names, not order; the position says which layer is the first.
            ctx.log(f"probe/ics/position/{layer}", position)
            ctx.log(f"probe/ics/l2/{layer}", result.l2[layer])
            ctx.log(f"probe/ics/cos/{layer}", result.cos[layer])
            ctx.log(f"probe/ics/grad/{layer}", result.grad_norm[layer])


def callbacks(config: Any = None, *, every: int, dense_every: int = 0, dense_until: int = 0) -> list:
    """The callbacks of one ICS run (module level so the process pool can pickle it via ``partial``)."""
    return [ICSProbe(every, dense_every, dense_until)]


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


def relative_series(l2: dict[str, list], grad: dict[str, list]) -> dict[str, list[tuple[int, float]]]:
    """``||G - G'|| / ||G||`` per layer and probe step (NaN where ``||G|| = 0``)."""
    out = {}
    for layer, series in l2.items():
        norms = dict(grad.get(layer, []))
        out[layer] = [(s, v / norms[s] if norms.get(s, 0.0) > 0 else math.nan) for s, v in series]
    return out


def summarize_run(
    series: dict[str, dict[str, list[tuple[int, float]]]],
    loss: list[tuple[int, float]],
    bands: list[tuple[float, float]],
    window: int,
    steps: int,
) -> dict[str, Any]:
    """A run's numbers from its per-layer ``series[kind]`` (``l2``, ``cos``, ``rel``) and logged training
    ``loss``: per kind, ``<kind>_bands`` (per band, the mean over layers 2..k of the band's mean) and
    ``<kind>`` (their mean: the matched-loss value the verdict compares), ``<kind>_layers`` (per layer, the
    band means), ``<kind>_after`` (the post-convergence phase, below the lowest band), ``<kind>_thirds``
    (same-step windows: the run's three thirds) and ``probes`` (probes per band)."""
    out: dict[str, Any] = {}
    for kind, per_layer in series.items():
        layers = list(per_layer)[1:] or list(per_layer)
        by_layer = {n: _bands.band_means(per_layer[n], loss, bands, window) for n in per_layer}
        out[f"{kind}_layers"] = {n: means for n, (means, _) in by_layer.items()}
        per_band = [_mean(by_layer[n][0][i] for n in layers) for i in range(len(bands))]
        out[f"{kind}_bands"] = per_band
        out[kind] = _bands.matched_mean(per_band)
        flat = [(s, v) for n in layers for s, v in per_layer[n]]
        out[f"{kind}_after"] = _bands.phase_mean(flat, loss, bands[-1][1], window)
        out[f"{kind}_thirds"] = _bands.step_windows(flat, [0, steps // 3, 2 * steps // 3, steps])
        out["probes"] = by_layer[layers[0]][1] if layers else [0] * len(bands)
    return out


def _mean(values: Any) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values and all(math.isfinite(v) for v in values) else math.nan


def compare_net(
    bn: list[dict[str, Any]], std: list[dict[str, Any]], cos_margin: float, distance_margin: float,
    settle: dict[str, str] | None = None,
) -> tuple[Verdict, Verdict]:
    """BN vs the standard net at matched loss: ``(cos, relative distance)`` verdicts by the shared rule,
    paired over seeds. Higher cos and a lower log relative distance are less ICS; statuses are the
    trajectory gate's."""

    def compare(key: str, higher: bool, margin: float, transform: Any) -> Verdict:
        values = [[transform(r[key]) for r in arm] for arm in (bn, std)]
        statuses = [_bands.result_statuses([r["gate"] for r in arm]) for arm in (bn, std)]
        return compare_arms("BN", values[0], "standard", values[1], statuses_a=statuses[0],
                            statuses_b=statuses[1], higher_is_better=higher, paired=len(bn) == len(std),
                            margin=margin, settle=settle or SETTLE)

    return compare("cos", True, cos_margin, float), compare("rel", False, distance_margin, _log)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else math.nan


def verdict(
    per_run: dict[tuple[str, str], list[dict[str, Any]]],
    cos_margin: float = 0.1,
    distance_margin: float = math.log(1.25),
    settle: dict[str, str] | None = None,
) -> tuple[str, bool | None, str | None, str]:
    """The verdict from ``per_run[(net, norm)]``: one record per seed with ``gate`` (the trajectory status),
    ``cos`` and ``rel`` (matched-loss means). Returns ``(sentence, agrees, discrepancy, key figures)``.

    Per network, BN vs the standard net (:func:`compare_net`). The claim ("BN's ICS is similar or higher")
    fails on a network where BN wins on either number (a higher cosine or a lower relative distance, beyond
    its margin); it holds there when the standard net wins or the two are equivalent on both. The study
    disagrees when any network fails; otherwise an unresolved comparison (the seeds that would resolve it
    named) or an arm that did not train within its window makes it inconclusive.
    """
    nets = list(dict.fromkeys(net for net, _ in per_run))
    parts, failed, pending, keys = [], [], [], []
    for net in nets:
        if (net, "none") not in per_run or (net, "bn") not in per_run:
            continue
        bn, std = per_run[(net, "bn")], per_run[(net, "none")]
        cos, rel = compare_net(bn, std, cos_margin, distance_margin, settle)
        keys.append(f"{net}: cos BN {_fig(bn, 'cos')} vs std {_fig(std, 'cos')}, "
                    f"||G-G'||/||G|| BN {_fig(bn, 'rel')} vs std {_fig(std, 'rel')}")
        parts.append(f"{net}: {cos.sentence('cos(G, G_prime) at matched loss', 100.0, ' x 0.01')} "
                     f"{rel.sentence('log relative distance at matched loss (lower)', 100.0, ' x 0.01')}")
        bn_less = [what for v, what in ((cos, "a higher cos(G, G')"), (rel, "a lower ||G - G'|| / ||G||"))
                   if v.word == WIN and v.winner == "BN"]
        if bn_less:
            failed.append(f"in the {net} BN has less ICS at matched training loss ({' and '.join(bn_less)})")
        pending += [(net, v) for v in (cos, rel) if v.word in (INCONCLUSIVE, UNRESOLVED)]
    if not parts:
        return "The recipe must train both 'none' and 'bn' to compare ICS.", None, None, ""
    sentence, key = " ".join(parts), "; ".join(keys)
    if failed:
        discrepancy = ("Santurkar et al. find BN's ICS similar or higher, but " + "; ".join(failed)
                       + " (see the per-band figure).")
        return sentence + " BN reduces internal covariate shift here.", False, discrepancy, key
    if pending:
        why = "; ".join(dict.fromkeys(f"{net}: {v.reason}" for net, v in pending))
        fixes = "; ".join(dict.fromkeys(v.settle for _, v in pending if v.settle)) or SETTLE["unconverged"]
        return (f"Inconclusive at this scale ({why}); to settle it: {fixes}. As measured (not a verdict): "
                f"{sentence}"), None, None, key
    return sentence + " BN does not reduce internal covariate shift.", True, None, key


def _fig(records: list[dict[str, Any]], key: str) -> str:
    return ci(mean_ci(r[key] for r in records))


def _net_fields(ctx: StudyContext, net: str, table: dict[str, Any]) -> tuple[dict, list, list[int]]:
    where = f"{ctx.study.path or ctx.study.name} [scale.{ctx.scale}.nets.{net}]"
    bands = _bands.check_bands(table.get("loss_bands"), where)
    layers = table.get("paper_layers", [])
    if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 1 for i in layers):
        raise NormlabError(f"{where}: paper_layers must be a list of 1-based layer numbers, got {layers!r}")
    return {k: v for k, v in table.items() if k not in NET_KEYS}, bands, layers


def run(ctx: StudyContext) -> StudyOutcome:
    nets = ctx.param("nets", dict)
    norms = ctx.param("norms", list)
    every, dense_every = ctx.param("probe_every", int), ctx.param("dense_every", int)
    dense_until, window = ctx.param("dense_until", int), ctx.param("window", int)
    chance_fraction = float(ctx.param("chance_fraction", (int, float)))
    cos_margin = float(ctx.param("cos_margin", (int, float)))
    distance_margin = float(ctx.param("distance_margin", (int, float)))
    _bands.check_schedule(every, dense_every, f"{ctx.study.path or ctx.study.name} [scale.{ctx.scale}]")
    fields = {net: _net_fields(ctx, net, table) for net, table in nets.items()}
    grid = [(net, norm, seed) for net in nets for norm in norms for seed in ctx.seeds]
    configs = [
        ctx.config(**{**fields[net][0], "norm": norm, "seed": seed, "group": f"study/ics/{net}"})
        for net, norm, seed in grid
    ]
    factory = functools.partial(callbacks, every=every, dense_every=dense_every, dense_until=dense_until)
    results = ctx.train_grid(configs, callbacks_factory=factory)
    first = {net: config for (net, _, _), config in reversed(list(zip(grid, configs, strict=True)))}
    classes = {net: _classes(config) for net, config in first.items()}

    per_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (net, norm, _seed), result, config in zip(grid, results, configs, strict=True):
        bands = fields[net][1]
        record: dict[str, Any] = {"run_id": result.run_id, "status": result.status,
                                  "convergence": result.convergence, "final": _final(result), "series": {}}
        loss = ctx.metrics(result.run_id, "train/loss") if result.run_id is not None else []
        chance = chance_loss(classes[net], loss, window)
        record["gate"] = _bands.trajectory_status(result.status, loss, chance, chance_fraction, window)
        numbers = summarize_run({k: {} for k in ("l2", "cos", "rel")}, loss, bands, window, config.steps)
        if result.run_id is not None and result.status == "finished":
            names = ctx.store.metric_names(result.run_id)
            metrics = {n: ctx.metrics(result.run_id, n) for n in names if n.startswith("probe/ics/")}
            series = {kind: layer_series(metrics, kind) for kind in KINDS}
            series["rel"] = relative_series(series["l2"], series.pop("grad"))
            numbers = summarize_run(series, loss, bands, window, config.steps)
            record["series"] = series
        record.update(numbers)
        per_run.setdefault((net, norm), []).append(record)

    settle = longer_budget({f"nets.{net}.steps": table["steps"] for net, table in nets.items()
                            if isinstance(table.get("steps"), int)})
    sentence, agrees, discrepancy, key_figures = verdict(per_run, cos_margin, distance_margin, settle)
    tables = [_band_table(ctx, nets, norms, fields, per_run, cos_margin, distance_margin),
              _paper_table(nets, norms, fields, per_run)]
    figures = [f for net in nets for f in (_figure(ctx, net, norms, per_run, fields[net][2]),
                                           _band_figure(ctx, net, norms, per_run, fields[net][1]))]
    data = {
        f"{net}/{norm}": [{k: v for k, v in r.items() if k != "series"} for r in per_run[(net, norm)]]
        for net in nets
        for norm in norms
    }
    return StudyOutcome(tables=tables, figures=figures, verdict=sentence, agrees_with_paper=agrees,
                        discrepancy=discrepancy, data=data, key_figures=key_figures)


def chance_loss(classes: int, loss: list[tuple[int, float]], window: int) -> float:
    """The loss at chance level: ln(classes) for classification, else (regression, ``classes`` 0) the run's
    first smoothed loss, where it started."""
    if classes:
        return math.log(classes)
    loss = sorted(loss)
    return _bands.smoothed_loss(loss, loss[0][0] + window - 1, window) if loss else math.nan


def _classes(config: Any) -> int:
    from normlab.train.build import load_data

    return load_data(config).num_classes


def _band_table(ctx, nets, norms, fields, per_run, cos_margin, distance_margin) -> Table:
    table = Table(
        "ICS at matched training loss (Santurkar et al. 2018, Def. 2.1): mean over layers 2..k per band",
        ["network", "norm", "band", "probes", "cos(G, G')", "||G - G'|| / ||G||", "||G - G'|| (raw)",
         "trained"],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds; a probe is filed under the band of its run's "
            f"training loss (mean of the logged batch losses over the {ctx.param('window', int)} steps "
            "before it); 'matched' is the mean of the bands, the number the verdict compares; 'after' the "
            "post-convergence phase (below the lowest band) and 'thirds' the run's same-step windows "
            "(first / middle / last third of the steps), reported and not decided on.",
            f"margins: cos ±{cos_margin:g}; relative distance compared as a log, margin "
            f"±{distance_margin:.3g} (a ratio of {math.exp(distance_margin):.3g}). trained: runs that left "
            "chance level and did not diverge within the window.",
        ],
    )
    for net in nets:
        bands = fields[net][1]
        for norm in norms:
            runs = per_run[(net, norm)]
            trained = f"{sum(r['gate'] == _bands.TRAINED for r in runs)}/{len(runs)}"
            labels = [f"[{hi:g}, {lo:g})" for hi, lo in bands]
            for i, label in enumerate(labels):
                table.add_row(net, NORM_LABELS.get(norm, norm), label, _cell(runs, "probes", i),
                              *(mean_ci(r[f"{k}_bands"][i] for r in runs) for k in ("cos", "rel", "l2")),
                              trained)
            table.add_row(net, NORM_LABELS.get(norm, norm), "matched", "",
                          *(mean_ci(r[k] for r in runs) for k in ("cos", "rel", "l2")), trained)
            table.add_row(net, NORM_LABELS.get(norm, norm), f"after (< {bands[-1][1]:g})", "",
                          *(mean_ci(r[f"{k}_after"] for r in runs) for k in ("cos", "rel", "l2")), trained)
            for i, third in enumerate(("first", "middle", "last")):
                table.add_row(net, NORM_LABELS.get(norm, norm), f"{third} third of steps", "",
                              *(mean_ci(r[f"{k}_thirds"][i] for r in runs) for k in ("cos", "rel", "l2")),
                              trained)
    return table


def _cell(runs: list[dict[str, Any]], key: str, i: int) -> str:
    return "/".join(str(r[key][i]) for r in runs)


def _paper_table(nets, norms, fields, per_run) -> Table:
    """Fig. 3's layers: raw l2 and cos per band, each layer alone (mean over seeds)."""
    table = Table(
        "The layers of Santurkar et al.'s Fig. 3 (VGG #5 and #10, DLN #9 and #17): raw ||G - G'|| and "
        "cos(G, G') per loss band",
        ["network", "norm", "layer", "band", "||G - G'|| (raw)", "cos(G, G')"],
        notes=["mean ± 95% CI over seeds; layer numbers count the layers with a weight from 1 (the input)."],
    )
    for net in nets:
        _, bands, picks = fields[net]
        for norm in norms:
            runs = [r for r in per_run[(net, norm)] if r["series"]]
            if not runs:
                continue
            layers = list(runs[0]["series"]["l2"])
            for number in picks:
                if number > len(layers):
                    continue
                layer = layers[number - 1]
                for i, (hi, lo) in enumerate(bands):
                    table.add_row(net, NORM_LABELS.get(norm, norm), f"#{number} ({layer})",
                                  f"[{hi:g}, {lo:g})",
                                  *(mean_ci(r[f"{k}_layers"][layer][i] for r in runs) for k in ("l2", "cos")))
    return table


def _final(result: Any) -> float:
    acc = result.final_test_acc
    return acc if math.isfinite(acc) else result.final_test_loss


def _figure(ctx: StudyContext, net: str, norms: list[str], per_run: dict, picks: list[int]) -> Any:
    """Santurkar Fig. 3: raw l2 (log axis) and cosine over training for the paper's layers, standard vs BN,
    mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next((r for norm in norms for r in per_run[(net, norm)] if r["series"]), None)
    layers = list(first["series"]["l2"]) if first else []
    chosen = [layers[i - 1] for i in picks if i <= len(layers)] or layers[-1:]
    fig, axes = plt.subplots(2, max(len(chosen), 1), figsize=(5 * max(len(chosen), 1), 6), squeeze=False)
    for norm in norms:
        runs = [r for r in per_run[(net, norm)] if r["series"]]
        for col, layer in enumerate(chosen):
            for row, kind in enumerate(("l2", "cos")):
                steps, mean = mean_curve([r["series"][kind].get(layer, []) for r in runs])
                axes[row][col].plot(steps, mean, label=NORM_LABELS.get(norm, norm))
                number = layers.index(layer) + 1
                axes[row][col].set_title(
                    f"{net} layer #{number} ({layer}): " + ("||G - G'||_2" if kind == "l2" else "cos(G, G')"),
                    fontsize=9)
    for col in range(len(chosen)):
        axes[0][col].set_yscale("log")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig, f"ics_{net}",
        f"{net}: internal covariate shift over training, standard vs BN, the paper's layers (Santurkar et "
        "al. 2018, Fig. 3: raw l2 on a log axis, and the cosine); mean over seeds.")


def _band_figure(ctx: StudyContext, net: str, norms: list[str], per_run: dict, bands: list) -> Any:
    """Per loss band, cos(G, G') and ||G - G'|| / ||G|| by layer for both arms (mean over seeds): where
    in the network the arms differ at matched loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(bands), figsize=(4.2 * len(bands), 6), squeeze=False)
    for i, (hi, lo) in enumerate(bands):
        for norm in norms:
            runs = [r for r in per_run[(net, norm)] if r["series"]]
            if not runs:
                continue
            layers = list(runs[0]["cos_layers"])[1:]
            for row, kind in enumerate(("cos", "rel")):
                values = [_mean_finite(r[f"{kind}_layers"][n][i] for r in runs) for n in layers]
                axes[row][i].plot(range(2, len(layers) + 2), values, "-o", ms=3,
                                  label=NORM_LABELS.get(norm, norm))
        axes[0][i].set_title(f"{net}, training loss in [{hi:g}, {lo:g}): cos(G, G')", fontsize=9)
        axes[1][i].set_title(f"{net}, training loss in [{hi:g}, {lo:g}): ||G - G'|| / ||G||", fontsize=9)
        axes[1][i].set_yscale("log")
    for ax in axes.flat:
        ax.set_xlabel("layer #")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig, f"ics_bands_{net}",
        f"{net}: ICS by layer at matched training loss (one column per loss band), standard vs BN; mean over "
        "seeds. The verdict compares the mean over layers 2..k and bands.")


def _mean_finite(values: Any) -> float:
    values = [v for v in values if math.isfinite(v)]
    return math.fsum(values) / len(values) if values else math.nan
