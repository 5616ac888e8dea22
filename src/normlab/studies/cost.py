"""Study ``cost``: training step time, peak memory and inference time (with and without
:func:`normlab.layers.fold_bn`) for each normalization, as ratios against BN measured in the same run.

Measurement, per seed (fresh model init and random input of ``input_shape``):
- train step: forward, cross-entropy, backward, SGD+momentum step on one batch of ``batch_size``;
- inference: eval-mode forward without autograd on ``inference_batch_size`` examples, as built and after
  ``fold_bn`` (which folds every BN directly after a conv/linear and leaves the others);
- each time is the median of ``repeats`` blocks of ``steps`` iterations after ``warmup`` iterations; the
  norms are interleaved block by block so that machine load drifts affect them alike;
- the clock: on CUDA, wall time between synchronizations; on the CPU, the process's CPU time
  (``time.process_time``), which other processes' load does not inflate (a wall clock on a shared machine
  also counts the time the scheduler gave to them; with one torch thread the CPU time is the quiet wall
  time, with more it is the total work of the step);
- memory: the bytes of the tensors autograd saves for the backward pass (activation memory, distinct
  storages, parameters excluded) plus 3x the parameter bytes (weights, gradients, momentum) — an exact
  count on any device, used on CPU where the allocator reports no peak; on CUDA, the measured
  ``torch.cuda.max_memory_allocated`` over one training step as well.
The ratios and their 95% CIs over seeds are the result, not the times.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.stats import INCONCLUSIVE, UNRESOLVED, WIN
from normlab.studies._verdict import decide_values
from normlab.studies.base import StudyContext, StudyOutcome, Table, mean_ci

#: The default margin of every time comparison: a log ratio of 10% (the recipe sets its own).
LOG_MARGIN = math.log(1.1)

PARAMS = {
    "model": str,
    "width": (int, float),
    "depth": int,
    "input_shape": {"list": int},
    "norms": {"list": str},
    "batch_size": int,
    "inference_batch_size": int,
    "warmup": int,
    "steps": int,
    "repeats": int,
}


def build(p: dict[str, Any], norm: str, device: str) -> nn.Module:
    from normlab.models import create_model

    shape = p["input_shape"]
    return create_model(
        p["model"], norm=norm, num_classes=10, in_channels=shape[0], dims=len(shape) - 1,
        width=p["width"], depth=p["depth"],
    ).to(device)


def activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(saved.values())


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Bench:
    """One norm's model, inputs and the three timed closures."""

    def __init__(self, p: dict[str, Any], norm: str, device: str, seed: int) -> None:
        from normlab.layers import fold_bn
        from normlab.layers.kinds import has_batch_stats

        torch.manual_seed(seed)
        self.device = device
        self.model = build(p, norm, device)
        shape = p["input_shape"]
        self.x = torch.randn(p["batch_size"], *shape, device=device)
        self.y = torch.randint(0, 10, (p["batch_size"],), device=device)
        self.x_inf = torch.randn(p["inference_batch_size"], *shape, device=device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.train_step()  # momentum buffers exist before memory is counted
        self.eval_model = build(p, norm, device)
        self.eval_model.load_state_dict(self.model.state_dict())
        self.eval_model.eval()
        self.bn_before = sum(has_batch_stats(m) for m in self.eval_model.modules())
        try:
            self.folded, self.fold_error = fold_bn(self.eval_model), None
        except NormlabError as exc:  # an fx-untraceable model: inference is timed unfolded, and reported so
            self.folded, self.fold_error = self.eval_model, str(exc)
        self.bn_after = sum(has_batch_stats(m) for m in self.folded.modules())

    def train_step(self) -> None:
        self.model.train()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self) -> None:
        self.eval_model(self.x_inf)

    @torch.no_grad()
    def infer_folded(self) -> None:
        self.folded(self.x_inf)

    def memory(self) -> dict[str, float]:
        activations = activation_bytes(self.model, self.x, self.y)
        out = {
            "activation_mb": activations / 2**20,
            "estimate_mb": (activations + 3 * param_bytes(self.model)) / 2**20,
        }
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.train_step()
            torch.cuda.synchronize()
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def time_block(fn: Callable[[], None], iterations: int, device: str) -> float:
    """Seconds per call of ``fn`` over ``iterations`` calls: CUDA wall time, synchronized at both ends, or
    on the CPU the process's CPU time (module docstring: load from other processes does not count)."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    sync()
    start = clock()
    for _ in range(iterations):
        fn()
    sync()
    return (clock() - start) / iterations


def measure_seed(p: dict[str, Any], norms: list[str], device: str, seed: int) -> dict[str, dict[str, float]]:
    """Median times (s) and memory (MB) of every norm for one seed, with norms interleaved per block."""
    benches = {norm: Bench(p, norm, device, seed) for norm in norms}
    kinds = {"train": "train_step", "infer": "infer", "infer_folded": "infer_folded"}
    samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in norms}
    for bench in benches.values():
        for method in kinds.values():
            time_block(getattr(bench, method), p["warmup"], device)
    for _ in range(p["repeats"]):
        for norm, bench in benches.items():
            for kind, method in kinds.items():
                samples[norm][kind].append(time_block(getattr(bench, method), p["steps"], device))
    out = {}
    for norm, bench in benches.items():
        out[norm] = {k: statistics.median(v) for k, v in samples[norm].items()}
        out[norm].update(bench.memory())
        out[norm]["bn_folded"] = bench.bn_before - bench.bn_after
        out[norm]["bn_layers"] = bench.bn_before
        out[norm]["fold_error"] = bench.fold_error
    return out


def run(ctx: StudyContext) -> StudyOutcome:
    ctx.builtin_models_only("times the norms on its own models")
    p = ctx.params
    norms = list(p["norms"])
    if "bn" not in norms:
        norms.insert(0, "bn")  # every ratio is against BN measured in the same run
    per_seed = []
    for seed in ctx.seeds:
        per_seed.append(measure_seed(p, norms, ctx.device, seed))
        ctx.progress(f"cost: seed {seed} measured")

    def ratio(norm: str, kind: str, base: str = "infer") -> tuple[float, float]:
        return mean_ci(s[norm][kind] / s["bn"][base if kind.startswith("infer") else kind] for s in per_seed)

    def ms(norm: str, kind: str) -> tuple[float, float]:
        mean, half = mean_ci(1e3 * s[norm][kind] for s in per_seed)
        return round(mean, 3), round(half, 3)

    cuda = ctx.device.startswith("cuda")
    columns = ["norm", "train step (ms)", "train ÷ BN", "inference (ms)", "inference ÷ BN",
               "folded inference ÷ BN", "BN layers folded", "activation memory (MB)", "memory ÷ BN"]
    if cuda:
        columns.append("CUDA peak (MB)")
    table = Table(
        f"Cost per norm on {ctx.device} (mean ± 95% CI over {len(ctx.seeds)} seeds; ratios vs BN, same run)",
        columns,
        notes=[
            f"{p['model']} depth {p['depth']} width {p['width']}, input {tuple(p['input_shape'])}, "
            f"train batch {p['batch_size']}, inference batch {p['inference_batch_size']}; median of "
            f"{p['repeats']} blocks of {p['steps']} iterations after {p['warmup']} warm-up, interleaved.",
            "'folded inference ÷ BN': the model after fold_bn, against BN's unfolded inference.",
            "Activation memory: bytes autograd saves for backward (exact); memory ÷ BN compares activation "
            "+ 3x parameter bytes (weights, gradients, momentum).",
        ],
    )
    ratios: dict[str, dict[str, float]] = {}
    for norm in norms:
        r_train, r_inf, r_fold = ratio(norm, "train"), ratio(norm, "infer"), ratio(norm, "infer_folded")
        r_mem = mean_ci(s[norm]["estimate_mb"] / s["bn"]["estimate_mb"] for s in per_seed)
        ratios[norm] = {"train": r_train, "infer": r_inf, "infer_folded": r_fold, "memory": r_mem}
        folded = per_seed[0][norm]
        row = [
            norm, ms(norm, "train"), _r(r_train), ms(norm, "infer"), _r(r_inf), _r(r_fold),
            "not traceable" if folded["fold_error"] else f"{folded['bn_folded']}/{folded['bn_layers']}",
            round(mean_ci(s[norm]["activation_mb"] for s in per_seed)[0], 3), _r(r_mem),
        ]
        if cuda:
            row.append(round(mean_ci(s[norm]["cuda_peak_mb"] for s in per_seed)[0], 2))
        table.add_row(*row)
    untraceable = sorted({n for s in per_seed for n, v in s.items() if v["fold_error"]})
    if untraceable:
        table.notes.append(
            f"fold_bn could not trace the model for {', '.join(untraceable)} (timed unfolded): "
            f"{per_seed[0][untraceable[0]]['fold_error']}"
        )
    bn_fold = per_seed[0]["bn"]
    folded = "" if bn_fold["fold_error"] else (
        f"fold_bn folded {bn_fold['bn_folded']} of {bn_fold['bn_layers']} BN layers"
    )
    verdict, agrees, discrepancy = judge(ratios, per_seed, folded, ctx.device, ctx.margin)
    caption = "Training step, inference (unfolded and BN-folded) time and memory, ratio vs BN."
    figure = ctx.save_figure(_plot(ratios), "cost_ratios", caption)
    data = {"ratios": {n: {k: list(v) for k, v in r.items()} for n, r in ratios.items()},
            "per_seed": per_seed}
    folded_text = _ratio_text(ratios["bn"]["infer_folded"])
    key_figures = f"inference vs unfolded BN: BN folded {folded_text}, " + ", ".join(
        f"{n} {_ratio_text(r['infer'])}" for n, r in ratios.items() if n in ("gn", "ln")
    ) + "; per training step: " + ", ".join(
        f"{n} {_ratio_text(r['train'])}" for n, r in ratios.items() if n != "bn"
    ) + ("" if ctx.device.startswith("cuda") else " (not decided on the CPU)")
    return StudyOutcome([table], [figure], verdict, agrees, discrepancy, data, key_figures)


def _ratio_text(cell: tuple[float, float]) -> str:
    mean, half = cell
    return f"{mean:.2f}x" + (f" ± {half:.2f}" if math.isfinite(half) else "")


def judge(
    ratios: dict[str, dict[str, tuple[float, float]]],
    per_seed: list[dict[str, dict[str, float]]],
    folded: str = "",
    device: str = "",
    margin: float = LOG_MARGIN,
) -> tuple[str, bool | None, str | None]:
    """The claim as the papers make it: BN folded vs GN/LN at inference (Ioffe & Szegedy 2015 Sec. 3.1:
    BN becomes a linear map folded into the layer before it), and BN vs GN/LN per training step on an
    accelerator (Wu & He 2018, Brock et al. 2021b Sec. 1: the costs are GPU kernel and memory-bound costs).

    ``ratios[norm][kind] = (mean, half_width)`` over seeds (quoted); ``per_seed[i][norm][kind]`` the seed's
    median times, compared by the shared rule (:func:`normlab.stats.compare_arms`, paired by seed, lower
    is better) on their logarithms against ``margin`` (a log ratio: log(1.1) = 10%). Inference decides on
    any device: agrees when folded BN wins every comparison, disagrees on an equivalence or a reverse
    win, inconclusive when one is unresolved (with its seeds) or has fewer than 3 seeds. The training step
    decides only on CUDA (``device``), by the same rule; on the CPU it is reported as measured and "not
    decidable on this CPU" (no paper claims a CPU training cost), and the verdict is the inference part's.
    """
    per_example = [n for n in ("gn", "ln") if n in ratios]
    if not per_example:
        return "Inconclusive: the study needs gn or ln beside bn.", None, None

    def fmt(cell: tuple[float, float]) -> str:
        mean, half = cell
        return f"{mean:.2f}x" + (f" ± {half:.2f}" if math.isfinite(half) else "")

    def times(norm: str, kind: str) -> list[float]:
        return [math.log(s[norm][kind]) if s[norm][kind] > 0 else math.nan for s in per_seed]

    on_accelerator = device.startswith("cuda")
    train = {n: decide_values("BN", times("bn", "train"), n.upper(), times(n, "train"),
                              higher_is_better=False, margin=margin) for n in per_example}
    fold = {n: decide_values("folded BN", times("bn", "infer_folded"), n.upper(), times(n, "infer"),
                             higher_is_better=False, margin=margin) for n in per_example}
    train_text = ", ".join(f"{n.upper()} {fmt(ratios[n]['train'])}" for n in per_example)
    infer_text = ", ".join(f"{n.upper()} {fmt(ratios[n]['infer'])}" for n in per_example)
    sentence = (
        f"At inference BN folded into its convolutions{f' ({folded})' if folded else ''} takes "
        f"{fmt(ratios['bn']['infer_folded'])} unfolded BN's time against {infer_text}; per training step "
        f"{train_text} BN's time"
    )
    if "nf" in ratios:
        nf = ratios["nf"]
        sentence += f"; NF trains at {fmt(nf['train'])} and infers at {fmt(nf['infer'])} BN's time"
    sentence += f" (log-ratio margin ±{margin:.3g})."
    if not on_accelerator:
        sentence += (f" The training-step part is not decidable on this {device or 'CPU'}: the papers' "
                     "training costs are accelerator costs (--device cuda decides it).")
    verdicts = [*fold.values(), *(train.values() if on_accelerator else ())]
    undecided = [v.reason for v in verdicts if v.word == INCONCLUSIVE]
    undecided += [v.sentence("log time", 100.0, "% (log ratio)") for v in verdicts if v.word == UNRESOLVED]
    if undecided:
        return f"Inconclusive ({undecided[0]}). " + sentence, None, None
    problems, held = [], []
    lost = [n for n, v in fold.items() if not (v.word == WIN and v.winner == "folded BN")]
    if lost:
        figures = ", ".join(f"{n.upper()} {fmt(ratios[n]['infer'])}" for n in lost)
        problems.append(f"folded BN inference ({fmt(ratios['bn']['infer_folded'])}) is not faster than "
                        f"{', '.join(n.upper() for n in lost)}'s ({figures}) beyond the margin")
    else:
        held.append(f"folded BN infers faster than {', '.join(n.upper() for n in fold)}")
    if on_accelerator:
        slower = [n for n, v in train.items() if not (v.word == WIN and v.winner == "BN")]
        if slower:
            figures = ", ".join(f"{n.upper()} {fmt(ratios[n]['train'])}" for n in slower)
            problems.append(f"BN's training step is not faster than {', '.join(n.upper() for n in slower)}'s "
                            f"beyond the margin ({figures} BN's time)")
        else:
            held.append("per training step BN is faster than GN/LN")
    if not problems:
        return sentence, True, None
    discrepancy = "; ".join(problems) + "."
    if held:
        discrepancy += f" The other part holds: {'; '.join(held)}."
    return sentence, False, discrepancy


def _r(cell: tuple[float, float]) -> tuple[float, float]:
    mean, half = cell
    return round(mean, 3), (round(half, 3) if math.isfinite(half) else half)


def _plot(ratios: dict[str, dict[str, tuple[float, float]]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ratios)
    kinds = [("train", "train step"), ("infer", "inference"), ("infer_folded", "inference, BN folded"),
             ("memory", "memory")]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(names) + 2), 3.6))
    width = 0.8 / len(kinds)
    for i, (kind, label) in enumerate(kinds):
        ax.bar([x + (i - 1.5) * width for x in range(len(names))], [ratios[n][kind][0] for n in names],
               yerr=[0.0 if not math.isfinite(ratios[n][kind][1]) else ratios[n][kind][1] for n in names],
               width=width, label=label, capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ratio vs BN")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig
