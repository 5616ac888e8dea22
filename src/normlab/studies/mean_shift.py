"""Study ``mean-shift``: signal propagation in ReLU ResNets at initialization (Brock, De, Smith 2021a).

Brock et al. (arXiv 2101.08692, Sec. 3 and Fig. 1) explain what BN does at initialization with signal
propagation plots (SPPs): on a batch of unit Gaussian input, at the stem output and every block output,

    avg_sq_mean = mean_C(mean_{N,spatial}(x)^2)      (the mean shift)
    avg_var     = mean_C(var_{N,spatial}(x))
    res_avg_var = mean_C(var_{N,spatial}(branch))    (end of each residual branch)

In an unnormalized ReLU ResNet the ReLUs' positive mean is carried forward by the skip path, so the squared
channel mean grows with depth; BN removes it in every block; an NF-ResNet keeps it small and lets the
variance grow by alpha^2 per block. The mean shift makes the hidden activations of *different* examples
increasingly alike (cross-example cosine similarity near 1), which shows up as prediction collapse: the
network assigns most examples to one class at initialization (Brock et al. 2021a, Sec. 3; De & Smith 2020).

Protocol: for every depth of the recipe and variant (``none``: the plain pre-activation ReLU ResNet, He
init; ``bn``; ``nf``: the NF-ResNet of the same layout), build the model with seed ``s`` and measure, in
training mode (BN uses batch statistics, as at the first training step):

- :func:`normlab.probes.signal_propagation` on ``spp_batch`` samples of N(0, 1) in the dataset's input
  shape (Brock/timm use N(0, 1) inputs);
- :func:`normlab.probes.example_similarity` on the first ``similarity_batch`` test examples of the
  dataset: the mean off-diagonal cosine similarity of the last block's output and the share of examples
  in the most-predicted class (prediction collapse).

NOTE: Brock's Fig. 1 NF-ResNet has its skip gains at 1 (the variance grows by alpha^2 per block); the NF
paper trains with gains initialized to 0, which would make every branch vanish at init. The recipe's
``nf_skip_gain_init`` (1.0 by default) sets it. No training is involved: the per-seed numbers are the
study's raw data (``outcome.data``), not store runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from normlab.stats import INCONCLUSIVE, UNRESOLVED, WIN
from normlab.studies._series import ci
from normlab.studies._verdict import decide_values
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

#: The default margin of the three comparisons: a log ratio of 10% (the recipe sets its own).
LOG_MARGIN = math.log(1.1)

PARAMS: dict[str, Any] = {
    "model": str,
    "depths": {"list": int},
    "width": float,
    "variants": {"list": str},
    "dataset": str,
    "spp_batch": int,
    "similarity_batch": int,
    "nf_skip_gain_init": float,
}

VARIANT_LABELS = {"none": "no norm", "bn": "BN", "nf": "NF-ResNet"}


def measure(
    model_name: str,
    variant: str,
    depth: int,
    width: float,
    dataset: Any,
    spp_batch: int,
    similarity_batch: int,
    nf_skip_gain_init: float,
    seed: int,
) -> dict[str, Any]:
    """SPP and cross-example similarity of one freshly initialized model (seed ``seed``), train mode."""
    from normlab.models import create_model
    from normlab.probes import example_similarity, signal_propagation

    options = {"skip_gain_init": nf_skip_gain_init} if variant == "nf" else {}
    torch.manual_seed(seed)
    model = create_model(
        model_name,
        norm=variant,
        depth=depth,
        width=width,
        num_classes=max(dataset.num_classes, 1),
        in_channels=dataset.in_channels,
        dims=dataset.dims,
        **options,
    )
    model.train()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((spp_batch, *dataset.input_shape), generator=generator)
    spp = signal_propagation(model, noise, mode="train")
    sim = example_similarity(model, dataset.x_test[:similarity_batch], mode="train")
    last_block = list(sim.mean_cosine)[-1]
    # A zero-initialized classifier (the NF paper's) gives every example all-zero logits: the argmax is a
    # tie, so prediction collapse is undefined rather than 100%.
    classifier = getattr(model, "classifier", None)
    undefined = isinstance(classifier, torch.nn.Linear) and not classifier.weight.detach().any()
    return {
        "avg_sq_mean": list(spp.avg_sq_mean.values()),
        "avg_var": list(spp.avg_var.values()),
        "res_avg_var": list(spp.res_avg_var.values()),
        "cosine": list(sim.mean_cosine.values()),
        "final_cosine": float(sim.mean_cosine[last_block]),
        "collapse": math.nan if undefined else float(sim.collapse),
    }


def summarize(results: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per variant and depth, ``(mean, half_width)`` over seeds of the last block's ``avg_sq_mean``, the
    mean-shift share ``avg_sq_mean / (avg_sq_mean + avg_var)`` (the part
    of the second moment that is a shared offset), the last block's cross-example cosine similarity and
    the prediction collapse.
    """
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for variant, by_depth in results.items():
        out[variant] = {}
        for depth, runs in by_depth.items():
            last = [r["avg_sq_mean"][-1] for r in runs]
            share = [r["avg_sq_mean"][-1] / (r["avg_sq_mean"][-1] + r["avg_var"][-1]) for r in runs]
            out[variant][depth] = {
                "sq_mean": mean_ci(last),
                "var": mean_ci([r["avg_var"][-1] for r in runs]),
                "share": mean_ci(share),
                "cosine": mean_ci([r["final_cosine"] for r in runs]),
                "collapse": mean_ci([r["collapse"] for r in runs]),
            }
    return out


def verdict(
    summary: dict[str, dict[int, dict[str, Any]]], results: dict[str, dict[int, list[dict[str, Any]]]],
    margin: float = LOG_MARGIN,
) -> tuple[str, bool | None, str | None, str]:
    """The verdict sentence from the summary table and the per-seed ``results``: ``(sentence, agrees,
    discrepancy, key figures)``, agreement with Brock et al. 2021a.

    Three comparisons by the shared rule (:func:`normlab.stats.compare_arms` over the seeds' models; no
    training, so every value is a result): the unnormalized net's last-block ``avg_sq_mean`` is larger at
    the deepest than at the shallowest depth (Welch on its logarithm: it grows multiplicatively), and at
    the deepest depth its mean-shift share and its last-block cross-example cosine are above BN's (paired
    by seed). All three are ratios, compared on a log scale against ``margin`` (a log ratio: log(1.1) =
    10%). Agrees when all three are wins; an equivalence or a reverse win disagrees; an unresolved
    comparison (with the seeds that would resolve it) or fewer than 3 seeds is inconclusive.
    """
    if "none" not in summary or "bn" not in summary:
        return (
            "The recipe must include the variants 'none' and 'bn' to test the mean-shift claim.",
            None,
            None,
            "",
        )
    depths = sorted(summary["none"])
    lo, hi = depths[0], depths[-1]
    none_hi, none_lo, bn_hi = summary["none"][hi], summary["none"][lo], summary["bn"][hi]
    values = [
        none_hi["sq_mean"][0],
        none_lo["sq_mean"][0],
        bn_hi["sq_mean"][0],
        none_hi["cosine"][0],
        bn_hi["cosine"][0],
    ]
    if not all(math.isfinite(v) for v in values):
        return "The measurements are not finite (an activation overflowed), so no verdict.", None, None, ""
    parts = [
        f"At depth {hi} the unnormalized ReLU ResNet's last-block squared channel mean is "
        f"{ci(none_hi['sq_mean'])} (depth {lo}: {ci(none_lo['sq_mean'])}; {ci(none_hi['share'], pct=True)} "
        f"of its second moment), its last-block activations have cross-example cosine similarity "
        f"{ci(none_hi['cosine'])} and {ci(none_hi['collapse'], pct=True)} of examples get the top class",
        f"BN gives {ci(bn_hi['sq_mean'])} ({ci(bn_hi['share'], pct=True)}), cosine {ci(bn_hi['cosine'])} and "
        f"{ci(bn_hi['collapse'], pct=True)}",
    ]
    if "nf" in summary and hi in summary["nf"]:
        nf_hi = summary["nf"][hi]
        parts.append(
            f"NF gives {ci(nf_hi['sq_mean'])} ({ci(nf_hi['share'], pct=True)}), cosine {ci(nf_hi['cosine'])} "
            + (
                f"and {ci(nf_hi['collapse'], pct=True)}"
                if math.isfinite(nf_hi["collapse"][0])
                else "and no top-class share (zero-initialized classifier: every logit ties)"
            )
        )
    def share(r: dict[str, Any]) -> float:
        return r["avg_sq_mean"][-1] / (r["avg_sq_mean"][-1] + r["avg_var"][-1])

    none_runs, bn_runs = results["none"], results["bn"]
    found = {
        # The squared mean grows multiplicatively with depth (one seed can be 1e14): compare its logarithm.
        f"the unnormalized net's mean shift grows from depth {lo} to {hi}": decide_values(
            f"none depth {hi}", [_log(r["avg_sq_mean"][-1]) for r in none_runs[hi]],
            f"none depth {lo}", [_log(r["avg_sq_mean"][-1]) for r in none_runs[lo]], paired=False,
            margin=margin,
        ),
        "the unnormalized net's mean-shift share is above BN's": decide_values(
            "none", [_log(share(r)) for r in none_runs[hi]], "BN", [_log(share(r)) for r in bn_runs[hi]],
            margin=margin,
        ),
        "the unnormalized net's activations are more alike across examples than BN's": decide_values(
            "none", [_log(r["final_cosine"]) for r in none_runs[hi]], "BN",
            [_log(r["final_cosine"]) for r in bn_runs[hi]], margin=margin,
        ),
    }
    if len(depths) == 1:
        found.pop(next(iter(found)))
    sentence = "; ".join(parts) + "."
    key = (
        f"depth {hi}: avg_sq_mean none {ci(none_hi['sq_mean'])} vs BN {ci(bn_hi['sq_mean'])}; cosine none "
        f"{ci(none_hi['cosine'])} vs BN {ci(bn_hi['cosine'])}"
    )
    undecided = [f"{text}: {v.reason}" for text, v in found.items() if v.word == INCONCLUSIVE]
    undecided += [f"{text}: {v.sentence('log ratio', 1.0, '')}" for text, v in found.items()
                  if v.word == UNRESOLVED]
    if undecided:
        return f"Inconclusive ({undecided[0]}). " + sentence, None, None, key
    failed = [f"not shown that {text} ({v.word})" for text, v in found.items()
              if not (v.word == WIN and v.winner == v.a)]
    discrepancy = ("Brock et al. 2021a predict it, but " + "; ".join(failed) + ".") if failed else None
    return sentence, not failed, discrepancy, key


