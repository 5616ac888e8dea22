"""The float64 numpy oracle: normalization written from the papers' formulas, the ground truth G.

Batch Norm (Ioffe & Szegedy 2015, Alg. 1 and section 3.1; science.md section 1), per channel c over the
N * spatial values (m of them) of a batch, input (N, C, *spatial) channels-first:

    mu_B = mean(x),  var_B = mean((x - mu_B)^2)            (biased: this normalizes)
    y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta
    running_mean <- (1 - momentum) * running_mean + momentum * mu_B
    running_var  <- (1 - momentum) * running_var  + momentum * var_B * m / (m - 1)   (unbiased: Var[x])

``momentum`` is normlab's meaning (PyTorch's): the weight of the new batch; ``momentum=None`` is the
cumulative average (momentum = 1 / batches seen). ``unbiased_running_var=False`` gives the Flax/Keras
convention (the batch's biased variance enters the running variance). Evaluation uses the running
statistics in the same normalization formula.

Group Norm (Wu & He 2018, eq. 1-3): per example, C is split into G groups and each group is normalized
over its channels and spatial positions with its biased variance; the affine map is per channel.
LayerNorm is G = 1 and InstanceNorm is G = C (normlab's ``ln`` and ``in``).
"""

from __future__ import annotations

import numpy as np


def _channel_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean and biased variance of x (N, C, *spatial) and the count m = N * prod(spatial)."""
    x = np.asarray(x, np.float64)
    axes = _channel_axes(x)
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x.ndim)) ** 2).mean(axis=axes)
    return mean, var, x.size // x.shape[1]


def normalize(x: np.ndarray, mean: np.ndarray, var: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` with per-channel statistics (channels-first)."""
    x = np.asarray(x, np.float64)
    y = (x - _per_channel(mean, x.ndim)) / np.sqrt(_per_channel(var, x.ndim) + eps)
    if weight is not None:
        y = y * _per_channel(weight, x.ndim) + _per_channel(bias, x.ndim)
    return y


def update_running(
    running: np.ndarray, batch_value: np.ndarray, momentum: float | None, batches_seen: int
) -> np.ndarray:
    """``(1 - momentum) * running + momentum * batch_value``; momentum=None: 1 / batches_seen."""
    factor = 1.0 / batches_seen if momentum is None else momentum
    return (1.0 - factor) * np.asarray(running, np.float64) + factor * batch_value


def batch_norm_train(
    x: np.ndarray,
    weight,
    bias,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    *,
    eps: float,
    momentum: float | None,
    batches_seen: int,
    unbiased_running_var: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training-mode BN step: returns (y, new running_mean, new running_var).

    ``batches_seen`` counts this batch (1 on the first step). With m = 1 the unbiased variance is
    undefined: it is NaN here, as in the formula (PyTorch refuses the batch instead).
    """
    mean, var, m = batch_stats(x)
    y = normalize(x, mean, var, weight, bias, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        contribution = var * m / (m - 1) if unbiased_running_var else var
    return (
        y,
        update_running(running_mean, mean, momentum, batches_seen),
        update_running(running_var, contribution, momentum, batches_seen),
    )


def batch_norm_eval(x: np.ndarray, weight, bias, running_mean, running_var, *, eps: float) -> np.ndarray:
    """Inference BN: the running statistics in the training formula."""
    return normalize(x, running_mean, running_var, weight, bias, eps)


def group_norm(x: np.ndarray, groups: int, weight, bias, *, eps: float) -> np.ndarray:
    """GroupNorm over (N, C, *spatial): biased mean/variance per (example, group); per-channel affine."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(axis=2, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * _per_channel(weight, x.ndim) + _per_channel(bias, x.ndim)
    return y


def layer_norm_last(x: np.ndarray, normalized_ndim: int, weight, bias, *, eps: float) -> np.ndarray:
    """``nn.LayerNorm``: normalize over the last ``normalized_ndim`` axes, elementwise affine there."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
    return y
