"""The grid behind ``normlab compare`` and how its results are read: one model under several norms, at
several batch sizes, over a small learning-rate grid and several seeds.

Learning rates follow a scaling rule: a base grid given at ``reference_batch`` is multiplied by
``batch_size / reference_batch`` (linear, for SGD: Goyal et al. 2017) or its square root (for Adam: Malladi
et al. 2022), so every batch size is searched around its own scale (the lr search then brackets it).
``nf`` means the model's normalizer-free variant trained with Adaptive Gradient Clipping (Brock et al.
2021b), the way NF networks are meant to be trained.

Reading (per norm and batch size): an LR is *stable* when no seed diverged, failed or stalled at chance
level (a stalled run did not train: science.md section 8); the *best stable LR* is the stable one with the
highest mean *selection* accuracy -- validation accuracy when the runs hold out a validation split
(``val_fraction``), else test accuracy (then the reported test accuracy is selected on test, and the
report says so); the *largest stable LR* shows how far each norm tolerates large steps (BN's claimed
benefit, Santurkar et al. 2018 Sec. 3; De & Smith 2020). A best LR at the grid's lowest or highest value is
*at the edge*: the optimum is not bracketed (:mod:`normlab.sweep.lr_search` extends the grid until it is).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from normlab.errors import NormlabError
from normlab.train import RunResult, TrainConfig
from normlab.train.budget import STOPPED_BELOW

NF = "nf"


def compare_configs(
    *,
    model: str,
    norms: Sequence[str],
    batch_sizes: Sequence[int],
    seeds: Sequence[int],
    base_lrs: Sequence[float],
    reference_batch: int = 128,
    lr_scaling: str = "linear",
    agc_clip: float = 0.01,
    group: str | None = None,
    **common: Any,
) -> list[TrainConfig]:
    """One :class:`TrainConfig` per (norm, batch size, lr, seed); ``common`` sets the other fields
    (epochs, dataset, width, ...). Epochs (not steps) are equal across batch sizes."""
    for name, values in (("norms", norms), ("batch_sizes", batch_sizes), ("seeds", seeds), ("lrs", base_lrs)):
        if not values:
            raise NormlabError(f"compare needs at least one value in {name}, got none")
    if len(set(norms)) != len(norms):
        raise NormlabError(f"norms repeat: {', '.join(norms)}")
    check_grid(norms, batch_sizes, seeds, base_lrs)
    configs = []
    for norm in norms:
        for batch_size in batch_sizes:
            for base_lr in base_lrs:
                lr = scaled_lr(base_lr, batch_size, reference_batch, lr_scaling)
                for seed in seeds:
                    configs.append(
                        TrainConfig(
                            model=model,
                            norm=norm,
                            agc_clip=agc_clip if norm == NF else None,
                            batch_size=batch_size,
                            lr=lr,
                            seed=seed,
                            group=group,
                            name=run_name(model, norm, batch_size, lr, seed),
                            **common,
                        )
                    )
    return configs


MAX_RUNS = 1_000_000  # a grid's configs are built in memory before anything trains (~2 KB each)
MAX_SEEDS = 10_000  # 3 seeds resolve most of the papers' effects; 10^4 is far past any t-interval's need


def check_seeds(count: int, option: str = "--seeds") -> None:
    """``count`` seeds: a positive int up to ``MAX_SEEDS`` (checked before ``range(count)`` is listed)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise NormlabError(f"{option} must be >= 1, got {count!r}")
    if count > MAX_SEEDS:
        raise NormlabError(f"{option} {count} is more than normlab runs ({MAX_SEEDS} at most)")


