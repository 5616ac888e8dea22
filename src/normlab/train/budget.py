"""How long a run trains and at which learning rate: a per-run budget policy.

A budget answers three questions for the training loop, and nothing else:

- ``lr(step)``: the learning rate of the update taken at ``step`` (0-based);
- ``done(step, history)``: whether the run ends after ``step`` updates, given its logged history
  (``{"train/loss": [(step, value), ...], "val/acc": [...], ...}``);
- ``cap``: the most steps it can take (for the progress bar and for sizing evaluations).

The policy is an object per run so that an engine training K runs at once (one vmapped model) can hold one
per member and ask each the same questions; it keeps its few decisions in :meth:`state_dict` so a
checkpoint resumes it.

**fixed** (:class:`FixedBudget`): today's budget, ``steps`` or ``epochs * steps_per_epoch`` updates under
``config.schedule`` (:func:`normlab.train.schedule.learning_rate`). Whether the run converged is judged at
the end from its history (:func:`normlab.train.convergence.assess`).

**auto** (:class:`AutoBudget`): train until the plateau rule holds, with a cap, under a warmup-stable-decay
schedule (WSD; Zhai et al. 2022 "Scaling Vision Transformers" Sec. 3.5, Hägele et al. 2024 "Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations"):

1. linear warmup over ``warmup_steps``, then the constant base lr;
2. at every held-out evaluation after ``min_steps``, the plateau rule
   (:func:`normlab.train.convergence.plateaued`) is checked on the history so far (training loss and the
   held-out metric, ``val/acc`` when a validation split is held out, else ``test/acc``);
3. once it has held at every evaluation from step ``h`` to step ``s >= (1 + patience) * h`` -- or when the
   cap leaves no room for a cooldown after ``s`` -- the lr decays linearly to 0 over ``cooldown * s`` steps,
   and the run ends.

**At the cap.** A run whose cooldown the cap forces is judged as a fixed budget of ``cap`` steps is: by the
plateau rule at that last evaluation of its stable phase, without the patience. The patience decides *when
to stop* (it keeps a run from ending on a temporary plateau it would have left); at the cap the run stops
anyway, so it cannot protect anything there, and the run is *converged* when the rule holds then (the reason
says "at the cap" and since when it held), *unconverged* otherwise. Measured on the default compare (MNIST-1D
``cnn``, batch 16, best lrs): 2 of 36 runs met the rule from step 9000-9600 of a 12000-step cap, too late for
the patience and a cooldown (their sibling seeds met it in time and ended at steps 4600-10700); judged at the
cap, they are converged.

**Stopping below a bar** (``stop_below``, optional). At each held-out evaluation from ``min_steps`` on,
a run whose best held-out accuracy so far is below ``stop_below`` ends there, without a cooldown, as
*unconverged* with the reason "stopped below". The lr search of ``normlab compare`` sets the bar for a
probe above a cell's best lr at that lr's mean validation accuracy minus a margin: such a probe exists to
bracket the best lr from above and to find the largest stable lr, and a probe that is that far behind
after the first tenth of the cap has answered both (it is not the best; it trains, or it would have
diverged or stalled). This is the rung rule of successive halving (Jamieson & Talwalkar 2016; Li et al.
2018, Hyperband) with one rung and a fixed bar.

Why the patience: runs without normalization at small learning rates sit on temporary plateaus (training
loss flat near 2.0, held-out accuracy 30-50%) before they take off. Measured on the MNIST-1D ``cnn``, batch
16, no norm, Adam 3e-4 to 5e-3: the plateau rule alone, judged at the first evaluation where it held, stopped
5 of 9 runs at 30-85% accuracy while their sibling seeds went on to 46-92%. Asking the rule to keep holding
for another quarter of the steps taken (and not judging before 10% of the cap) lets a run leave a temporary
plateau shorter than that; a longer one still ends the run, and the report's learning curves show it.

Why WSD: a schedule that must reach 0 at a length fixed in advance (cosine) cannot be stopped when the
plateau is seen; a constant lr can, but its final weights sit in the noise floor of the constant step
(a cooldown reliably gains what a cosine schedule would have, Hägele et al. 2024 Fig. 3). WSD's stable phase
is where the plateau is judged, and its cooldown, proportional to the steps taken, gives every run the same
share of annealing whatever its length. The cooldown is then excluded from the convergence judgement (its
loss drop is the schedule's doing, not a sign that the run was still learning): the run *converged* when
the plateau rule held before the cooldown, and is *unconverged* when it reached the cap first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from normlab.train.convergence import CONVERGED, UNCONVERGED, Convergence, PlateauRule, plateaued
from normlab.train.schedule import learning_rate

History = Mapping[str, Sequence[tuple[int, float]]]
EVALUATIONS_AUTO = 100  # held-out evaluations over the cap of an auto budget when eval_every is 0 (auto)
DEFAULT_RULE = PlateauRule()
MIN_FRACTION = 0.1  # an auto budget does not judge a plateau before this share of its cap
STOPPED_BELOW = "stopped below the bar"  # how the reason of a run ended by ``stop_below`` starts
PATIENCE = 0.25  # the plateau must keep holding for this share of the steps taken (module docstring)


class RunBudget(Protocol):
    """The budget interface the training loop (and a batched engine) uses."""

    cap: int

    def lr(self, step: int) -> float: ...

    def done(self, step: int, history: History) -> bool: ...

    def is_last(self, step: int) -> bool: ...

    @staticmethod
    def from_config(config: Any, steps_per_epoch: int, **options: Any) -> FixedBudget | AutoBudget:
        """The budget a :class:`~normlab.train.TrainConfig` asks for (:func:`from_config`)."""
        return from_config(config, steps_per_epoch, **options)


class FixedBudget:
    """``total_steps`` updates under a :func:`~normlab.train.schedule.learning_rate` schedule."""

    kind = "fixed"

    def __init__(
        self,
        total_steps: int,
        *,
        lr: float,
        schedule: str = "constant",
        warmup_steps: int = 0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        self.cap = int(total_steps)
        self._schedule = dict(
            lr=lr, total_steps=self.cap, schedule=schedule, warmup_steps=warmup_steps,
            milestones=list(milestones), gamma=gamma,
        )  # fmt: skip

    def lr(self, step: int) -> float:
        return learning_rate(step, **self._schedule)

    def done(self, step: int, history: History) -> bool:
        return step >= self.cap

    def is_last(self, step: int) -> bool:
        """Whether the run ends after ``step`` updates (no side effects, unlike :meth:`done`)."""
        return step >= self.cap

    def convergence(self) -> Convergence | None:
        """None: a fixed run is judged from its whole history at the end."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class AutoBudget:
    """Warmup-stable-decay until the plateau rule holds, with a cap (module docstring).

    Args:
        lr: base learning rate (the stable phase).
        cap: most updates, cooldown included.
        warmup_steps: linear warmup at the start.
        cooldown: length of the linear decay to 0 as a fraction of the steps taken when it starts.
        heldout: the history key of the held-out metric the plateau rule reads.
        rule: the plateau rule's thresholds.
        min_steps: no plateau is judged before this step (default ``MIN_FRACTION * cap``, at least warmup).
        patience: the rule must hold at every evaluation from step ``h`` to ``(1 + patience) * h``.
        stop_below: end the run at an evaluation from ``min_steps`` on where the best held-out accuracy so
            far is below this (module docstring); None never does.
    """

    kind = "auto"

    def __init__(
        self,
        *,
        lr: float,
        cap: int,
        warmup_steps: int = 0,
        cooldown: float = 0.2,
        heldout: str = "val/acc",
        rule: PlateauRule = DEFAULT_RULE,
        min_steps: int | None = None,
        patience: float = PATIENCE,
        stop_below: float | None = None,
    ) -> None:
        self.base_lr = lr
        self.cap = int(cap)
        self.warmup_steps = warmup_steps
        self.cooldown = cooldown
        self.heldout = heldout
        self.rule = rule
        default_min = max(warmup_steps, math.ceil(MIN_FRACTION * self.cap))
        self.min_steps = default_min if min_steps is None else min_steps
        self.patience = patience
        self.stop_below = stop_below
        self.held_since: int | None = None  # the first evaluation of the current run of plateau verdicts
        self.decay_start: int | None = None  # the step the cooldown started at
        self.decay_end: int | None = None  # the step the run ends at
        self.plateau: Convergence | None = None  # the plateau rule's answer when the cooldown started
        self._evaluations_seen = 0

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.decay_start is None or step < self.decay_start:
            return self.base_lr
        # Linear from the base lr at decay_start to base_lr / length at the last update.
        length = max(1, self.decay_end - self.decay_start)
        return self.base_lr * max(self.decay_end - step, 0) / length

    def done(self, step: int, history: History) -> bool:
        if self.decay_start is None:
            self._maybe_start_cooldown(step, history)
        return self.decay_end is not None and step >= self.decay_end

    def is_last(self, step: int) -> bool:
        """Whether the run ends after ``step`` updates, as known now (no side effects, unlike :meth:`done`):
        the end is set when the cooldown starts, at least one step before it."""
        return self.decay_end is not None and step >= self.decay_end

    def _maybe_start_cooldown(self, step: int, history: History) -> None:
        heldout = history.get(self.heldout, ())
        room_left = step + self._cooldown_length(step) < self.cap
        if len(heldout) == self._evaluations_seen and room_left:
            return  # the plateau is judged at held-out evaluations only
        self._evaluations_seen = len(heldout)
        if step >= self.min_steps and self.stop_below is not None and heldout:
            best = max(v for _, v in heldout)
            if best < self.stop_below:
                self._stop(step, best)
                return
        if step >= self.min_steps:
            verdict = plateaued(history.get("train/loss", ()), heldout, self.rule)
            if verdict.status == CONVERGED:
                self.held_since = step if self.held_since is None else self.held_since
                if step >= (1 + self.patience) * self.held_since:
                    self._start_cooldown(step, verdict)
                    return
            else:
                self.held_since = None
            self.plateau = verdict
        if not room_left:  # the cap: cool down now, the run ends at the cap unconverged
            self._start_cooldown(step, None, length=self.cap - step)

    def _stop(self, step: int, best: float) -> None:
        self.decay_start = self.decay_end = step
        self.plateau = Convergence(
            UNCONVERGED,
            f"{STOPPED_BELOW} at step {step}: best held-out accuracy {best:.4f} < "
            f"{self.stop_below:.4f} (the cell's best lr minus the margin: it cannot be the best lr)",
        )

    def _cooldown_length(self, step: int) -> int:
        return max(1, round(self.cooldown * step))

    def _start_cooldown(self, step: int, verdict: Convergence | None, length: int | None = None) -> None:
        length = self._cooldown_length(step) if length is None else max(1, length)
        self.decay_start, self.decay_end = step, min(step + length, self.cap)
        if verdict is not None:
            self.plateau = verdict
            return
        if self.plateau is not None and self.plateau.status == CONVERGED:  # at the cap: no patience
            self.plateau = Convergence(
                CONVERGED,
                f"{self.plateau.reason}, at the cap (judged as for a fixed budget: without the patience)",
                self.plateau.loss_change, self.plateau.metric_change,
            )  # fmt: skip
            return
        last = f" (last check: {self.plateau.reason})" if self.plateau is not None else ""
        self.plateau = Convergence(
            UNCONVERGED,
            f"reached the cap of {self.cap} steps before the plateau rule held{last}; raise the cap",
            self.plateau.loss_change if self.plateau else math.nan,
            self.plateau.metric_change if self.plateau else math.nan,
        )

    def convergence(self) -> Convergence | None:
        """The plateau rule's answer when the cooldown started (None before): converged at step s, or
        unconverged at the cap. The stall rule still comes first
        (:func:`~normlab.train.convergence.assess`)."""
        if self.plateau is None or self.decay_start is None:
            return self.plateau
        if self.plateau.status == CONVERGED:
            cooled = self.decay_end - self.decay_start
            reason = (f"{self.plateau.reason}, holding from step {self.held_since} to {self.decay_start}, "
                      f"then a {cooled}-step cooldown")
            return Convergence(CONVERGED, reason, self.plateau.loss_change, self.plateau.metric_change)
        return self.plateau

    def state_dict(self) -> dict[str, Any]:
        plateau = self.plateau.to_dict() if self.plateau is not None else None
        return {"decay_start": self.decay_start, "decay_end": self.decay_end, "plateau": plateau,
                "evaluations_seen": self._evaluations_seen, "held_since": self.held_since}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay_start, self.decay_end = state.get("decay_start"), state.get("decay_end")
        plateau = state.get("plateau")
        self.plateau = Convergence(**plateau) if plateau else None
        self._evaluations_seen = int(state.get("evaluations_seen", 0))
        self.held_since = state.get("held_since")