def _log(value: float) -> float:
    return math.log(value) if value > 0 and math.isfinite(value) else math.nan


def run(ctx: StudyContext) -> StudyOutcome:
    ctx.builtin_models_only("sweeps the depth of its own ResNets")
    from normlab.data import load_dataset

    model_name = ctx.param("model", str)
    depths = ctx.param("depths", list)
    variants = ctx.param("variants", list)
    dataset = load_dataset(ctx.param("dataset", str), download=bool(ctx.params.get("download", False)))
    results: dict[str, dict[int, list[dict[str, Any]]]] = {v: {d: [] for d in depths} for v in variants}
    for variant in variants:
        for depth in depths:
            ctx.progress(f"mean-shift: {variant} depth {depth}")
            for seed in ctx.seeds:
                results[variant][depth].append(
                    measure(
                        model_name,
                        variant,
                        depth,
                        float(ctx.param("width", (int, float))),
                        dataset,
                        ctx.param("spp_batch", int),
                        ctx.param("similarity_batch", int),
                        float(ctx.param("nf_skip_gain_init", (int, float))),
                        seed,
                    )
                )
    summary = summarize(results)
    sentence, agrees, discrepancy, key_figures = verdict(summary, results, ctx.margin)
    table = Table(
        "Signal propagation and cross-example similarity at initialization (train mode)",
        [
            "variant",
            "depth",
            "last-block avg_sq_mean",
            "mean-shift share",
            "last-block avg_var",
            "last-block cosine",
            "top-class share",
        ],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds (model init); SPP on N(0, 1) input of "
            f"{ctx.param('spp_batch', int)} samples; similarity on {ctx.param('similarity_batch', int)} "
            "test examples.",
            "mean-shift share = avg_sq_mean / (avg_sq_mean + avg_var) at the last block.",
            "top-class share is nan where the classifier is zero-initialized (NF-ResNet): every logit ties.",
        ],
    )
    for variant in variants:
        for depth in depths:
            s = summary[variant][depth]
            table.add_row(
                VARIANT_LABELS.get(variant, variant),
                depth,
                s["sq_mean"],
                s["share"],
                s["var"],
                s["cosine"],
                s["collapse"],
            )
    figures = [
        _spp_figure(ctx, results, variants, max(depths)),
        _depth_figure(ctx, summary, variants, depths),
    ]
    return StudyOutcome(
        tables=[table],
        figures=figures,
        verdict=sentence,
        agrees_with_paper=agrees,
        discrepancy=discrepancy,
        data={"per_seed": _jsonable_keys(results)},
        key_figures=key_figures,
    )


def _spp_figure(ctx: StudyContext, results: dict, variants: list[str], depth: int) -> Any:
    """Brock et al. 2021a Fig. 1: the three SPP quantities against block index, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for variant in variants:
        runs = results[variant][depth]
        for ax, key in zip(axes, ("avg_sq_mean", "avg_var", "res_avg_var"), strict=True):
            curve = torch.tensor([r[key] for r in runs], dtype=torch.float64).mean(0)
            start = 1 if key == "res_avg_var" else 0  # branches start at block 1, block outputs at the stem
            ax.plot(
                range(start, start + len(curve)),
                curve.tolist(),
                marker="o",
                ms=3,
                label=VARIANT_LABELS.get(variant, variant),
            )
    for ax, title in zip(
        axes,
        (
            "Average squared channel mean",
            "Average channel variance",
            "Residual branch: average channel variance",
        ),
        strict=True,
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("block (0 = stem output)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig,
        "signal_propagation",
        f"Signal propagation plot at initialization, depth {depth}, N(0, 1) input, mean over "
        "seeds (Brock et al. 2021a, Fig. 1).",
    )


def _depth_figure(ctx: StudyContext, summary: dict, variants: list[str], depths: list[int]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normlab.reports.bars import clipped_yerr

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for variant in variants:
        label = VARIANT_LABELS.get(variant, variant)
        for ax, key in zip(axes, ("sq_mean", "cosine", "collapse"), strict=True):
            means = [summary[variant][d][key][0] for d in depths]
            halves = [summary[variant][d][key][1] for d in depths]
            halves = [0.0 if not math.isfinite(h) else h for h in halves]
            # Each metric's range: a squared mean is >= 0 (and drawn on a log axis), a cosine and a share of
            # predictions lie in [-1, 1] and [0, 1].
            bounds = {"sq_mean": (0.0, None), "cosine": (-1.0, 1.0), "collapse": (0.0, 1.0)}[key]
            ax.errorbar(depths, means, yerr=clipped_yerr(means, halves, *bounds), marker="o", ms=4, capsize=3,
                        label=label)
    axes[0].set_yscale("log")
    for ax, title in zip(
        axes,
        (
            "Last-block squared channel mean",
            "Cross-example cosine (last block)",
            "Share of examples in the top class",
        ),
        strict=True,
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("depth")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig,
        "mean_shift_vs_depth",
        "Mean shift, cross-example similarity and prediction collapse at initialization "
        "against depth (mean ± 95% CI over seeds).",
    )


def _jsonable_keys(results: dict) -> dict:
    return {v: {str(d): runs for d, runs in by_depth.items()} for v, by_depth in results.items()}