def check_grid(norms: Sequence[str], batch_sizes: Sequence[int], seeds: Sequence[int],
               base_lrs: Sequence[float]) -> None:
    """Refuse a grid that cannot train or cannot be held: batch sizes positive ints, lrs positive and
    finite (an lr of 0 never trains, and the lr search multiplies it without end), at most ``MAX_RUNS``."""
    for batch_size in batch_sizes:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise NormlabError(f"--batch-sizes must be positive ints, got {batch_size!r}")
    for lr in base_lrs:
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise NormlabError(f"--lrs must be positive finite numbers, got {lr!r}")
    runs = len(norms) * len(batch_sizes) * len(seeds) * len(base_lrs)
    if runs > MAX_RUNS:
        raise NormlabError(
            f"the grid has {runs:.3g} runs ({len(norms)} norms x {len(batch_sizes)} batch sizes x "
            f"{len(base_lrs)} lrs x {len(seeds)} seeds); normlab builds at most {MAX_RUNS} at once"
        )


def run_name(model: str, norm: str, batch_size: int, lr: float, seed: int) -> str:
    """The name a compare run is stored under (its actual, scaled lr)."""
    return f"{model}/{norm}/bs{batch_size}/lr{lr:.4g}/s{seed}"


LR_SCALINGS = ("linear", "sqrt")


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int, scaling: str = "linear") -> float:
    """``base_lr * (batch_size / reference_batch) ** p``: p = 1 for the linear scaling rule (SGD, Goyal et al.
    2017), p = 1/2 for the square-root rule (Adam, Malladi et al. 2022 "On the SDEs and Scaling Rules for
    Adaptive Gradient Algorithms")."""
    if scaling not in LR_SCALINGS:
        raise NormlabError(f"lr scaling must be one of {', '.join(LR_SCALINGS)}, got {scaling!r}")
    ratio = batch_size / reference_batch
    return base_lr * (ratio if scaling == "linear" else math.sqrt(ratio))


@dataclass
class LrOutcome:
    """The seeds of one (norm, batch size, lr), in seed order: final test accuracies (NaN for diverged/failed
    runs), validation accuracies (NaN without a validation split), run statuses, convergence statuses
    (:mod:`normlab.train.convergence`), steps taken, speed and train/eval gap."""

    lr: float
    accuracies: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    steps_per_s: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    val_accuracies: list[float] = field(default_factory=list)
    convergences: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    histories: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stable(self) -> bool:
        """No seed diverged, failed or stalled at chance level."""
        return all(status == "finished" for status in self.statuses) and not any(
            c in ("stalled", "diverged", "failed") for c in self.convergences
        )

    @property
    def stopped_below(self) -> bool:
        """A probe the lr search stopped early below its bar (:mod:`normlab.sweep.lr_search`): its accuracy
        is where it stopped, not a plateau."""
        return any(r.startswith(STOPPED_BELOW) for r in self.reasons)

    @property
    def converged(self) -> bool:
        return bool(self.convergences) and all(c == "converged" for c in self.convergences)

    @property
    def mean_accuracy(self) -> float:
        return _mean(self.accuracies)

    @property
    def selects_on_validation(self) -> bool:
        return bool(self.val_accuracies) and all(math.isfinite(v) for v in self.val_accuracies)

    @property
    def selection_score(self) -> float:
        """Mean validation accuracy when every seed has one, else mean test accuracy."""
        return _mean(self.val_accuracies) if self.selects_on_validation else self.mean_accuracy

    @property
    def convergence(self) -> str:
        """One word for the seeds: ``converged`` when all did, else the worst status present."""
        for status in ("failed", "diverged", "stalled", "unconverged"):
            if status in self.convergences:
                return status
        return "converged" if self.convergences else "unknown"


