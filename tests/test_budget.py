"""Run budgets (normlab.train.budget) on constructed histories, and the validation split: no training,
except one tiny auto run through the Trainer."""

import math

import pytest
import torch

from normlab.errors import NormlabError
from normlab.train import TrainConfig, Trainer, learning_rate
from normlab.train.budget import AutoBudget, FixedBudget, RunBudget
from normlab.train.validation import split_validation


def run_budget(budget, loss_at, acc_at, log_every=10, eval_every=50):
    """Drive ``budget`` the way the Trainer does: done? -> lr -> step -> log -> evaluate. Returns the lrs."""
    history = {"train/loss": [], "val/acc": []}
    lrs, step = [], 0
    while not budget.done(step, history):
        lrs.append(budget.lr(step))
        step += 1
        if step % log_every == 0:
            history["train/loss"].append((step, loss_at(step)))
        if step % eval_every == 0:
            history["val/acc"].append((step, acc_at(step)))
    return lrs


def test_fixed_budget_is_the_schedule():
    budget = FixedBudget(100, lr=0.1, schedule="cosine", warmup_steps=10)
    assert budget.cap == 100
    assert [budget.lr(s) for s in range(100)] == [
        learning_rate(s, lr=0.1, total_steps=100, schedule="cosine", warmup_steps=10) for s in range(100)
    ]
    assert not budget.done(99, {}) and budget.done(100, {})
    assert budget.convergence() is None


def test_auto_budget_cools_down_after_the_plateau():
    # Loss and accuracy flatten with time constant 100 steps; the rule holds at the first evaluation where
    # the last 20% of the run shows < 5% loss fall and < 0.5 pts accuracy gain.
    budget = AutoBudget(lr=0.01, cap=5000, cooldown=0.2)
    lrs = run_budget(
        budget, lambda s: 2.3 * math.exp(-s / 100) + 0.1, lambda s: 0.95 - 0.85 * math.exp(-s / 100)
    )
    start, held = budget.decay_start, budget.held_since
    assert start is not None and start % 50 == 0 and 250 <= held <= start <= 1500
    assert start >= 1.25 * held and start - 50 < 1.25 * held  # the patience: the rule kept holding
    assert len(lrs) == start + round(0.2 * start) == budget.decay_end  # cooldown = 20% of the steps so far
    assert set(lrs[:start]) == {0.01}
    cooldown = lrs[start:]
    assert cooldown[0] == 0.01 and cooldown[-1] == pytest.approx(0.01 / len(cooldown))
    assert all(a > b for a, b in zip(cooldown, cooldown[1:], strict=False))  # linear to 0
    verdict = budget.convergence()
    assert verdict.status == "converged"
    assert f"holding from step {held} to {start}, then a {len(cooldown)}-step cooldown" in verdict.reason


def test_auto_budget_at_the_cap_is_unconverged():
    budget = AutoBudget(lr=0.1, cap=1200, warmup_steps=20)
    lrs = run_budget(budget, lambda s: 10.0 / s, lambda s: s / 2000)  # never stops improving
    assert len(lrs) == 1200  # the cooldown ends exactly at the cap
    assert lrs[0] == pytest.approx(0.1 / 20)  # warmup
    assert budget.decay_start == 1000  # the first step where a 20% cooldown no longer fits: 1000 + 200
    verdict = budget.convergence()
    assert verdict.status == "unconverged"
    assert verdict.reason.startswith("reached the cap of 1200 steps before the plateau rule held (last")


def test_auto_budget_at_the_cap_is_judged_without_the_patience():
    # Improving until step 800, flat after: the rule holds from step 1100 on (evaluations every 50), but the
    # patience would need it to hold to step 1375 and a cooldown after that; the cap of 1400 leaves no room
    # for a 20% cooldown from step 1167 on (1167 + 233 = 1400), so the cooldown starts there and the run is
    # judged once, as a fixed budget of 1400 steps would be: converged.
    def loss(s):
        return 1.0 - 0.9 * min(s, 800) / 800

    def acc(s):
        return 0.5 + 0.45 * min(s, 800) / 800

    budget = AutoBudget(lr=0.01, cap=1400, min_steps=100)
    lrs = run_budget(budget, loss, acc)
    assert len(lrs) == 1400 and budget.decay_start == 1167 and budget.held_since == 1100
    verdict = budget.convergence()
    assert verdict.status == "converged", verdict.reason
    assert verdict.reason.endswith(
        "at the cap (judged as for a fixed budget: without the patience), holding from step 1100 to 1167, "
        "then a 233-step cooldown"
    )
    # The same curve still improving at the cap (the rule does not hold there) is unconverged.
    rising = AutoBudget(lr=0.01, cap=1400, min_steps=100)
    run_budget(rising, lambda s: 1.0 / (1 + s / 100), lambda s: 0.5 + s / 4000)
    assert rising.convergence().status == "unconverged"


def test_auto_budget_patience_outlasts_a_short_temporary_plateau():
    # A no-norm run stuck at loss 2.0 / 40% accuracy until step 420, then learning. Judged at step 400 (the
    # first evaluation allowed), the rule holds; without patience the run would stop there.
    def loss(s):
        return 2.0 if s < 420 else 1.95 * math.exp(-(s - 420) / 200) + 0.05

    def acc(s):
        return 0.4 if s < 420 else 0.95 - 0.55 * math.exp(-(s - 420) / 200)

    hasty = AutoBudget(lr=0.01, cap=10_000, min_steps=400, patience=0.0)
    run_budget(hasty, loss, acc)
    assert hasty.decay_start == 400
    patient = AutoBudget(lr=0.01, cap=10_000, min_steps=400)
    run_budget(patient, loss, acc)
    assert patient.decay_start > 1500 and patient.convergence().status == "converged"


