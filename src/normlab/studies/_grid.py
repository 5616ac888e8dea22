"""Shared pieces of the training-based studies: recipe parameters -> TrainConfig fields, variants, and
per-cell statistics over seeds.

A *variant* is a label in a recipe's ``norms`` / ``variants`` list. Most are a norm name (``bn``, ``gn``...)
and train that norm with its options from the recipe's ``norm_options.<name>`` table. Four are more:
``nf`` = the model's normalizer-free form (Scaled WS) trained with AGC (``agc_clip``); ``nf_noagc`` = the
same normalizer-free form without AGC (Brock et al. 2021b's ablation); ``skipinit`` = the
unnormalized model with a SkipInit scalar (init 0) on every residual branch; ``precise_bn`` = BN training
whose population statistics are recomputed after training (the study does the recomputation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

from normlab.studies.base import mean_ci

# Recipe fields copied into every TrainConfig when present.
# The budget (steps or epochs) comes from budget_fields.
_BASE_FIELDS = ("model", "width", "depth", "dataset", "subset", "weight_decay")


def base_fields(params: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields a recipe's scale table sets for every run."""
    return {k: params[k] for k in _BASE_FIELDS if k in params}


def budget_fields(params: dict[str, Any]) -> dict[str, Any]:
    """The training budget of a grid recipe: ``steps`` (the same number of optimizer steps at every batch
    size) when the scale table sets it, else ``epochs`` (equal epochs give large batches fewer steps); and
    ``budget`` when the table sets it (``"auto"``: :mod:`normlab.train.budget`, the length being the cap), and
    ``warmup_steps`` and ``eval_every`` when it sets them."""
    fields = {"steps": int(params["steps"]), "epochs": None} if params.get("steps") else {
        "epochs": params["epochs"]}
    if params.get("budget"):  # "auto": until the plateau rule holds, steps/epochs being the cap
        fields["budget"] = str(params["budget"])
    if params.get("warmup_steps"):  # linear warmup (unnormalized nets blow up early at a constant lr)
        fields["warmup_steps"] = int(params["warmup_steps"])
    if params.get("eval_every"):  # held-out evaluations, where an auto budget judges its plateau
        fields["eval_every"] = int(params["eval_every"])
    return fields


def budget_text(params: dict[str, Any]) -> str:
    """``"600 steps at every batch size"`` or ``"8 epochs at every batch size"``; with ``budget = "auto"``
    ``"until the plateau rule holds (cap 2000 steps at every batch size)"``."""
    length = f"{params['steps']} steps" if params.get("steps") else f"{params['epochs']} epochs"
    if params.get("budget") == "auto":
        return f"until the plateau rule holds (warmup-stable-decay, cap {length} at every batch size)"
    return f"{length} at every batch size"


