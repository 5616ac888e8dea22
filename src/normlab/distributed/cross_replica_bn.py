"""Cross-replica Batch Normalization: BN whose batch statistics are those of the *global* batch, the union
of every replica's sub-batch (Ioffe & Szegedy 2015, Alg. 1, with the mini-batch B spread over processes;
the same semantics as ``torch.nn.SyncBatchNorm``).

Why normlab has its own: ``torch.nn.SyncBatchNorm`` refuses CPU tensors once a process group exists
(torch 2.13, science.md section 7), so gloo data-parallel runs on the CPU need another implementation.

Forward, per channel c, with n_r values of channel c on replica r (samples x spatial positions):
``S1 = all_reduce(sum x)``, ``S2 = all_reduce(sum x^2)``, ``N = all_reduce(n_r)`` (one all_reduce of a
(2C + 1) float64 vector), ``mean = S1 / N``, ``var = S2 / N - mean^2`` (biased, used to normalize),
``y = gamma * (x - mean) / sqrt(var + eps) + beta``. The running variance gets the *unbiased* global
variance ``var * N / (N - 1)``, as PyTorch BN on the whole batch would.

Backward (BN's backward with global sums): with ``x_hat = (x - mean) * invstd``,
``dbeta = sum dy``, ``dgamma = sum dy * x_hat`` (local sums; DDP averages them over replicas) and
``dx = gamma * invstd * (dy - G1 / N - x_hat * G2 / N)`` with ``G1 = all_reduce(sum dy)``,
``G2 = all_reduce(sum dy * x_hat)``. So ``dx`` on each replica is the gradient of the *sum* of every
replica's loss, exactly as ``SyncBatchNorm``: after DDP's gradient averaging the update equals single-process
training on the global batch.

Without an initialized process group (or in a group of one) every all_reduce is the identity and this is
plain training-mode BN, which is what the float64 gradcheck tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.layers._batchnorm_base import channel_view, reduce_dims


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """Sum ``t`` over the replicas of ``group`` in place (the identity without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def global_batch_stats(x: Tensor, group=None) -> tuple[Tensor, Tensor, int]:
    """(mean, biased var, count) per channel of the global batch whose share on this replica is ``x``.

    Sums are taken in float64 so that ``S2 / N - mean^2`` keeps float32 BN's precision; the result has
    ``x``'s dtype. ``count`` is the global number of values per channel.
    """
    dims = reduce_dims(x)
    xd = x.detach().double()
    local = torch.cat([xd.sum(dim=dims), (xd * xd).sum(dim=dims),
                       xd.new_tensor([x.numel() // x.shape[1]])])
    total = all_reduce_sum(local, group)
    c = x.shape[1]
    count = total[-1]
    mean = total[:c] / count
    var = (total[c:2 * c] / count - mean * mean).clamp_(min=0.0)
    return mean.to(x.dtype), var.to(x.dtype), int(count.item())


class CrossReplicaNormFn(torch.autograd.Function):
    """``y = w * (x - mean) * invstd + b`` with global batch statistics; the backward all-reduces the two
    per-channel sums BN's gradient needs (see the module docstring). ``w`` and ``b`` are (C,) tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        scale = weight * invstd
        out = torch.addcmul(channel_view(bias - mean * scale, x), x, channel_view(scale, x))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = reduce_dims(x)
        x_hat = (x - channel_view(mean, x)) * channel_view(invstd, x)
        sum_dy = dy.sum(dim=dims)
        sum_dy_xhat = (dy * x_hat).sum(dim=dims)
        dx = None
        if ctx.needs_input_grad[0]:
            sums = all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            c = x.shape[1]
            g1, g2 = sums[:c] / ctx.count, sums[c:] / ctx.count
            dx = channel_view(weight * invstd, x) * (dy - channel_view(g1, x) - x_hat * channel_view(g2, x))
        dw = sum_dy_xhat if ctx.needs_input_grad[1] else None
        db = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def cross_replica_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group=None,
) -> Tensor:
    """BN of ``x`` (N_r, C, *S), this replica's share of the global batch, with global statistics.

    Training: normalize with the global (mean, biased var) and move the running statistics towards
    (mean, unbiased var) with weight ``momentum``. Evaluation: ``F.batch_norm`` with the running statistics
    (no communication).
    """
    if not training:
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    mean, var, count = global_batch_stats(x, group)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            unbiased = var * (count / max(count - 1, 1))
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    w = weight if weight is not None else torch.ones_like(mean)
    b = bias if bias is not None else torch.zeros_like(mean)
    return CrossReplicaNormFn.apply(x, w, b, mean, torch.rsqrt(var + eps), count, group)