def test_auto_budget_state_round_trips():
    budget = AutoBudget(lr=0.1, cap=1200)
    run_budget(budget, lambda s: 10.0 / s, lambda s: s / 2000)
    copy = AutoBudget(lr=0.1, cap=1200)
    copy.load_state_dict(budget.state_dict())
    assert [copy.lr(s) for s in range(1200)] == [budget.lr(s) for s in range(1200)]
    assert copy.convergence() == budget.convergence()


def test_auto_budget_stops_below_the_bar():
    # A probe whose accuracy creeps up to 80% (the bar: 90%) ends at the first evaluation from min_steps on
    # (step 400 = 10% of the cap, evaluations every 50), at its base lr, without a cooldown.
    budget = AutoBudget(lr=0.1, cap=4000, stop_below=0.9)
    lrs = run_budget(budget, lambda s: 1.0 / (1 + s / 100), lambda s: 0.8 * (1 - math.exp(-s / 100)))
    assert len(lrs) == 400 and set(lrs) == {0.1}
    verdict = budget.convergence()
    assert verdict.status == "unconverged"
    best = 0.8 * (1 - math.exp(-4))
    assert verdict.reason == (f"stopped below the bar at step 400: best held-out accuracy {best:.4f} "
                              "< 0.9000 (the cell's best lr minus the margin: it cannot be the best lr)")
    # Above the bar at step 400 (its best so far counts, not its last value), it trains on to its plateau.
    above = AutoBudget(lr=0.1, cap=4000, stop_below=0.7)
    lrs = run_budget(above, lambda s: 2.3 * math.exp(-s / 100) + 0.1,
                     lambda s: 0.8 * (1 - math.exp(-s / 100)))
    assert len(lrs) > 500 and above.convergence().status == "converged"
    copy = AutoBudget(lr=0.1, cap=4000, stop_below=0.9)
    copy.load_state_dict(budget.state_dict())
    assert copy.done(400, {}) and copy.convergence() == verdict


def test_stop_below_needs_an_auto_budget_and_a_classifier():
    with pytest.raises(NormlabError, match="stop_below=0.5 needs budget 'auto'"):
        TrainConfig(steps=10, stop_below=0.5)
    with pytest.raises(NormlabError, match=r"stop_below=1.5 is out of range; allowed: >= 0.0 and <= 1.0"):
        TrainConfig(steps=10, budget="auto", stop_below=1.5)
    config = TrainConfig(model="mlp", dataset="gaussian_linear", budget="auto", steps=10, stop_below=0.5)
    with pytest.raises(NormlabError, match="it needs a classification data set, and gaussian_linear is a "
                                           "regression task"):
        Trainer(config, progress=False)
    # Unset, it leaves every earlier run's key as it was; set, it is part of the key.
    auto = TrainConfig(budget="auto", steps=10)
    assert "stop_below" not in auto.key_dict() and auto.key() != auto.replace(stop_below=0.5).key()


def test_from_config():
    fixed = RunBudget.from_config(TrainConfig(epochs=3), steps_per_epoch=31)
    assert isinstance(fixed, FixedBudget) and fixed.cap == 93
    auto = RunBudget.from_config(TrainConfig(budget="auto", steps=4000, cooldown=0.1), steps_per_epoch=31)
    assert isinstance(auto, AutoBudget) and auto.cap == 4000 and auto.cooldown == 0.1
    with pytest.raises(NormlabError, match="budget='week' is not allowed; valid values: fixed, auto"):
        TrainConfig(budget="week")


def test_validation_split_is_seeded_and_disjoint():
    x, y = torch.arange(100.0).reshape(100, 1), torch.arange(100)
    xt, yt, xv, yv = split_validation(x, y, 0.1)
    assert len(xv) == 10 and len(xt) == 90
    assert set(yt.tolist()).isdisjoint(yv.tolist()) and set(yt.tolist()) | set(yv.tolist()) == set(range(100))
    assert torch.equal(split_validation(x, y, 0.1)[3], yv)  # same examples every time
    assert len(split_validation(x, y, 0.0)[2]) == 0
    with pytest.raises(NormlabError, match="val_fraction=0.001 leaves no training or no validation example"):
        split_validation(x, y, 0.001)


def test_trainer_auto_budget_with_validation():
    from normlab.train import Trainer

    config = TrainConfig(subset=512, batch_size=32, steps=300, width=8, log_every=4, eval_train_samples=256,
                         budget="auto", val_fraction=0.125, optimizer="adamw", lr=0.01, weight_decay=0.0)
    trainer = Trainer(config, progress=False)
    assert len(trainer.x_train) == 448 and len(trainer.x_val) == 64
    result = trainer.fit()
    assert result.steps <= 300 and result.steps == trainer.budget.decay_end
    assert math.isfinite(result.final_val_acc) and result.convergence in ("converged", "unconverged")
    assert trainer.history["val/acc"] and trainer.history["test/acc"]
