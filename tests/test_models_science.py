"""Slow scientific checks of normlab.models against published numbers (run with ``pytest -m slow``)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "floor"), [("none", 0.91), ("bn", 0.93), ("gn", 0.93)])
def test_mnist1d_cnn_reaches_the_papers_accuracy(norm: str, floor: float) -> None:
    # Greydanus 2020 (MNIST-1D README / paper Table 1): the CNN reaches ~94% test accuracy with Adam, lr 1e-2,
    # batch 100. One seed of a bare 3000-step Adam loop at a constant lr is not a result: BN there gives
    # 89.7 / 95.6% at seeds 0 / 1 (science.md section 8), the lr's noise at the last step deciding. The
    # recipe here is compare's: train until the plateau rule holds on a held-out validation split, then cool
    # the lr down (normlab.train.budget, WSD), over 3 seeds; every run must converge, and the mean must reach
    # the floor (the paper's 94% less room for the seeds; none: science.md's bare-loop 92.9 / 91.9%). Cap
    # 6000 steps: at 4000 one no-norm seed had not met the plateau rule (measured); all 9 converge at 6000.
    from normlab.stats import mean_ci
    from normlab.train import TrainConfig, train

    results = [
        train(TrainConfig(norm=norm, batch_size=100, optimizer="adamw", weight_decay=0.0, lr=1e-2,
                          budget="auto", steps=6000, val_fraction=0.1, seed=seed), progress=False)
        for seed in range(3)
    ]
    assert [r.convergence for r in results] == ["converged"] * 3, [r.convergence_reason for r in results]
    mean, half = mean_ci([r.final_test_acc for r in results])
    assert mean >= floor, f"{norm}: {100 * mean:.1f} ± {100 * half:.1f}% over 3 seeds"
