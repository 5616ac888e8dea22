"""The plateau and stall rules (normlab.train.convergence) on constructed curves: no training."""

import math

import pytest

from normlab.train.convergence import PlateauRule, assess, plateaued, stalled


def curves(tau: float, steps: int = 1000, log_every: int = 10, eval_every: int = 50):
    loss = [(s, 2.3 * math.exp(-s / tau) + 0.1) for s in range(log_every, steps + 1, log_every)]
    acc = [(s, 0.95 - 0.85 * math.exp(-s / tau)) for s in range(eval_every, steps + 1, eval_every)]
    return loss, acc


def test_flat_end_is_a_plateau():
    loss, acc = curves(tau=100)
    result = plateaued(loss, acc)
    assert result.status == "converged"
    assert result.loss_change == pytest.approx(0.0157, abs=2e-3)


def test_falling_loss_is_unconverged():
    loss, acc = curves(tau=1000)
    result = plateaued(loss, acc)
    assert result.status == "unconverged" and result.reason.startswith("training loss still falling: 16.")


def test_a_loss_spike_not_recovered_from_is_unconverged():
    # The noisy-bn study's standard VGG-16 at 10,000 steps: fit (loss 2e-4, 95.5% held out) until a spike
    # at 85% of the run, then loss ~0.5 and 79% at the end; a rule that only asked "still falling?" said
    # plateau (training loss -33461%, held-out best +0.001).
    steps = range(10, 10001, 10)
    loss = [(s, 2e-4 if s < 8475 else 0.5 + 1.2 * math.exp(-(s - 8475) / 400)) for s in steps]
    evals = range(75, 10001, 75)
    acc = [(s, 0.955 if s < 8475 else 0.2 + 0.594 * (1 - math.exp(-(s - 8475) / 300))) for s in evals]
    result = plateaued(loss, acc)
    assert result.status == "unconverged"
    assert result.reason.startswith("training loss rising: +")
    assert result.reason.endswith("over the last 20% of steps (a loss spike not recovered from)")
    assert result.loss_change < -100
    # A rise smaller than the tolerance (either the relative or the absolute one) is still a plateau.
    small = [(s, 0.30 if s < 9000 else 0.34) for s in steps]  # +13%, but +0.04 nats < loss_atol
    assert plateaued(small, [(s, 0.9) for s in evals]).status == "converged"
    tiny = [(s, 1e-4 if s < 9000 else 1e-3) for s in steps]  # +900% of a fit loss, +0.0009 nats
    assert plateaued(tiny, [(s, 0.9) for s in evals]).status == "converged"


def test_rising_heldout_metric_alone_is_unconverged():
    loss, _ = curves(tau=100)
    acc = [(s, 0.5 + 0.4 * s / 1000) for s in range(50, 1001, 50)]
    result = plateaued(loss, acc)
    assert result.status == "unconverged" and result.reason.startswith("held-out metric still improving")


def test_regression_metric_lower_is_better():
    loss, _ = curves(tau=100)
    falling_error = [(s, 1.0 - 0.5 * s / 1000) for s in range(50, 1001, 50)]
    assert plateaued(loss, falling_error, PlateauRule(higher_is_better=False)).status == "unconverged"


def test_too_few_evaluations_cannot_show_a_plateau():
    loss, _ = curves(tau=100)
    result = plateaued(loss, [(1000, 0.9)])
    assert result.status == "unconverged" and "evaluate more often" in result.reason


@pytest.mark.parametrize(
    ("loss", "acc", "classes", "expected"),
    [(2.3026, 0.10, 10, True), (2.10, 0.18, 10, True), (2.10, 0.25, 10, False), (1.0, 0.12, 10, False),
     (0.6931, 0.52, 2, True), (0.6931, 0.60, 2, False), (5.0, 0.0, 0, False)],
)  # fmt: skip
def test_stall_rule(loss, acc, classes, expected):
    assert stalled(loss, acc, classes) is expected


def test_assess_orders_failure_stall_and_plateau():
    loss, acc = curves(tau=100)
    common = dict(train_loss=loss, heldout=acc, num_classes=10)
    nan = math.nan
    assert assess("diverged", final_train_loss=nan, final_train_acc=nan, **common).status == "diverged"
    assert assess("finished", final_train_loss=2.30, final_train_acc=0.1, **common).status == "stalled"
    assert assess("finished", final_train_loss=0.1, final_train_acc=0.97, **common).status == "converged"


def test_memorizing_loss_near_zero_with_flat_heldout_is_a_plateau():
    # Calibrated on the MNIST-1D cnn (train.convergence docstring): the training loss keeps halving on its way
    # to 0 (-50% over the window, but < 0.05 nats), the held-out accuracy is flat: converged.
    loss = [(s, 0.04 * math.exp(-s / 400)) for s in range(10, 1001, 10)]
    acc = [(s, 0.94) for s in range(50, 1001, 50)]
    result = plateaued(loss, acc)
    assert result.status == "converged" and result.loss_change > 0.3
    # The same relative fall from a loss of 2 nats (0.14 nats over the window) is still learning.
    loss = [(s, 50 * v) for s, v in loss]
    assert plateaued(loss, acc).status == "unconverged"


def test_a_gain_of_exactly_the_tolerance_is_a_plateau_despite_float_rounding():
    # Held-out accuracy on 400 examples moves in steps of 1/400; a best of 0.935 after 0.93 is a gain of
    # exactly 0.005 = metric_atol ("at most metric_atol better": a plateau), but 0.935 - 0.93 is
    # 0.0050000000000000044 in floating point. A default compare lost a cell to that rounding.
    loss, _ = curves(tau=100)
    acc = [(s, 0.93) for s in range(50, 801, 50)] + [(s, 0.935) for s in range(850, 1001, 50)]
    assert 0.935 - 0.93 > 0.005  # the rounding the rule must not trip over
    result = plateaued(loss, acc)
    assert result.status == "converged", result.reason
    # One more example (0.0075) is a gain.
    acc[-1] = (1000, 0.9375)
    assert plateaued(loss, acc).status == "unconverged"
