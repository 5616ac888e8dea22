"""What each member of a batched group decides for itself: its learning rate at a step and when it is done.

A member's schedule and stopping may depend on its own logged history (a plateau rule, a convergence
test), so the engine asks one :class:`MemberPolicy` per member every step and removes a member from the
stack the step its policy says it is done; the others go on. :func:`member_policy` builds today's policy
from the config: a fixed number of steps (``steps``, else ``epochs`` x batches per epoch) and the lr of
:func:`normlab.train.schedule.learning_rate`, exactly what :class:`normlab.train.Trainer` uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from normlab.train import TrainConfig, learning_rate

History = Mapping[str, Sequence[tuple[int, float]]]


@runtime_checkable
class MemberPolicy(Protocol):
    """``lr(step)``: the rate of the update taken at ``step`` (0-based); ``done(step, history)``: whether
    the member stops after ``step`` updates, given its metrics so far (name -> [(step, value)])."""

    def lr(self, step: int) -> float: ...

    def done(self, step: int, history: History) -> bool: ...


@dataclass(frozen=True)
class FixedBudget:
    """``total_steps`` updates on ``config``'s schedule (warmup, constant / step / cosine)."""

    config: TrainConfig
    total_steps: int

    def lr(self, step: int) -> float:
        cfg = self.config
        return learning_rate(
            step,
            lr=cfg.lr,
            total_steps=self.total_steps,
            schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            milestones=cfg.milestones,
            gamma=cfg.gamma,
        )

    def done(self, step: int, history: History) -> bool:
        return step >= self.total_steps


def member_policy(config: TrainConfig, total_steps: int) -> MemberPolicy:
    """The policy of ``config``; ``total_steps`` is the Trainer's (``steps`` or epochs x batches)."""
    return FixedBudget(config, total_steps)
