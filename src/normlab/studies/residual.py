"""Study ``residual``: BN biases residual blocks toward the identity (De & Smith 2020).

De & Smith (arXiv 2002.10444, Sec. 2-3) show that in a normalized ResNet at initialization the skip path's
variance grows with the block index while BN keeps every residual branch at unit scale, so the branch is
downscaled relative to the skip path by a factor of order sqrt(depth): the network starts close to the
identity, which is what makes deep ResNets trainable. SkipInit (a learnable scalar initialized to 0 at the
end of every branch) reproduces the effect without normalization.

Protocol:

1. At initialization, for every depth and variant (``bn``; ``none``: plain pre-activation ReLU ResNet, He
   init; ``skipinit``: no norm, ``SkipInit(0)`` on every branch), :func:`normlab.probes.residual_scale` on
   ``probe_batch`` training examples in train mode gives, per block, ``ratio = std(branch contribution)
   / std(skip path)``. The study reports the last block's ratio against depth and the least-squares slope
   of ``log(ratio)`` on ``log(depth)`` per seed: De & Smith predict about -0.5 for BN (the skip variance of
   the final stage grows linearly in its number of blocks, (depth - 2) / 6), about 0 without
   normalization (every branch is as large as its input), and SkipInit's branches are exactly 0.
2. Training curves: the ``[train]`` table (TrainConfig fields) trained once per variant and seed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from normlab.stats import INCONCLUSIVE, UNRESOLVED, WIN
from normlab.studies._series import ci, mean_curve
from normlab.studies._verdict import decide_values, inconclusive_text, training_gate, untrained_clause
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS: dict[str, Any] = {
    "model": str,
    "depths": {"list": int},
    "width": float,
    "variants": {"list": str},
    "dataset": str,
    "probe_batch": int,
    "train": dict,
}

LABELS = {"bn": "BN", "none": "no norm", "skipinit": "SkipInit"}
#: De & Smith: branch/skip ratio ~ depth^-1/2 for BN; accepted window for the fitted exponent.
SLOPE_WINDOW = (-0.75, -0.25)
#: The default margin of the branch/skip comparison: a log ratio of 10% (the recipe sets its own).
LOG_MARGIN = math.log(1.1)


def variant_options(variant: str) -> dict[str, Any]:
    """``norm`` and ``model_options`` of a variant: ``skipinit`` is the unnormalized net with SkipInit(0)."""
    if variant == "skipinit":
        return {"norm": "none", "model_options": {"skipinit": True}}
    return {"norm": variant, "model_options": {}}


def branch_ratios(
    model_name: str, variant: str, depth: int, width: float, dataset: Any, batch: int, seed: int
) -> list[float]:
    """Per-block ``std(branch) / std(skip)`` of a fresh model (seed ``seed``) on ``batch`` training inputs."""
    from normlab.models import create_model
    from normlab.probes import residual_scale

    options = variant_options(variant)
    torch.manual_seed(seed)
    model = create_model(
        model_name,
        norm=options["norm"],
        depth=depth,
        width=width,
        num_classes=max(dataset.num_classes, 1),
        in_channels=dataset.in_channels,
        dims=dataset.dims,
        **options["model_options"],
    )
    return list(residual_scale(model, dataset.x_train[:batch], mode="train").ratio.values())


def log_slope(depths: list[int], ratios: list[float]) -> float:
    """Least-squares slope of ``log(ratio)`` on ``log(depth)``; NaN if any ratio is not positive."""
    if len(depths) < 2 or any(not (r > 0 and math.isfinite(r)) for r in ratios):
        return math.nan
    xs, ys = [math.log(d) for d in depths], [math.log(r) for r in ratios]
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def verdict(
    depths: list[int],
    last: dict[str, dict[int, tuple[float, float]]],
    slope: dict[str, tuple[float, float]],
    acc: dict[str, tuple[float, float]],
    diverged: dict[str, str] | None = None,
) -> tuple[str, bool | None, str | None]:
    """The verdict from the last-block ratios, the fitted exponents and the trained accuracies (with
    ``diverged[variant]`` = e.g. ``"2/3"`` runs diverged, quoted where nonzero).

    The sentence only (agreement: :func:`judge`); returns ``(sentence, None, None)``.
    """
    if "bn" not in last:
        return "The recipe must include the variant 'bn' to test the downscaling claim.", None, None
    lo, hi = depths[0], depths[-1]
    parts = [
        f"With BN the last block's branch/skip std ratio falls from {ci(last['bn'][lo])} at depth {lo} "
        f"to {ci(last['bn'][hi])} at depth {hi} (fitted exponent {ci(slope['bn'])}; De & Smith predict "
        "about -0.5)"
    ]
    if "none" in last:
        parts.append(
            f"without normalization it is {ci(last['none'][hi])} at depth {hi} (exponent {ci(slope['none'])})"
        )
    if "skipinit" in last:
        parts.append(f"SkipInit's is {ci(last['skipinit'][hi])}")
    if acc:
        parts.append(
            "trained: "
            + ", ".join(f"{LABELS.get(v, v)} {ci(a)}%{_diverged(diverged, v)}" for v, a in acc.items())
            + " test accuracy"
        )
    return "; ".join(parts) + ".", None, None


def judge(
    depths: list[int],
    ratios: dict[str, dict[int, list[list[float]]]],
    runs: dict[str, list[Any]],
    margin: float = LOG_MARGIN,
) -> tuple[str, bool | None, str | None, str]:
    """Agreement with De & Smith from the per-seed measurements: ``(sentence, agrees, discrepancy, key
    figures)``.

    - BN's fitted exponent (one per seed): its 95% interval must reach the window ``SLOPE_WINDOW`` around
      -1/2 (an interval wholly outside it disagrees);
    - at the deepest depth the unnormalized net's last-block branch/skip ratio beats BN's by the shared rule
      (:func:`normlab.stats.compare_arms`, paired by seed) on a log scale against ``margin`` (a log ratio);
      an equivalence or a BN win disagrees, an unresolved comparison is inconclusive with its seeds;
    - the trained arms the claim ranks train: every run of BN and SkipInit converged (else inconclusive at
      this scale). The unnormalized arm is De & Smith's counterexample (deep unnormalized ResNets without
      SkipInit are unstable at such learning rates, as their experiments show): a run of it that stalls
      or does not converge is reported beside the verdict, not a reason to withhold it (no comparison
      uses its accuracy).
    """
    from normlab.stats import mean_ci as interval

    if "bn" not in ratios:
        return "", None, None, ""
    hi = depths[-1]
    seeds = range(len(ratios["bn"][hi]))
    slopes = [log_slope(depths, [ratios["bn"][d][i][-1] for d in depths]) for i in seeds]
    mean, half = interval(slopes)
    key = f"BN exponent {ci((mean, half))} (paper -0.5)"
    sentences, failed = [], []
    if not math.isfinite(mean):
        return "", None, None, key
    half = half if math.isfinite(half) else 0.0
    if mean + half < SLOPE_WINDOW[0] or mean - half > SLOPE_WINDOW[1]:
        failed.append(f"BN's fitted exponent {ci((mean, half))} lies outside [{SLOPE_WINDOW[0]}, "
                      f"{SLOPE_WINDOW[1]}]")
    undecided = []
    if "none" in ratios:
        none_hi, bn_hi = [r[-1] for r in ratios["none"][hi]], [r[-1] for r in ratios["bn"][hi]]
        found = decide_values("no norm", [_log(r) for r in none_hi], "BN", [_log(r) for r in bn_hi],
                              margin=margin)
        sentences.append(found.sentence(f"log branch/skip ratio at depth {hi}", 1.0, ""))
        key += f"; depth {hi} ratio none {ci(mean_ci(r[-1] for r in ratios['none'][hi]))} vs BN " \
               f"{ci(mean_ci(r[-1] for r in ratios['bn'][hi]))}"
        if found.word == INCONCLUSIVE:
            undecided.append(found.reason)
        elif found.word == UNRESOLVED:
            undecided.append(found.sentence(f"log branch/skip ratio at depth {hi}", 1.0, ""))
        elif not (found.word == WIN and found.winner == "no norm"):
            failed.append(f"at depth {hi} the unnormalized net's branch ratio is not above BN's beyond the "
                          "seeds' spread")
    # The arms the claim ranks must have converged: the sentence quotes their accuracies (science.md
    # section 8). The unnormalized arm's training is reported, not gated (docstring).
    gate = training_gate({LABELS.get(v, v): rs for v, rs in runs.items() if v != "none"})
    if gate:
        undecided.append(gate)
    reference = untrained_clause(LABELS["none"], runs["none"]) if "none" in runs else None
    if reference:
        sentences.append(f"Unnormalized, without SkipInit: {reference}; the instability SkipInit removes, "
                         "not gated (no comparison uses its accuracy).")
    sentence = " ".join(sentences)
    if undecided:
        settle = found.settle if "none" in ratios and found.word == UNRESOLVED else None
        return inconclusive_text(undecided, key, settle), None, None, key
    discrepancy = (
        ("De & Smith predict an order-sqrt(depth) downscaling by BN, but " + "; ".join(failed) + ".")
        if failed
        else None
    )
    return sentence, not failed, discrepancy, key


def run(ctx: StudyContext) -> StudyOutcome:
    ctx.builtin_models_only("sweeps the depth of its own ResNets")
    from normlab.data import load_dataset

    model_name = ctx.param("model", str)
    depths = sorted(ctx.param("depths", list))
    variants = ctx.param("variants", list)
    width = float(ctx.param("width", (int, float)))
    batch = ctx.param("probe_batch", int)
    dataset = load_dataset(ctx.param("dataset", str), download=bool(ctx.params.get("download", False)))

    ratios: dict[str, dict[int, list[list[float]]]] = {v: {d: [] for d in depths} for v in variants}
    for variant in variants:
        ctx.progress(f"residual: branch scale at init, {variant}")
        for depth in depths:
            for seed in ctx.seeds:
                ratios[variant][depth].append(
                    branch_ratios(model_name, variant, depth, width, dataset, batch, seed)
                )
    last = {v: {d: mean_ci(r[-1] for r in ratios[v][d]) for d in depths} for v in variants}
    mean_block = {
        v: {d: mean_ci(math.fsum(r) / len(r) for r in ratios[v][d]) for d in depths} for v in variants
    }
    slope = {
        v: mean_ci(log_slope(depths, [ratios[v][d][i][-1] for d in depths]) for i in range(len(ctx.seeds)))
        for v in variants
    }

    train = ctx.param("train", dict)
    grid = [(v, s) for v in variants for s in ctx.seeds]
    configs = [
        ctx.config(**{**train, **variant_options(v), "seed": s, "group": "study/residual"}) for v, s in grid
    ]
    results = ctx.train_grid(configs)
    by_variant: dict[str, list[Any]] = {}
    for (variant, _), result in zip(grid, results, strict=True):
        by_variant.setdefault(variant, []).append(result)
    acc = {v: mean_ci(100.0 * r.final_test_acc for r in rs) for v, rs in by_variant.items()}

    diverged = {v: f"{sum(r.status == 'diverged' for r in rs)}/{len(rs)}" for v, rs in by_variant.items()}
    sentence, _, _ = verdict(depths, last, slope, acc, diverged)
    extra, agrees, discrepancy, key_figures = judge(depths, ratios, by_variant, ctx.margin)
    sentence = (extra + " " + sentence).strip() if extra.startswith("Inconclusive") else f"{sentence} {extra}"
    init_table = Table(
        "Residual branch scale at initialization: std(branch contribution) / std(skip path)",
        ["variant", "depth", "last block", "mean over blocks", "fitted exponent (log ratio vs log depth)"],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds; {batch} training examples, train mode.",
            "De & Smith 2020 predict an exponent of about -0.5 for BN.",
        ],
    )
    for variant in variants:
        for depth in depths:
            init_table.add_row(
                LABELS.get(variant, variant),
                depth,
                last[variant][depth],
                mean_block[variant][depth],
                slope[variant] if depth == depths[-1] else None,
            )
    train_table = Table(
        f"Training: {train.get('model')} depth {train.get('depth')} on {train.get('dataset')}",
        ["variant", "test acc %", "train loss", "converged", "diverged", "failed"],
        notes=[
            f"mean ± 95% CI over {len(ctx.seeds)} seeds; "
            f"lr {train.get('lr')}, batch {train.get('batch_size')}."
        ],
    )
    for variant, rs in by_variant.items():
        train_table.add_row(
            LABELS.get(variant, variant),
            acc[variant],
            mean_ci(r.final_train_loss for r in rs),
            sum(r.convergence == "converged" for r in rs),
            sum(r.status == "diverged" for r in rs),
            sum(r.status == "failed" for r in rs),
        )
    figures = [_scale_figure(ctx, depths, variants, ratios), _curve_figure(ctx, by_variant)]
    data = {
        "ratios": {v: {str(d): ratios[v][d] for d in depths} for v in variants},
        "runs": {v: [r.run_id for r in rs] for v, rs in by_variant.items()},
    }
    return StudyOutcome(
        tables=[init_table, train_table],
        figures=figures,
        verdict=sentence,
        agrees_with_paper=agrees,
        discrepancy=discrepancy,
        data=data,
        key_figures=key_figures,
    )


def _scale_figure(ctx: StudyContext, depths: list[int], variants: list[str], ratios: dict) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_depth, ax_block) = plt.subplots(1, 2, figsize=(11, 3.8))
    for variant in variants:
        label = LABELS.get(variant, variant)
        means = [math.fsum(r[-1] for r in ratios[variant][d]) / len(ratios[variant][d]) for d in depths]
        ax_depth.plot(depths, means, marker="o", label=label)
        deepest = torch.tensor(ratios[variant][depths[-1]], dtype=torch.float64).mean(0)
        ax_block.plot(range(1, len(deepest) + 1), deepest.tolist(), label=label)
    bn_last = (
        [math.fsum(r[-1] for r in ratios["bn"][d]) / len(ratios["bn"][d]) for d in depths]
        if "bn" in ratios
        else []
    )
    if bn_last and all(m > 0 for m in bn_last):
        ref0 = bn_last[0]
        ax_depth.plot(
            depths,
            [ref0 * math.sqrt(depths[0] / d) for d in depths],
            "k--",
            lw=1,
            label="BN reference ∝ depth^-1/2",
        )
    ax_depth.set_xscale("log")
    ax_depth.set_yscale("symlog", linthresh=1e-3)
    ax_depth.set_ylim(bottom=0.0)  # ratios are >= 0; symlog keeps SkipInit's exact 0 on the plot
    ax_depth.set_xlabel("depth")
    ax_depth.set_ylabel("last block: std(branch) / std(skip)")
    ax_block.set_xlabel(f"block (depth {depths[-1]})")
    ax_block.set_ylabel("std(branch) / std(skip)")
    for ax in (ax_depth, ax_block):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig,
        "branch_scale",
        "Residual branch scale at initialization against depth and "
        "block index, mean over seeds (De & Smith 2020, Sec. 2-3).",
    )


def _curve_figure(ctx: StudyContext, by_variant: dict[str, list[Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for variant, rs in by_variant.items():
        for ax, name in ((ax_loss, "train/loss"), (ax_acc, "test/acc")):
            curves = [
                ctx.metrics(r.run_id, name) for r in rs if r.run_id is not None and r.status == "finished"
            ]
            steps, mean = mean_curve(curves)
            if steps:
                ax.plot(steps, mean, label=LABELS.get(variant, variant))
    ax_loss.set_yscale("log")
    for ax, name in ((ax_loss, "training loss"), (ax_acc, "test accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ctx.save_figure(
        fig, "training_curves", "Training loss and test accuracy, mean over finished seeds."
    )


def _diverged(diverged: dict[str, str] | None, variant: str) -> str:
    count = (diverged or {}).get(variant, "0/")
    return "" if count.startswith("0/") else f" ({count} runs diverged)"


def _log(value: float) -> float:
    return math.log(value) if value > 0 and math.isfinite(value) else math.nan