def variant_fields(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields of variant ``name`` (see the module docstring)."""
    if name == "nf":
        return {"norm": "nf", "agc_clip": float(params["agc_clip"])}
    if name == "nf_noagc":
        return {"norm": "nf"}
    if name == "skipinit":
        return {"norm": "none", "model_options": {"skipinit": True}}
    if name == "precise_bn":
        name = "bn"
    options = dict(params.get("norm_options", {}).get(name, {}))
    return {"norm": name, "norm_options": options} if options else {"norm": name}


def with_run_length(fields: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """``fields`` with the run's length passed to a norm whose schedule needs it (Batch Renorm's r_max /
    d_max ramps, Ioffe 2017 Sec. 4), only when the layer lists a ``total_steps`` option and the recipe does
    not set it. # after i11a: the renorm layer gains that option; today's layers take none, so this is a
    no-op until then."""
    from normlab.layers.factory import norm_options

    norm = fields.get("norm")
    if norm is None or norm in ("nf", "none") or "total_steps" not in norm_options(norm):
        return fields
    options = dict(fields.get("norm_options", {}))
    options.setdefault("total_steps", int(total_steps))
    return {**fields, "norm_options": options}


def group_results(keys: Sequence[Hashable], results: Sequence[Any]) -> dict[Hashable, list[Any]]:
    """``{key: [results...]}`` pairing ``keys[i]`` with ``results[i]`` (the seeds of one grid cell)."""
    cells: dict[Hashable, list[Any]] = defaultdict(list)
    for key, result in zip(keys, results, strict=True):
        cells[key].append(result)
    return dict(cells)


def finished(results: Sequence[Any]) -> list[Any]:
    return [r for r in results if r.status == "finished"]


def stat(results: Sequence[Any], field: str) -> tuple[float, float]:
    """Mean ± 95% CI of ``field`` over the finished runs of one cell (NaN when none finished)."""
    return mean_ci(getattr(r, field) for r in finished(results))


def diff_stat(results: Sequence[Any], field_a: str, field_b: str) -> tuple[float, float]:
    """Mean ± 95% CI of ``field_a - field_b`` over the finished runs of one cell (paired per seed)."""
    return mean_ci(getattr(r, field_a) - getattr(r, field_b) for r in finished(results))


def mean_of(results: Sequence[Any], field: str) -> float:
    return stat(results, field)[0]


def count_status(results: Sequence[Any], status: str) -> int:
    return sum(r.status == status for r in results)


def is_stable(results: Sequence[Any], min_acc: float) -> bool:
    """Every seed finished (none diverged or failed), none stalled at chance level (a stalled run did not
    train: it is not "stable"), and the mean test accuracy reaches ``min_acc``."""
    if not results or any(r.status != "finished" or r.convergence == "stalled" for r in results):
        return False
    acc = mean_of(results, "final_test_acc")
    return math.isfinite(acc) and acc >= min_acc


def pct(value: float, digits: int = 1) -> str:
    """``0.9123 -> '91.2%'``; NaN -> ``'n/a'``."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:.{digits}f}%"


def pts(value: float, digits: int = 1) -> str:
    """A difference of fractions in percentage points with its sign: ``0.031 -> '+3.1 pts'``."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.{digits}f} pts"


def pct_cell(cell: tuple[float, float], digits: int = 2) -> tuple[float, float]:
    """``(mean, hw)`` of fractions as percentages rounded to ``digits`` decimals, for tables."""
    mean, half = cell
    return round(100 * mean, digits), round(100 * half, digits)


def lr_summary(by_lr: dict[float, Sequence[Any]], min_acc: float) -> dict[str, Any]:
    """Summarise an lr grid of one (variant, batch): the best stable lr (highest mean test accuracy among
    the stable lrs, :func:`is_stable`), its test accuracy ± CI and steps/s, the largest stable lr, and the
    number of diverged and failed runs. lrs with no stable setting give ``best_lr = None`` and NaN."""
    stable = [lr for lr, runs in by_lr.items() if is_stable(runs, min_acc)]
    best = max(stable, key=lambda lr: mean_of(by_lr[lr], "final_test_acc")) if stable else None
    runs_all = [r for runs in by_lr.values() for r in runs]
    return {
        "best_lr": best,
        "largest_stable_lr": max(stable) if stable else None,
        "acc": stat(by_lr[best], "final_test_acc") if best is not None else (math.nan, math.nan),
        "steps_per_s": stat(by_lr[best], "steps_per_s") if best is not None else (math.nan, math.nan),
        "diverged": count_status(runs_all, "diverged"),
        "failed": count_status(runs_all, "failed"),
        "runs": len(runs_all),
        "best_runs": list(by_lr[best]) if best is not None else [],
    }


def lr_text(lr: float | None) -> str:
    return "none" if lr is None else f"{lr:g}"


def largest_text(summary: dict[str, Any]) -> str:
    """An :func:`lr_summary`'s largest stable lr, as ``">= 1.6 (top of grid)"`` when it is the top of the grid
    (``summary["grid_top"]``, set by the study): the grid never reached instability, so the true value is
    at least that."""
    lr, top = summary["largest_stable_lr"], summary.get("grid_top")
    if lr is not None and top is not None and lr >= top:
        return f">= {lr_text(lr)} (top of grid)"
    return lr_text(lr)