@dataclass
class CompareCell:
    """One row of the comparison: a norm at a batch size, its LR grid and the chosen LRs."""

    norm: str
    batch_size: int
    lrs: list[LrOutcome]

    @property
    def best(self) -> LrOutcome | None:
        """The stable LR with the highest mean selection accuracy (validation, else test; ties: the smaller
        LR), or None if none is stable."""
        stable = [o for o in self.lrs if o.stable]
        return max(stable, key=lambda o: (o.selection_score, -o.lr)) if stable else None

    @property
    def largest_stable_lr(self) -> float | None:
        stable = [o.lr for o in self.lrs if o.stable]
        return max(stable) if stable else None

    @property
    def best_edge(self) -> str | None:
        """``"low"`` / ``"high"`` when the best LR is the grid's smallest / largest value (not bracketed),
        else None (also None when no LR is stable)."""
        best = self.best
        if best is None:
            return None
        if best.lr == self.lrs[-1].lr:
            return "high"
        return "low" if best.lr == self.lrs[0].lr else None

    @property
    def top_stable(self) -> bool:
        """The grid's largest LR is stable: the largest stable LR is only a lower bound (">= top of grid")."""
        return bool(self.lrs) and self.lrs[-1].stable

    def largest_stable_text(self) -> str:
        """The largest stable LR in words: ``">= 0.04 (top of grid)"``, ``"0.01"`` or ``"none"``."""
        lr = self.largest_stable_lr
        if lr is None:
            return "none"
        return f">= {lr:.3g} (top of grid)" if self.top_stable else f"{lr:.3g}"

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "norm": self.norm,
            "batch_size": self.batch_size,
            "best_lr": best.lr if best else None,
            "best_lr_at_edge": self.best_edge,
            "largest_stable_lr": self.largest_stable_lr,
            "largest_stable_lr_is_top_of_grid": self.top_stable,
            "accuracies": best.accuracies if best else [],
            "val_accuracies": best.val_accuracies if best else [],
            "lr_chosen_on": ("validation" if best.selects_on_validation else "test") if best else None,
            "convergence": best.convergence if best else None,
            "convergences": best.convergences if best else [],
            "steps": best.steps if best else [],
            "steps_per_s": _mean(best.steps_per_s) if best else math.nan,
            "train_eval_gap": _mean(best.gaps) if best else math.nan,
            "grid": [
                {"lr": o.lr, "statuses": o.statuses, "convergences": o.convergences, "steps": o.steps,
                 "stopped_below_bar": o.stopped_below,
                 "accuracies": o.accuracies, "val_accuracies": o.val_accuracies, "mean": o.mean_accuracy}
                for o in self.lrs
            ],
        }


def summarize_compare(
    results: Iterable[RunResult], histories: dict[int, dict[str, Any]] | None = None
) -> list[CompareCell]:
    """Group results by (norm, batch size) in first-seen order, by lr within each (ascending), and by seed
    within each lr (ascending, so seeds pair across cells). ``histories`` (run id -> metric curves, for the
    report's learning curves) is optional."""
    cells: dict[tuple[str, int], dict[float, LrOutcome]] = {}
    for result in sorted(results, key=lambda r: r.config.get("seed", 0)):
        config = result.config
        key = (config["norm"], config["batch_size"])
        outcome = cells.setdefault(key, {}).setdefault(config["lr"], LrOutcome(lr=config["lr"]))
        finished = result.status == "finished"
        outcome.statuses.append(result.status)
        outcome.accuracies.append(result.final_test_acc if finished else math.nan)
        outcome.val_accuracies.append(result.final_val_acc if finished else math.nan)
        outcome.convergences.append(result.convergence or ("unknown" if finished else result.status))
        outcome.reasons.append(result.convergence_reason or "")
        outcome.steps.append(result.steps)
        outcome.seeds.append(config.get("seed", 0))
        outcome.steps_per_s.append(result.steps_per_s)
        outcome.gaps.append(result.train_eval_gap if finished else math.nan)
        if histories is not None and result.run_id in histories:
            outcome.histories.append(histories[result.run_id])
    return [
        CompareCell(norm=norm, batch_size=bs, lrs=[by_lr[lr] for lr in sorted(by_lr)])
        for (norm, bs), by_lr in cells.items()
    ]


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan
