"""The training setup Santurkar et al. (2018, Sec. 2-3) use for their mechanism experiments."""

from __future__ import annotations

from typing import Any

from normlab.studies._verdict import SETTLE
from normlab.studies.base import StudyContext


def longer_budget(fields: dict[str, int]) -> dict[str, str]:
    """:data:`SETTLE` whose ``unconverged`` and ``stalled`` entries name the ``--set`` flags of a longer
    budget: each budget field (dotted path -> its steps now) doubled. A trajectory claim's arm that has not
    left chance level within its window (``stalled``) needs a longer window, not a smaller LR: the LR is
    the paper's."""
    flags = " ".join(f"--set {field}={2 * steps}" for field, steps in fields.items())
    text = f"a longer budget, {flags}, or --scale paper"
    return {**SETTLE, "unconverged": text, "stalled": text}


def santurkar_base(ctx: StudyContext, group: str) -> dict[str, Any]:
    """TrainConfig fields shared by the noisy-BN and landscape studies: the recipe's model and data, and
    plain SGD with a fixed learning rate and no weight decay (the paper's setup)."""
    return {
        "model": ctx.param("model", str),
        "depth": ctx.params.get("depth"),  # None: the model's default (VGG-16); quick scale takes VGG-11
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
