"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275, Algorithm 1).

Training normalizes with the batch statistics and then corrects towards the moving ones:
``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, r and d treated as constants by backprop
(``stop_gradient``); ``y = gamma * x_hat + beta``. When the clips are inactive, training computes exactly
the inference function ``(x - mu) / sigma``. Evaluation is plain BN with the moving statistics.

Defaults follow Ioffe's schedule (Sec. 4), scaled to the run's length ``total_steps``: plain BN for the
first 5/130 of training, then r_max ramps to 3 by 40/130 and d_max to 5 by 25/130 (:func:`renorm_limits`).
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

#: Ioffe 2017, Sec. 4: of ~130k training steps, the first 5k are plain BN, r_max reaches its final value at
#: 40k and d_max at 25k (linear ramps from the end of the BN phase).
REFERENCE_STEPS = 130_000
BN_FRACTION = 5_000 / REFERENCE_STEPS
R_MAX_FRACTION = 40_000 / REFERENCE_STEPS
D_MAX_FRACTION = 25_000 / REFERENCE_STEPS


def renorm_limits(
    step: int,
    r_max: float,
    d_max: float,
    *,
    total_steps: int | None = None,
    bn_fraction: float = BN_FRACTION,
    r_max_fraction: float = R_MAX_FRACTION,
    d_max_fraction: float = D_MAX_FRACTION,
) -> tuple[float, float]:
    """The clipping limits (r_max_t, d_max_t) at training step ``step`` (0-based): Ioffe's schedule.

    Ioffe 2017 (Sec. 4) trains ~130k steps: plain BN (r_max = 1, d_max = 0) for the first 5k, then relaxes
    the limits gradually, r_max to 3 by step 40k and d_max to 5 by step 25k. Here the three step counts are
    fractions of the run's length ``total_steps`` (default fractions 5/130, 40/130, 25/130): with
    ``B = bn_fraction * T``, r_max_t ramps linearly from 1 at B to ``r_max`` at ``r_max_fraction * T`` and
    d_max_t from 0 at B to ``d_max`` at ``d_max_fraction * T``; both stay constant afterwards.
    ``total_steps=None`` uses the paper's own run length, T = 130,000 (so 5k / 25k / 40k steps). Ioffe does
    not give the ramps' shape ("gradually relaxed"); linear is our choice.
    """
    total = REFERENCE_STEPS if total_steps is None else total_steps
    start = bn_fraction * total
    if step < start:
        return 1.0, 0.0

    def ramp(end_fraction: float) -> float:
        span = end_fraction * total - start
        return 1.0 if span <= 0 else min(1.0, (step - start) / span)

    return 1.0 + (r_max - 1.0) * ramp(r_max_fraction), d_max * ramp(d_max_fraction)


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
        total_steps: the run's number of training steps, to which Ioffe's schedule is scaled (see
            :func:`renorm_limits`); ``None`` uses the paper's 130k steps (plain BN for the first 5,000 steps,
            so a short run that does not pass ``total_steps`` trains as BN).
        bn_fraction: fraction of the run trained as plain BN (r_max = 1, d_max = 0); Ioffe: 5k/130k.
        r_max_fraction: fraction of the run at which r_max reaches ``r_max``; Ioffe: 40k/130k.
        d_max_fraction: fraction of the run at which d_max reaches ``d_max``; Ioffe: 25k/130k.
    Training steps are counted in the buffer ``renorm_steps``. With ``r_max=1, d_max=0`` it is BN.
    """

    def __init__(
        self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, total_steps: int | None = None,
        bn_fraction: float = BN_FRACTION, r_max_fraction: float = R_MAX_FRACTION,
        d_max_fraction: float = D_MAX_FRACTION, dims: int = 2, eps: float = 1e-5,
        momentum: float | None = 0.1, affine: bool = True,
    ) -> None:
        super().__init__(num_features, dims=dims, eps=eps, momentum=momentum, affine=affine)
        if not (isinstance(r_max, (int, float)) and math.isfinite(r_max) and r_max >= 1.0):
            raise NormlabError(f"r_max must be a finite number >= 1, got {r_max!r}")
        if not (isinstance(d_max, (int, float)) and math.isfinite(d_max) and d_max >= 0.0):
            raise NormlabError(f"d_max must be a finite number >= 0, got {d_max!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or isinstance(total_steps, bool)
                                        or total_steps < 1):
            raise NormlabError(f"total_steps must be a positive int or None, got {total_steps!r}")
        fractions = {"bn_fraction": bn_fraction, "r_max_fraction": r_max_fraction,
                     "d_max_fraction": d_max_fraction}
        for name, value in fractions.items():
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
                raise NormlabError(f"{name} must be a number in [0, 1], got {value!r}")
        for name in ("r_max_fraction", "d_max_fraction"):
            if fractions[name] < bn_fraction:
                raise NormlabError(
                    f"{name} must be >= bn_fraction ({bn_fraction:g}), got {fractions[name]!r}"
                )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.total_steps = total_steps
        self.bn_fraction = float(bn_fraction)
        self.r_max_fraction = float(r_max_fraction)
        self.d_max_fraction = float(d_max_fraction)
        self.register_buffer("renorm_steps", torch.tensor(0, dtype=torch.long))

    def current_limits(self) -> tuple[float, float]:
        """(r_max_t, d_max_t) the next training step will use."""
        return renorm_limits(int(self.renorm_steps), self.r_max, self.d_max, total_steps=self.total_steps,
                             bn_fraction=self.bn_fraction, r_max_fraction=self.r_max_fraction,
                             d_max_fraction=self.d_max_fraction)

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
                f"total_steps={self.total_steps}, bn_fraction={self.bn_fraction:.4g}, "
                f"r_max_fraction={self.r_max_fraction:.4g}, d_max_fraction={self.d_max_fraction:.4g}")


@register_norm("batch_renorm")
def batch_renorm_layer(
    num_channels: int, *, r_max: float = 3.0, d_max: float = 5.0, total_steps: int | None = None,
    bn_fraction: float = BN_FRACTION, r_max_fraction: float = R_MAX_FRACTION,
    d_max_fraction: float = D_MAX_FRACTION, dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
    affine: bool = True,
) -> nn.Module:
    return BatchRenorm(num_channels, r_max=r_max, d_max=d_max, total_steps=total_steps,
                       bn_fraction=bn_fraction, r_max_fraction=r_max_fraction, d_max_fraction=d_max_fraction,
                       dims=dims, eps=eps, momentum=momentum, affine=affine)
