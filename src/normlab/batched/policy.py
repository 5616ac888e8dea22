"""What each member of a batched group decides for itself: its learning rate at a step and when it is done.

A member's schedule and stopping may depend on its own logged history (an auto budget stops at its
plateau), so the engine asks one :class:`MemberPolicy` per member every step and removes a member from the
stack the step its policy says it is done; the others go on. By default a member's policy is its own
Trainer's budget (:mod:`normlab.train.budget`: fixed steps under the config's schedule, or auto until the
plateau rule holds), exactly what the run alone would follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

History = Mapping[str, Sequence[tuple[int, float]]]


@runtime_checkable
class MemberPolicy(Protocol):
    """``lr(step)``: the rate of the update taken at ``step`` (0-based); ``done(step, history)``: whether
    the member stops after ``step`` updates, given its metrics so far (name -> [(step, value)])."""

    def lr(self, step: int) -> float: ...

    def done(self, step: int, history: History) -> bool: ...
