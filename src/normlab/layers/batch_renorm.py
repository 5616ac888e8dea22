"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275, Algorithm 1).

Training normalizes with the batch statistics and then corrects towards the moving ones:
``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, r and d treated as constants by backprop
(``stop_gradient``); ``y = gamma * x_hat + beta``. When the clips are inactive, training computes exactly
the inference function ``(x - mu) / sigma``. Evaluation is plain BN with the moving statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm, channel_view, reduce_dims
from normlab.layers.factory import register_norm


def renorm_limits(
    step: int, r_max: float, d_max: float, warmup_steps: int, bn_steps: int
) -> tuple[float, float]:
    """The clipping limits (r_max_t, d_max_t) at training step ``step`` (0-based).

    Ioffe 2017 (Sec. 4) trains the first steps as plain BN (r_max = 1, d_max = 0) and then relaxes the limits
    gradually. Here: ``bn_steps`` steps of plain BN, then a linear ramp over ``warmup_steps`` steps from
    (1, 0) to (r_max, d_max), then constant. ``warmup_steps = 0`` jumps straight to (r_max, d_max).
    """
    if step < bn_steps:
        return 1.0, 0.0
    frac = 1.0 if warmup_steps == 0 else min(1.0, (step - bn_steps) / warmup_steps)
    return 1.0 + (r_max - 1.0) * frac, d_max * frac


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    r_max: float,
    d_max: float,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Renorm over (N, C, *spatial); updates ``running_mean``/``running_var`` in place when training.

    ``sigma_B = sqrt(var_B + eps)`` (biased var_B over N and spatial dims) and ``sigma = sqrt(running_var +
    eps)``, so that with unclipped r and d the training output equals the evaluation output. Because r and d
    carry no gradient, ``gamma * (x_hat_B * r + d) + beta`` is BN with weight ``gamma * r`` and bias
    ``gamma * d + beta``: BN's fused backward computes the gradients (those of gamma and beta come out
    right through the chain rule on those products), and the batch statistics are computed once.

    Running statistics are updated as PyTorch BN does (after r and d are computed from the old ones):
    ``mu <- (1 - m) mu + m mu_B``, ``running_var <- (1 - m) running_var + m * unbiased var_B``. (Ioffe
    averages sigma itself; averaging the variance keeps the buffers interchangeable with torch BN's.)
    """
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    with torch.no_grad():
        mean_b, var_b = batch_stats(x)
        inv_sigma = torch.rsqrt(running_var + eps)
        r = (torch.sqrt(var_b + eps) * inv_sigma).clamp_(1.0 / r_max, r_max).to(x.dtype)
        d = ((mean_b - running_mean) * inv_sigma).clamp_(-d_max, d_max).to(x.dtype)
        n = x.numel() // x.shape[1]
        running_mean.lerp_(mean_b.to(running_mean.dtype), momentum)
        running_var.lerp_((var_b * (n / (n - 1))).to(running_var.dtype), momentum)
    w = r if weight is None else weight * r
    b = d if weight is None else torch.addcmul(bias, weight, d)
    return _BatchNormGivenStats.apply(x, w, b, mean_b.to(x.dtype), torch.rsqrt(var_b + eps).to(x.dtype), eps)


class _BatchNormGivenStats(torch.autograd.Function):
    """Training-mode BN ``y = w * (x - mean) * invstd + b`` with the batch statistics already computed.

    ``F.batch_norm`` would compute the statistics a second time (they are needed first for r and d); here
    the forward is one ``addcmul`` over x and the backward is BN's fused backward, which accounts for the
    statistics' dependence on x. Gradients flow to x, w and b; autograd carries those of w = gamma * r and
    b = gamma * d + beta on to gamma and beta.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, eps):
        scale = weight * invstd
        out = torch.addcmul(channel_view(bias - mean * scale, x), x, channel_view(scale, x))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return dx, dw, db, None, None, None


@torch.no_grad()
def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel of ``x`` (N, C, *S) over N and the spatial dims, without gradient."""
    if x.device.type == "cpu":
        # One fused Welford pass; about 3x faster than var_mean over dims (0, 2, 3) on CPU.
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    var, mean = torch.var_mean(x, dim=reduce_dims(x), correction=0)
    return mean, var


class BatchRenorm(BatchStatsNorm):
    """Batch Renormalization layer (see :func:`batch_renorm`) with Ioffe's warm-up of r_max and d_max.

    Shapes: input and output (N, C, *spatial). Args (besides :class:`BatchStatsNorm`'s):
        r_max: final upper clip of r (>= 1; Ioffe uses 3).
        d_max: final clip of |d| (>= 0; Ioffe uses 5).
        warmup_steps: training steps over which the limits ramp linearly from (1, 0) to (r_max, d_max).
        bn_steps: training steps of plain BN (r = 1, d = 0) before the ramp starts (Ioffe: 5000).
    Training steps are counted in the buffer ``renorm_steps``. With ``r_max=1, d_max=0`` it is BN.
    """

    def __init__(
        self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0,
        bn_steps: int = 0, dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, dims=dims, eps=eps, momentum=momentum, affine=affine)
        if not (isinstance(r_max, (int, float)) and math.isfinite(r_max) and r_max >= 1.0):
            raise NormlabError(f"r_max must be a finite number >= 1, got {r_max!r}")
        if not (isinstance(d_max, (int, float)) and math.isfinite(d_max) and d_max >= 0.0):
            raise NormlabError(f"d_max must be a finite number >= 0, got {d_max!r}")
        for name, value in (("warmup_steps", warmup_steps), ("bn_steps", bn_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise NormlabError(f"{name} must be an int >= 0, got {value!r}")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.bn_steps = bn_steps
        self.register_buffer("renorm_steps", torch.tensor(0, dtype=torch.long))

    def current_limits(self) -> tuple[float, float]:
        """(r_max_t, d_max_t) the next training step will use."""
        return renorm_limits(int(self.renorm_steps), self.r_max, self.d_max, self.warmup_steps, self.bn_steps)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if not self.training:
            return batch_renorm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, r_max=self.r_max, d_max=self.d_max, eps=self.eps).to(x.dtype)
        r_max, d_max = self.current_limits()
        self.renorm_steps.add_(1)
        return batch_renorm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=True, r_max=r_max,
            d_max=d_max, momentum=self._next_momentum(), eps=self.eps,
        ).to(x.dtype)  # float32 parameters with fp16/bf16 input: the output keeps the input's dtype

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, bn_steps={self.bn_steps}")


@register_norm("batch_renorm")
def batch_renorm_layer(
    num_channels: int, *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0, bn_steps: int = 0,
    dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
) -> nn.Module:
    return BatchRenorm(num_channels, r_max=r_max, d_max=d_max, warmup_steps=warmup_steps, bn_steps=bn_steps,
                       dims=dims, eps=eps, momentum=momentum, affine=affine)
