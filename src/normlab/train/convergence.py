"""Did a run converge? The plateau rule and the stall rule, as pure functions of a run's logged history.

science.md section 8: compare only converged arms; an arm at chance level *stalled* and is not a result.

**Plateau rule** (:func:`plateaued`). Split the last ``2 * window`` of the run's steps into two equal halves,
*before* and *last*. The run has plateaued when both

- the training loss stopped changing: ``|median(loss in before) - median(loss in last)| <= max(loss_rtol *
  median(loss in before), loss_atol)`` (medians, because the logged loss is of single noisy batches): it
  neither still falls nor rises, and
- the held-out metric stopped improving: ``max(metric in last) - max(metric up to before) <= metric_atol``
  (held-out accuracy: at most ``metric_atol`` better than its best so far; for a regression loss, pass
  ``higher_is_better=False``),

with at least ``min_points`` logged losses and 2 held-out evaluations in each half; fewer points cannot show
a plateau (the run then counts as unconverged, with that reason).

A rise is a loss spike the run has not recovered from, not a plateau. Measured: the standard VGG-16 at LR
0.1 on MNIST-1D (noisy-bn study, 10,000 steps): at step 8,475 its test accuracy fell from 95.5% to 17%,
the median training loss rose from 0.0002 to about 0.5 over the last 20% of steps and the run ended at
79.4%; a rule that only asked whether the loss still fell called that a plateau, and its 79.4% a result.

Calibration (MNIST-1D ``cnn``, Adam 1e-2, constant lr, batch 128, 2000 steps): BN, GN and no-norm runs reach
their held-out plateau by about step 600-1000 and then memorize the 4000 training examples, their training
loss falling towards 0 roughly exponentially (GN: -50%, none: -95% over the last 20% of steps at step 2000,
at losses of a few hundredths of a nat). A relative rule alone never holds on a loss heading for 0, so a fall
of at most ``loss_atol = 0.05`` nats (the training labels' mean likelihood changing by at most 5%) also counts
as stopped: below that the training set is fit and the held-out metric decides. At batch 16 the median of
single-batch losses still fell by 0.02-0.04 nats per window at 3000 steps (losses 0.02-0.06, held-out
accuracy flat), which 0.02 called unconverged; a run that is still learning falls by far more (an
undertrained no-norm CNN: 0.2-0.5 nats per window).

**Stall rule** (:func:`stalled`). A classifier stalled when it never left chance level: its final training
loss is at least ``0.9 * ln(C)`` *and* its training accuracy at most ``1/C + 0.1 * (1 - 1/C)`` (C classes;
for 10 classes: loss >= 2.07 and accuracy <= 19%). Its learning rate is not "stable": it did not train.

A run's status (:func:`assess`): ``failed`` or ``diverged`` as the trainer ended it, else ``stalled``, else
``converged`` when the plateau rule holds at the end, else ``unconverged``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

CONVERGED, UNCONVERGED, STALLED = "converged", "unconverged", "stalled"
DIVERGED, FAILED = "diverged", "failed"
CONVERGENCE_STATUSES = (CONVERGED, UNCONVERGED, STALLED, DIVERGED, FAILED)

Series = Sequence[tuple[int, float]]
_ROUNDING = 1e-9  # thresholds are compared with this slack for floating-point rounding


@dataclass(frozen=True)
class PlateauRule:
    """The thresholds of the plateau rule (module docstring); the defaults are normlab's documented rule."""

    window: float = 0.2
    loss_rtol: float = 0.05
    loss_atol: float = 0.05
    metric_atol: float = 0.005
    min_points: int = 3
    higher_is_better: bool = True


