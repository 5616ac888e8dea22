"""Learning rate as a pure function of the step, set on the optimizer every step (as nanoGPT does).

Being a function of ``step`` alone, the schedule needs no state of its own in a checkpoint: restoring the
step restores it. With base rate ``lr``, ``W = warmup_steps`` and ``T`` total steps:

- warmup (``step < W``): ``lr * (step + 1) / W`` (linear from lr/W, Goyal et al. 2017 "gradual warmup");
- ``constant``: ``lr``;
- ``step``: ``lr * gamma ** (number of milestones <= step)``;
- ``cosine``: ``lr * 0.5 * (1 + cos(pi * (step - W) / (T - W)))`` (Loshchilov & Hutter 2017, no restarts),
  reaching 0 at ``step = T``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def learning_rate(
    step: int,
    *,
    lr: float,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The learning rate for the update taken at ``step`` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** bisect.bisect_right(list(milestones), step)
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    raise ValueError(f"unknown schedule {schedule!r}")
