"""Training-mode batch norm of the rows of a (C, N) matrix: the K*C channels of K members (member-major
activations, :mod:`normlab.batched.grouped`), each row one channel's N = batch x positions values.

    y[c] = (x[c] - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]
    mean[c] = sum_n x[c, n] / N,    var[c] = sum_n (x[c, n] - mean[c])^2 / N   (biased, as in training)
    running_mean <- (1 - momentum) running_mean + momentum mean
    running_var  <- (1 - momentum) running_var  + momentum var * N / (N - 1)

``F.batch_norm`` computes the same; this is its forward in four plain passes (a mean, a centring, a norm, a
scale and shift in place), because torch's CPU kernel is slow on this shape: on (1, 225, 2432) (9 members of
the MNIST-1D CNN's first BN at batch 128, one thread) 1200-1310 us, against 420-690 us here. The backward
is torch's own (``native_batch_norm_backward`` with the saved mean and 1/std), so gradients are exactly
its formula.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RowBatchNorm(torch.autograd.Function):
    """``x`` (C, N), ``weight``/``bias`` (C,) or None, ``running_mean``/``running_var`` (C,) or None (updated
    in place) -> (C, N) (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        n = x.shape[1]
        mean = x.mean(dim=1)
        y = x - mean.unsqueeze(1)
        var = torch.linalg.vector_norm(y, dim=1).square_().div_(n)
        invstd = (var + eps).rsqrt_()
        y.mul_((invstd if weight is None else invstd * weight).unsqueeze(1))
        if bias is not None:
            y.add_(bias.unsqueeze(1))
        if running_mean is not None and running_var is not None:
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(var * (n / (n - 1)), momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous().unsqueeze(0), x.unsqueeze(0), weight, None, None, mean, invstd, True, ctx.eps,
            mask,
        )
        return (grad_x.squeeze(0) if mask[0] else None, grad_w if mask[1] else None,
                grad_b if mask[2] else None, None, None, None, None)


def row_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """Training-mode batch norm of the rows of ``x`` (C, N) (module docstring); ``F.batch_norm`` where
    this path does not apply (N < 2: its error; not on the CPU, where the speed-up was measured)."""
    if x.shape[1] < 2 or x.device.type != "cpu":
        return torch.nn.functional.batch_norm(
            x.unsqueeze(0), running_mean, running_var, weight, bias, True, momentum, eps
        ).squeeze(0)
    return RowBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)
