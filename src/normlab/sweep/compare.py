"""The grid behind ``normlab compare`` and how its results are read: one model under several norms, at
several batch sizes, over a small learning-rate grid and several seeds.

Learning rates follow the linear scaling rule (Goyal et al. 2017): a base grid given at
``reference_batch`` is multiplied by ``batch_size / reference_batch``, so every batch size is searched
around its own scale. ``nf`` means the model's normalizer-free variant trained with Adaptive Gradient
Clipping (Brock et al. 2021b), the way NF networks are meant to be trained.

Reading (per norm and batch size): an LR is *stable* when no seed diverged (and none failed); the *best
stable LR* is the stable one with the highest mean final test accuracy; the *largest stable LR* shows how
far each norm tolerates large steps (BN's claimed benefit, Santurkar et al. 2018 Sec. 3; De & Smith 2020).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from normlab.errors import NormlabError
from normlab.train import RunResult, TrainConfig

NF = "nf"


def compare_configs(
    *,
    model: str,
    norms: Sequence[str],
    batch_sizes: Sequence[int],
    seeds: Sequence[int],
    base_lrs: Sequence[float],
    reference_batch: int = 128,
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
    configs = []
    for norm in norms:
        for batch_size in batch_sizes:
            for base_lr in base_lrs:
                for seed in seeds:
                    configs.append(
                        TrainConfig(
                            model=model,
                            norm=norm,
                            agc_clip=agc_clip if norm == NF else None,
                            batch_size=batch_size,
                            lr=scaled_lr(base_lr, batch_size, reference_batch),
                            seed=seed,
                            group=group,
                            name=f"{model}/{norm}/bs{batch_size}/lr{base_lr:g}/s{seed}",
                            **common,
                        )
                    )
    return configs


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int) -> float:
    """Linear scaling rule: ``base_lr * batch_size / reference_batch``."""
    return base_lr * batch_size / reference_batch


@dataclass
class LrOutcome:
    """The seeds of one (norm, batch size, lr): final test accuracies (NaN for diverged/failed runs)."""

    lr: float
    accuracies: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    steps_per_s: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    @property
    def stable(self) -> bool:
        return all(status == "finished" for status in self.statuses)

    @property
    def mean_accuracy(self) -> float:
        return _mean(self.accuracies)


@dataclass
class CompareCell:
    """One row of the comparison: a norm at a batch size, its LR grid and the chosen LRs."""

    norm: str
    batch_size: int
    lrs: list[LrOutcome]

    @property
    def best(self) -> LrOutcome | None:
        """The stable LR with the highest mean accuracy (ties: the smaller LR), or None if none is stable."""
        stable = [o for o in self.lrs if o.stable]
        return max(stable, key=lambda o: (o.mean_accuracy, -o.lr)) if stable else None

    @property
    def largest_stable_lr(self) -> float | None:
        stable = [o.lr for o in self.lrs if o.stable]
        return max(stable) if stable else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "norm": self.norm,
            "batch_size": self.batch_size,
            "best_lr": best.lr if best else None,
            "largest_stable_lr": self.largest_stable_lr,
            "accuracies": best.accuracies if best else [],
            "steps_per_s": _mean(best.steps_per_s) if best else math.nan,
            "train_eval_gap": _mean(best.gaps) if best else math.nan,
            "grid": [
                {"lr": o.lr, "statuses": o.statuses, "accuracies": o.accuracies, "mean": o.mean_accuracy}
                for o in self.lrs
            ],
        }


def summarize_compare(results: Iterable[RunResult]) -> list[CompareCell]:
    """Group results by (norm, batch size) in first-seen order, and by lr within each (ascending)."""
    cells: dict[tuple[str, int], dict[float, LrOutcome]] = {}
    for result in results:
        config = result.config
        key = (config["norm"], config["batch_size"])
        outcome = cells.setdefault(key, {}).setdefault(config["lr"], LrOutcome(lr=config["lr"]))
        finished = result.status == "finished"
        outcome.statuses.append(result.status)
        outcome.accuracies.append(result.final_test_acc if finished else math.nan)
        outcome.steps_per_s.append(result.steps_per_s)
        outcome.gaps.append(result.train_eval_gap if finished else math.nan)
    return [
        CompareCell(norm=norm, batch_size=bs, lrs=[by_lr[lr] for lr in sorted(by_lr)])
        for (norm, bs), by_lr in cells.items()
    ]


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan
