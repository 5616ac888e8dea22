"""Study ``batch-coupling``: cross-example dependence of every normalization, in train and eval mode.

For a batch of ``batch_size`` test examples, :func:`normlab.probes.batch_dependence` measures
``coupling = mean_i mean_{j != i} ||d f(x_i)/d x_j||_F / ||d f(x_i)/d x_i||_F`` (Jacobian blocks of the
model's outputs w.r.t. its inputs), at initialization and, when ``train_steps > 0``, after that many SGD
steps (a trainer callback at the last step; stored as ``probe/batch_dependence/coupling/<mode>``).
The expectation comes from the layers, independently of the probe: a model is *expected* to couple
examples in train mode exactly when it contains a layer that normalizes with batch statistics
(:func:`normlab.layers.kinds.has_batch_stats`), and no model couples them in eval mode (Ioffe & Szegedy
2015 Sec. 3; Wu & He 2018 Sec. 3). The claim holds when the measured couplings match that expectation
(coupled: above the recipe's ``margin``, a coupling ratio, default ``1e-6``: the Jacobian blocks are exact,
deterministic computations, so the margin separates float rounding from a real dependence).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from normlab.studies._grid import base_fields
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

PARAMS = {
    "model": str,
    "width": (int, float),
    "depth": int,
    "dataset": str,
    "subset": int,
    "norms": (str, list),
    "batch_size": int,
    "train_steps": int,
    "num_examples": int,
}

COUPLED = 1e-6
METRIC = "probe/batch_dependence/coupling"


class CouplingProbe:
    """Trainer callback: ``batch_dependence`` in train and eval mode on the first ``batch_size`` test
    examples, logged as ``probe/batch_dependence/coupling/<mode>``."""

    def __init__(self, x: torch.Tensor, num_examples: int) -> None:
        self.x, self.num_examples = x, num_examples

    def __call__(self, ctx: Any) -> None:
        for mode, value in measure(ctx.model, self.x, self.num_examples).items():
            ctx.log(f"{METRIC}/{mode}", value)


class CouplingCallbacks:
    """``callbacks_factory`` (picklable): a :class:`CouplingProbe` at the run's last step."""

    def __init__(self, batch_size: int, num_examples: int) -> None:
        self.batch_size, self.num_examples = batch_size, num_examples

    def __call__(self, config: Any) -> list:
        from normlab.train.build import load_data

        x = load_data(config).x_test[: self.batch_size]
        return [(CouplingProbe(x, self.num_examples), config.steps)]


def measure(model: torch.nn.Module, x: torch.Tensor, num_examples: int) -> dict[str, float]:
    """``{"train": coupling, "eval": coupling}`` of ``model`` on batch ``x``."""
    from normlab.probes import batch_dependence

    device = next(model.parameters()).device
    return {
        mode: batch_dependence(model, x.to(device), mode=mode, num_examples=num_examples).coupling
        for mode in ("train", "eval")
    }


def norm_names(spec: str | list[str]) -> list[str]:
    """``"all"`` = every registered norm plus ``nf``; otherwise the given list."""
    from normlab.errors import NormlabError
    from normlab.layers import list_norms

    if spec == "all":
        return [*list_norms(), "nf"]
    if isinstance(spec, str):
        raise NormlabError(f"norms must be 'all' or a list of norm names, got {spec!r}")
    return list(spec)