def from_config(config: Any, steps_per_epoch: int, *, heldout: str = "val/acc",
                rule: PlateauRule = DEFAULT_RULE) -> FixedBudget | AutoBudget:
    """The budget of ``config`` (a :class:`~normlab.train.TrainConfig`): ``steps`` or ``epochs *
    steps_per_epoch`` updates (``fixed``), or the cap of an ``auto`` budget."""
    total = config.steps or config.epochs * steps_per_epoch
    if config.budget == "auto":
        return AutoBudget(lr=config.lr, cap=total, warmup_steps=config.warmup_steps, cooldown=config.cooldown,
                          heldout=heldout, rule=rule, stop_below=getattr(config, "stop_below", None))
    return FixedBudget(total, lr=config.lr, schedule=config.schedule, warmup_steps=config.warmup_steps,
                       milestones=config.milestones, gamma=config.gamma)


LOG_POINTS = 50  # training-metric points over a run when config.log_every is 0 (auto)
LOG_EVERY_MAX = 10  # ... logged at least this often, as the default log_every


def log_every(config: Any, budget: FixedBudget | AutoBudget) -> int:
    """Steps between training-metric logs: ``config.log_every``, or when 0 (auto) about ``LOG_POINTS``
    over the budget's cap and at least every ``LOG_EVERY_MAX`` steps (a 20-step run logs every step, not
    twice; a 12000-step one every 10)."""
    if config.log_every:
        return config.log_every
    return max(1, min(LOG_EVERY_MAX, budget.cap // LOG_POINTS))


def eval_every(config: Any, budget: FixedBudget | AutoBudget, fixed_evaluations: int) -> int:
    """Steps between held-out evaluations: ``config.eval_every``, or when 0 (auto) ``fixed_evaluations``
    over a fixed run and ``EVALUATIONS_AUTO`` over an auto budget's cap (the plateau is judged at
    evaluations, so an auto run needs them often enough to stop close to its plateau)."""
    if config.eval_every:
        return config.eval_every
    count = EVALUATIONS_AUTO if budget.kind == "auto" else fixed_evaluations
    return max(1, budget.cap // count)