@dataclass(frozen=True)
class Convergence:
    """A run's convergence status and the reason, in words and numbers."""

    status: str
    reason: str
    loss_change: float = math.nan  # relative fall of the median training loss over the last window
    metric_change: float = math.nan  # gain of the held-out metric's best over the last window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plateaued(train_loss: Series, heldout: Series, rule: PlateauRule = PlateauRule()) -> Convergence:
    """Whether the training loss and the held-out metric stopped improving (module docstring)."""
    loss = [(s, v) for s, v in train_loss if math.isfinite(v)]
    metric = [(s, v) for s, v in heldout if math.isfinite(v)]
    if not loss:
        return Convergence(UNCONVERGED, "no training loss was logged")
    last_step = max(s for s, _ in loss)
    first_step = min(min(s for s, _ in loss), min((s for s, _ in metric), default=last_step))
    span = last_step - first_step
    cut_last = last_step - rule.window * span
    cut_before = last_step - 2 * rule.window * span
    loss_before = [v for s, v in loss if cut_before <= s < cut_last]
    loss_last = [v for s, v in loss if s >= cut_last]
    metric_before = [v for s, v in metric if s < cut_last]
    metric_last = [v for s, v in metric if s >= cut_last]
    recent_before = [v for s, v in metric if cut_before <= s < cut_last]
    if min(len(loss_before), len(loss_last)) < rule.min_points:
        reason = f"too few logged losses to judge a plateau ({len(loss)}); log more often"
        return Convergence(UNCONVERGED, reason)
    if len(metric_last) < 2 or len(recent_before) < 2:
        reason = f"too few held-out evaluations to judge a plateau ({len(metric)}); evaluate more often"
        return Convergence(UNCONVERGED, reason)
    before, last = statistics.median(loss_before), statistics.median(loss_last)
    loss_change = (before - last) / abs(before) if before != 0 else 0.0
    sign = 1.0 if rule.higher_is_better else -1.0
    # Improvement of the best value in the metric's own direction (a falling error improves).
    metric_change = max(sign * v for v in metric_last) - max(sign * v for v in metric_before)
    where = f"over the last {rule.window:.0%} of steps"
    # _ROUNDING: accuracies are multiples of 1/n, and a gain of exactly metric_atol (2 of 400 examples)
    # computes as 0.0050000000000000044; "at most metric_atol" must include it.
    if loss_change > rule.loss_rtol + _ROUNDING and before - last > rule.loss_atol + _ROUNDING:
        reason = f"training loss still falling: {100 * loss_change:.1f}% {where}"
        return Convergence(UNCONVERGED, reason, loss_change, metric_change)
    if -loss_change > rule.loss_rtol + _ROUNDING and last - before > rule.loss_atol + _ROUNDING:
        reason = f"training loss rising: +{100 * -loss_change:.1f}% {where} (a loss spike not recovered from)"
        return Convergence(UNCONVERGED, reason, loss_change, metric_change)
    if metric_change > rule.metric_atol + _ROUNDING:
        reason = f"held-out metric still improving: {metric_change:+.4f} {where}"
        return Convergence(UNCONVERGED, reason, loss_change, metric_change)
    reason = f"plateau: training loss {100 * loss_change:+.1f}%, held-out metric {metric_change:+.4f} {where}"
    return Convergence(CONVERGED, reason, loss_change, metric_change)


def stalled(train_loss: float, train_acc: float, num_classes: int) -> bool:
    """Whether a classifier never left chance level (module docstring); False for regression (C < 2)."""
    if num_classes < 2 or not (math.isfinite(train_loss) and math.isfinite(train_acc)):
        return False
    chance = 1.0 / num_classes
    return train_loss >= 0.9 * math.log(num_classes) and train_acc <= chance + 0.1 * (1 - chance)


def assess(
    status: str,
    *,
    train_loss: Series,
    heldout: Series,
    final_train_loss: float,
    final_train_acc: float,
    num_classes: int,
    rule: PlateauRule = PlateauRule(),
    plateau: Convergence | None = None,
) -> Convergence:
    """The convergence status of a run the trainer ended with ``status`` (``finished``, ``diverged`` or
    ``failed``): failed / diverged / stalled / converged / unconverged (module docstring).

    ``plateau``: the plateau rule's answer already taken by the run's budget (an auto budget judges it
    before its cooldown, :mod:`normlab.train.budget`); None judges the whole history here.
    """
    if status in (FAILED, DIVERGED):
        return Convergence(status, f"the run {status}")
    if stalled(final_train_loss, final_train_acc, num_classes):
        return Convergence(
            STALLED,
            f"stalled at chance level: training loss {final_train_loss:.3f} "
            f"(ln C = {math.log(num_classes):.3f}), "
            f"accuracy {100 * final_train_acc:.1f}%",
        )
    return plateau if plateau is not None else plateaued(train_loss, heldout, rule)