def run(ctx: StudyContext) -> StudyOutcome:
    from normlab.layers.kinds import has_batch_stats
    from normlab.train import Trainer

    p = ctx.params
    norms = norm_names(p["norms"])
    at_init: dict[str, list[dict[str, float]]] = {n: [] for n in norms}
    expected: dict[str, bool] = {}
    errors: dict[str, str] = {}
    configs, keys = [], []
    for norm in norms:
        for seed in ctx.seeds:
            config = ctx.config(
                **base_fields(p), norm=norm, batch_size=p["batch_size"], steps=max(p["train_steps"], 1),
                seed=seed, epochs=None,
            )
            try:
                trainer = Trainer(config, progress=False)  # builds data + model exactly as training would
            except Exception as exc:  # a norm that cannot be built for this model is reported, not fatal
                errors[norm] = f"{type(exc).__name__}: {exc}"
                break
            expected[norm] = any(has_batch_stats(m) for m in trainer.model.modules())
            x = trainer.data.x_test[: p["batch_size"]]
            at_init[norm].append(measure(trainer.model, x, p["num_examples"]))
            configs.append(config)
            keys.append(norm)
        ctx.progress(f"batch-coupling: {norm} measured at init")

    trained: dict[str, list[dict[str, float]]] = {n: [] for n in norms}
    if p["train_steps"] > 0 and configs:
        results = ctx.train_grid(configs, CouplingCallbacks(p["batch_size"], p["num_examples"]))
        for norm, result in zip(keys, results, strict=True):
            values = {}
            for mode in ("train", "eval"):
                last = ctx.store.latest_metric(result.run_id, f"{METRIC}/{mode}") if result.run_id else None
                values[mode] = last[1] if last is not None else math.nan
            trained[norm].append(values)

    trained_cols = p["train_steps"] > 0
    columns = ["norm", "batch statistics", "train mode, init", "eval mode, init"]
    if trained_cols:
        columns += [f"train mode, {p['train_steps']} steps", f"eval mode, {p['train_steps']} steps"]
    table = Table(
        "Cross-example dependence mean_(j≠i) ||df(x_i)/dx_j|| / ||df(x_i)/dx_i|| (mean ± 95% CI over seeds)",
        columns,
        notes=[
            f"model {p['model']}, batch {p['batch_size']}, first {p['num_examples']} examples measured, "
            f"{len(ctx.seeds)} seeds.",
            "'batch statistics': the model has a layer that normalizes with batch statistics (layer types).",
        ],
    )
    coupling: dict[str, dict[str, float]] = {}
    for norm in norms:
        if norm in errors:
            table.add_row(norm, None, f"not built: {errors[norm]}", *[None] * (len(table.columns) - 3))
            continue
        cells = [mean_ci(v[m] for v in series) for series in (at_init[norm], trained[norm])
                 for m in ("train", "eval")]
        coupling[norm] = {"train": cells[0][0], "eval": cells[1][0]}
        if trained[norm]:
            coupling[norm].update(train_trained=cells[2][0], eval_trained=cells[3][0])
        shown = cells if trained_cols else cells[:2]
        table.add_row(norm, expected[norm], *[_sci(c) if math.isfinite(c[0]) else None for c in shown])
    verdict, agrees, discrepancy = judge(coupling, expected, ctx.margin)
    figure = ctx.save_figure(_plot(coupling), "coupling", "Cross-example dependence per norm at "
                             "initialization, train vs eval mode (log scale; exact zeros drawn at 1e-12).")
    data = {"coupling": coupling, "expected": expected, "errors": errors}
    key_figures = "train-mode coupling: " + ", ".join(
        f"{n} {v['train']:.2g}" for n, v in coupling.items() if math.isfinite(v["train"])
    ) + "; eval-mode max " + (
        f"{max((v['eval'] for v in coupling.values() if math.isfinite(v['eval'])), default=math.nan):.2g}"
    )
    return StudyOutcome([table], [figure], verdict, agrees, discrepancy, data, key_figures)


def judge(
    coupling: dict[str, dict[str, float]], expected: dict[str, bool], margin: float = COUPLED
) -> tuple[str, bool | None, str | None]:
    """Which norms couple examples in train mode (all measured couplings, init and trained) and whether any
    couples them in eval mode, against the expectation from the layer types; a coupling above ``margin``
    couples."""
    if not coupling:
        return "Inconclusive: no norm could be measured.", None, None

    def worst(values: dict[str, float], prefix: str) -> float:
        found = [v for k, v in values.items() if k.startswith(prefix) and math.isfinite(v)]
        return max(found, default=math.nan)

    coupled = sorted(n for n, v in coupling.items() if worst(v, "train") > margin)
    independent = sorted(n for n in coupling if n not in coupled)
    eval_coupled = sorted(n for n, v in coupling.items() if worst(v, "eval") > margin)
    wrong = sorted(n for n in coupling if (n in coupled) != expected[n])
    largest = max(coupled, key=lambda n: coupling[n]["train"]) if coupled else None
    sentence = (
        f"In train mode {len(coupled)} of {len(coupling)} norms couple the examples of a batch "
        f"({', '.join(coupled) or 'none'}"
        + (f"; largest {largest} at {coupling[largest]['train']:.3g}" if largest else "")
        + f") and {', '.join(independent) or 'none'} keep them independent (coupling <= {margin:g}); "
        + (f"in eval mode {', '.join(eval_coupled)} still couple them." if eval_coupled
           else "in eval mode none does.")
    )
    agrees = not wrong and not eval_coupled
    problems = []
    if wrong:
        problems.append("coupling does not follow the use of batch statistics for " + ", ".join(wrong))
    if eval_coupled:
        problems.append("eval mode couples examples for " + ", ".join(eval_coupled))
    return sentence, agrees, ("; ".join(problems) + ".") if problems else None


def _sci(cell: tuple[float, float]) -> tuple[float, float]:
    mean, half = cell
    return float(f"{mean:.3g}"), (float(f"{half:.2g}") if math.isfinite(half) else half)


def _plot(coupling: dict[str, dict[str, float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(coupling)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 2), 3.6))
    xs = range(len(names))
    for offset, mode in ((-0.2, "train"), (0.2, "eval")):
        values = [max(coupling[n][mode], 1e-12) if math.isfinite(coupling[n][mode]) else 1e-12 for n in names]
        ax.bar([x + offset for x in xs], values, width=0.4, label=f"{mode} mode")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=45, ha="right")
    ax.set_ylabel("cross-example / own Jacobian norm")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig
