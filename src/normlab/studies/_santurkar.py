"""The training setup Santurkar et al. (2018, Sec. 2-3) use for their mechanism experiments."""

from __future__ import annotations

from typing import Any

from normlab.studies.base import StudyContext


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
