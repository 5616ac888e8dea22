"""The training setup Santurkar et al. (2018, Sec. 2-3) use for their mechanism experiments."""

from __future__ import annotations

from typing import Any

from normlab.studies._verdict import SETTLE
from normlab.studies.base import StudyContext


def longer_budget(fields: dict[str, int]) -> dict[str, str]:
    """:data:`SETTLE` whose ``unconverged`` entry names the ``--set`` flags of a longer budget: each budget
    field (dotted path -> its steps now) doubled. (Measured on the quick scale's standard VGG-16, plain SGD
    at LR 0.1 on MNIST-1D: 2 of 3 seeds had plateaued at 6,500 steps and 1 of 3 at 10,000, the others
    spiking again; the unconverged reason says which, a loss still falling or one that rose.)"""
    flags = " ".join(f"--set {field}={2 * steps}" for field, steps in fields.items())
    return {**SETTLE, "unconverged": f"a longer budget, {flags}, or --scale paper"}


def santurkar_base(ctx: StudyContext, group: str) -> dict[str, Any]:
    """TrainConfig fields shared by the noisy-BN and landscape studies: the recipe's model and data, and
    plain SGD with a fixed learning rate and no weight decay (the paper's setup)."""
    return {
        "model": ctx.param("model", str),
        "width": ctx.param("width", (int, float)),
        "dataset": ctx.param("dataset", str),
        "subset": ctx.param("subset", int) or None,
        "download": bool(ctx.params.get("download", False)),
        "batch_size": ctx.param("batch_size", int),
        "steps": ctx.param("steps", int),
        "eval_every": ctx.param("eval_every", int),
        "optimizer": "sgd",
        "momentum": 0.0,
        "weight_decay": 0.0,
        "schedule": "constant",
        "group": group,
    }
