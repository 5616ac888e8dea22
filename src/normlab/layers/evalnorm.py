"""EvalNorm (Singh & Shrivastava, ICCV 2019, arXiv 1904.06031): corrected BN statistics for evaluation.

A network trained with BN on batches of B samples normalized every sample with statistics that contained the
sample itself (weight 1/B in the batch mean). At evaluation plain BN uses the population (EMA) statistics
only, and for small B this mismatch costs accuracy. EvalNorm leaves training untouched (training = BN) and
at evaluation normalizes each sample with a blend of its own statistics and the EMA ones:

    mu  = a * mu_x  + (1 - a) * mu_EMA          (mu_x: the sample's mean over its spatial positions)
    var = b * var_x + (1 - b) * var_EMA         (var_x: its biased variance over the spatial positions)
    y   = gamma * (x - mu) / sqrt(var + eps) + beta

with one (a, b) per layer, stored in the buffers ``alpha`` and ``beta``. For (N, C) input a sample has one
value per channel, so mu_x = x and var_x = 0.

How a and b are obtained. The paper offers a rule of thumb, an offline estimate that needs a pass through
data without changing the model, and an online estimate learned during training. normlab implements:
- a fixed value: ``sample_weight`` (a = b = sample_weight; 0 is plain BN evaluation);
- the offline estimate :func:`fit_evalnorm`: on the frozen model, run training-mode forward passes on
  batches of the training batch size and fit, per layer, the a (and b) whose blend best predicts, in least
  squares, the batch statistics each sample was really normalized with in training (see its docstring).
The online (learned) estimate is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm
from normlab.layers.factory import register_norm
from normlab.layers.kinds import has_batch_stats


def sample_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel (biased var, mean) over the spatial dims of ``x`` (N, C, *S); shapes (N, C)."""
    if x.dim() == 2:
        return torch.zeros_like(x), x
    return torch.var_mean(x.flatten(2), dim=2, correction=0)


def eval_norm(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, *,
    alpha: float | Tensor, beta: float | Tensor, eps: float = 1e-5,
) -> Tensor:
    """EvalNorm's evaluation-mode output for ``x`` (N, C, *S); formula in the module docstring."""
    if float(alpha) == 0.0 and float(beta) == 0.0:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    var_x, mu_x = sample_stats(x)
    mu = torch.lerp(running_mean.to(x.dtype).expand_as(mu_x), mu_x, alpha)
    var = torch.lerp(running_var.to(x.dtype).expand_as(var_x), var_x, beta)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mu * scale
    if bias is not None:
        shift = shift + bias
    view = (*mu.shape, *([1] * (x.dim() - 2)))
    return torch.addcmul(shift.view(view), x, scale.view(view))


class EvalNorm(BatchStatsNorm):
    """BN in training; EvalNorm's blended statistics in evaluation (see the module docstring).

    Args (besides :class:`BatchStatsNorm`'s):
        sample_weight: initial a = b in [0, 1]; 0 makes evaluation plain BN. :func:`fit_evalnorm` overwrites
            the buffers ``alpha`` and ``beta`` with estimated values.
    Shapes: input and output (N, C, *S).
    """

    def __init__(
        self, num_features: int, *, sample_weight: float = 0.0, dims: int = 2, eps: float = 1e-5,
        momentum: float | None = 0.1, affine: bool = True,
    ) -> None:
        super().__init__(num_features, dims=dims, eps=eps, momentum=momentum, affine=affine)
        if not (isinstance(sample_weight, (int, float)) and not isinstance(sample_weight, bool)
                and math.isfinite(sample_weight) and 0.0 <= sample_weight <= 1.0):
            raise NormlabError(f"sample_weight must be a number in [0, 1], got {sample_weight!r}")
        self.register_buffer("alpha", torch.tensor(float(sample_weight)))
        self.register_buffer("beta", torch.tensor(float(sample_weight)))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                self._next_momentum(), self.eps)
        return eval_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         alpha=self.alpha, beta=self.beta, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={float(self.alpha):.4g}, beta={float(self.beta):.4g}"


