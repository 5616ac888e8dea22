"""CRADLE's distances and the float64 oracle, checked against hand computations and explicit loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.crossval import metrics, oracle
from normlab.errors import NormlabError


def test_mad_distance_matches_hand_computation():
    g = np.array([[0.0, 0.0], [1.0, 1.0]])
    o1 = np.array([[1.0, 1.0], [1.0, 2.0]])  # delta = 1.0, 0.5
    o2 = np.array([[3.0, 3.0], [1.0, 1.5]])  # delta = 3.0, 0.25
    np.testing.assert_allclose(metrics.mad_delta(o1, g), [1.0, 0.5])
    np.testing.assert_allclose(metrics.d_mad(o1, o2, g), [2.0 / 4.0, 0.25 / 0.75])


def test_mad_distance_is_zero_not_nan_when_both_equal_truth_and_respects_floor():
    g = np.ones((2, 3))
    assert metrics.d_mad(g, g, g).tolist() == [0.0, 0.0]
    # rounding noise 1e-7 vs 3e-7: the raw formula gives 0.5; below the floor it is agreement
    o1, o2 = g + 1e-7, g + 3e-7
    np.testing.assert_allclose(metrics.d_mad(o1, o2, g), [0.5, 0.5])
    assert metrics.d_mad(o1, o2, g, floor=1e-6).tolist() == [0.0, 0.0]
    # one backend above the floor: the paper's formula again
    np.testing.assert_allclose(
        metrics.d_mad(g + 1e-7, g + 1e-3, g, floor=1e-6), [(1e-3 - 1e-7) / (1e-3 + 1e-7)] * 2
    )


def test_class_score_uses_two_to_the_k_minus_rank():
    logits = np.array([[5.0, 4, 3, 2, 1, 0]] * 4)
    labels = np.array([0, 1, 4, 5])  # ranks 1, 2, 5, 6
    assert metrics.class_score(logits, labels, k=5).tolist() == [16.0, 8.0, 1.0, 0.0]
    swapped = np.array([[4.0, 5, 3, 2, 1, 0]] * 4)  # label 0 now rank 2, label 1 rank 1
    assert metrics.d_class(logits, swapped, labels).tolist() == [8.0, 8.0, 0.0, 0.0]


def test_inconsistency_fraction_and_introduction_rate():
    assert metrics.inconsistent(np.array([0.1, 0.3, 0.0, 0.0]), 0.2, 0.0)
    assert not metrics.inconsistent(np.array([0.1, 0.3, 0.0, 0.0]), 0.2, 0.25)  # 25% is not more than 25%
    assert metrics.introduction_rate(1e-3, 1e-7, eps=0.0) == pytest.approx((1e-3 - 1e-7) / 1e-7)
    assert metrics.introduction_rate(0.0, 0.0, eps=1e-7) == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: metrics.d_mad(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3))),
            r"mismatched shapes: o1\[2, 3\], o2\[2, 4\]",
        ),
        (
            lambda: metrics.class_score(np.zeros((2, 3)), np.array([0, 3])),
            r"labels must be in \[0, 2\], got 0..3",
        ),
        (
            lambda: metrics.class_score(np.zeros((2, 3)), np.array([0, 1]), k=0),
            "k must be a positive int, got 0",
        ),
        (lambda: metrics.inconsistent(np.zeros(2), 0.2, 1.0), r"p must be in \[0, 1\), got 1.0"),
    ],
)
def test_metric_bad_input_messages(call, message):
    with pytest.raises(NormlabError, match=message):
        call()


def test_oracle_batch_norm_matches_per_channel_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(5, 3, 2, 4))
    w, b = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    y, rm, rv = oracle.batch_norm_train(
        x, w, b, np.zeros(3), np.ones(3), eps=1e-3, momentum=0.1, batches_seen=1
    )
    for c in range(3):
        v = x[:, c].ravel()
        expected = w[c] * (x[:, c] - v.mean()) / np.sqrt(v.var() + 1e-3) + b[c]
        np.testing.assert_allclose(y[:, c], expected, rtol=1e-12)
        assert rm[c] == pytest.approx(0.1 * v.mean())
        assert rv[c] == pytest.approx(0.9 + 0.1 * np.var(v, ddof=1))  # unbiased, as in the paper's inference


def test_oracle_cumulative_momentum_is_the_mean_of_batch_statistics():
    rng = np.random.default_rng(1)
    batches = [rng.normal(i, 1.0, size=(4, 2)) for i in range(3)]
    rm, rv = np.zeros(2), np.ones(2)
    for seen, x in enumerate(batches, start=1):
        _, rm, rv = oracle.batch_norm_train(x, None, None, rm, rv, eps=1e-5, momentum=None, batches_seen=seen)
    np.testing.assert_allclose(rm, np.mean([x.mean(0) for x in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean([x.var(0, ddof=1) for x in batches], axis=0), rtol=1e-12)


def test_oracle_group_norm_matches_torch_float64():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 3, 3))
    w, b = rng.normal(size=6), rng.normal(size=6)
    expected = torch.nn.functional.group_norm(
        torch.from_numpy(x), 3, torch.from_numpy(w), torch.from_numpy(b), 1e-5
    )
    np.testing.assert_allclose(
        oracle.group_norm(x, 3, w, b, eps=1e-5), expected.numpy(), rtol=1e-10, atol=1e-12
    )