def _blend_fit_terms(x: Tensor, layer: EvalNorm) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Least-squares sums for one batch: returns (num_a, den_a, num_b, den_b) as float64 scalars."""
    xd = x.detach().double()
    var_x, mu_x = sample_stats(xd)
    dims = [0, *range(2, xd.dim())]
    var_b, mu_b = torch.var_mean(xd, dim=dims, correction=0)
    mu_e = layer.running_mean.double()
    var_e = layer.running_var.double()
    sd_e = torch.sqrt(var_e + layer.eps)
    # Dividing by the EMA scale makes every channel count alike, whatever its units.
    dx, db = (mu_x - mu_e) / sd_e, ((mu_b - mu_e) / sd_e).expand_as(mu_x)
    vx, vb = (var_x - var_e) / var_e.clamp_min(layer.eps), ((var_b - var_e) / var_e.clamp_min(layer.eps))
    vb = vb.expand_as(vx)
    return (dx * db).sum(), (dx * dx).sum(), (vx * vb).sum(), (vx * vx).sum()


@torch.no_grad()
def fit_evalnorm(model: nn.Module, batches: Iterable, *, num_batches: int | None = None) -> nn.Module:
    """Offline estimate of every EvalNorm layer's (a, b) on a frozen model; returns ``model``.

    ``batches`` yields inputs (or ``(x, ...)`` tuples) of the *training* batch size. The model runs in
    training mode (so each layer sees the activations of training), under ``no_grad``; for each EvalNorm
    layer and each sample i, channel c, the statistics training normalized it with are the batch ones
    (mu_B, var_B), and EvalNorm predicts them as ``mu_EMA + a (mu_x - mu_EMA)`` and
    ``var_EMA + b (var_x - var_EMA)``. The least-squares fit over all batches, samples and channels
    (deviations divided by the EMA std, resp. variance, per channel) is

        a = sum (mu_x - mu_EMA)(mu_B - mu_EMA) / sum (mu_x - mu_EMA)^2,  likewise b with the variances,

    clipped to [0, 1]. For independent samples a -> 1/B in expectation, the weight a sample has in its batch
    mean. Parameters, running statistics and train/eval flags are left as they were.
    """
    layers = [m for m in model.modules() if isinstance(m, EvalNorm)]
    if not layers:
        raise NormlabError(f"fit_evalnorm: {type(model).__name__} has no EvalNorm layer")
    sums = {id(m): torch.zeros(4, dtype=torch.float64) for m in layers}

    def hook(module: nn.Module, args: tuple) -> None:
        sums[id(module)] += torch.stack(_blend_fit_terms(args[0], module)).cpu()

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    flags = {m: m.training for m in model.modules()}
    # Momentum 0 keeps every EMA fixed during the pass, so each batch is compared with the same mu_EMA.
    momenta = {m: m.momentum for m in model.modules() if has_batch_stats(m)}
    seen = 0
    try:
        for m in momenta:
            m.momentum = 0.0
        model.train()
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
        for m, momentum in momenta.items():
            m.momentum = momentum
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    if seen == 0:
        raise NormlabError("fit_evalnorm: the batch iterator yielded no batch")
    for m in layers:
        num_a, den_a, num_b, den_b = sums[id(m)].tolist()
        m.alpha.fill_(min(max(num_a / den_a, 0.0), 1.0) if den_a > 0 else 0.0)
        m.beta.fill_(min(max(num_b / den_b, 0.0), 1.0) if den_b > 0 else 0.0)
    return model


@register_norm("evalnorm")
def evalnorm(
    num_channels: int, *, sample_weight: float = 0.0, dims: int = 2, eps: float = 1e-5,
    momentum: float | None = 0.1, affine: bool = True,
) -> nn.Module:
    return EvalNorm(num_channels, sample_weight=sample_weight, dims=dims, eps=eps, momentum=momentum,
                    affine=affine)
