"""Noisy Batch Normalization (Santurkar, Tsipras, Ilyas & Madry 2018, arXiv 1805.11604, Sec. 2.1, Alg. 1).

After BN, at every training step, for every channel j draw ``mu_j ~ U(-n_mu, n_mu)`` and
``sigma_j ~ U(1, n_sigma)``; for every sample i draw ``m_ij ~ U(mu_j - r_mu, mu_j + r_mu)`` and
``s_ij ~ N(sigma_j, r_sigma^2)`` (r_sigma read as a standard deviation) and output ``s_ij * a_ij + m_ij``.
The noise makes the layer's output distribution shift and rescale from step to step — "internal covariate
shift" injected on purpose; the paper finds training about as good as with BN. Evaluation is noise-free BN.

Choices the paper leaves open, as options:
- ``per_position=False``: one (m_ij, s_ij) per sample and channel, shared by all H, W positions (H, W count
  as batch dimensions, as in BN); ``True`` draws them per position too.
- ``noise_after_affine=True``: the noise acts on the BN layer's output ``a = gamma * x_hat + beta`` (Alg. 1
  puts it "after BN"); ``False`` applies it to x_hat before gamma and beta.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm, channel_view
from normlab.layers.batch_renorm import batch_stats
from normlab.layers.factory import register_norm

DEFAULT_NOISE = {"n_mu": 0.5, "n_sigma": 1.25, "r_mu": 0.1, "r_sigma": 0.1}


def check_noise(n_mu: float, n_sigma: float, r_mu: float, r_sigma: float) -> None:
    """Validate Alg. 1's constants: n_mu, r_mu, r_sigma >= 0 and n_sigma >= 1, all finite."""
    for name, value, low in (("n_mu", n_mu, 0.0), ("n_sigma", n_sigma, 1.0), ("r_mu", r_mu, 0.0),
                             ("r_sigma", r_sigma, 0.0)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value >= low):
            raise NormlabError(f"{name} must be a finite number >= {low:g}, got {value!r}")


def sample_bn_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    per_position: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Draw Alg. 1's multiplicative noise s and additive noise m for an activation of ``shape`` (N, C, *S).

    Returns ``(s, m)`` of shape (N, C, 1, ..., 1), or ``shape`` itself when ``per_position``. Moments over
    draws: ``E[m] = 0``, ``Var[m] = n_mu^2/3 + r_mu^2/3``, ``E[s] = (1 + n_sigma)/2``,
    ``Var[s] = (n_sigma - 1)^2/12 + r_sigma^2``.
    """
    n, c = shape[0], shape[1]
    spatial = tuple(shape[2:]) if per_position else (1,) * (len(shape) - 2)
    kw = {"generator": generator, "device": device, "dtype": dtype}
    mu = torch.rand(c, **kw).mul_(2 * n_mu).sub_(n_mu)
    sigma = torch.rand(c, **kw).mul_(n_sigma - 1.0).add_(1.0)
    m = torch.rand(n, c, *spatial, **kw).mul_(2 * r_mu).sub_(r_mu)
    s = torch.randn(n, c, *spatial, **kw).mul_(r_sigma)
    view = (1, c) + (1,) * len(spatial)
    return s.add_(sigma.view(view)), m.add_(mu.view(view))


class _NoisyBatchNormFn(torch.autograd.Function):
    """``y = s * (gamma * (x - mean) * invstd + beta) + m`` in one pass, given the batch statistics.

    Forward folds everything into a per-(sample, channel) scale and shift (one ``addcmul`` over x);
    backward is BN's fused backward applied to ``dy * s`` (the chain rule through the noise), which returns
    dx, dgamma = sum(dy s x_hat) and dbeta = sum(dy s). On CPU this took the layer from 1.52x to about
    1.2x of ``nn.BatchNorm2d``'s forward+backward time (before: BN then an autograd ``addcmul``;
    benchmarks/layers.py). s, m, mean and invstd get no gradient: mean and invstd are the batch
    statistics, whose dependence on x the BN backward formula accounts for.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s, m, mean, invstd, eps):
        g = invstd if weight is None else weight * invstd
        shift = -mean * g if bias is None else bias - mean * g
        scale = s * channel_view(g, x)
        out = torch.addcmul(torch.addcmul(m, s, channel_view(shift, x)), x, scale)
        ctx.save_for_backward(x, weight, s, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, s, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                weight is not None and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy * s, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return dx, dw, db, None, None, None, None, None


def noisy_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    per_position: bool = False,
    noise_after_affine: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BN of ``x`` (N, C, *S) followed (training only) by ``s * a + m`` from :func:`sample_bn_noise`.

    ``noise_after_affine=True``: ``y = s * (gamma * x_hat + beta) + m`` (fused, see _NoisyBatchNormFn).
    ``False``:
    ``y = gamma * (s * x_hat + m) + beta``, computed as ``(gamma s) * x_hat + (gamma m + beta)`` so the
    big tensor is touched by one fused ``addcmul``. s and m carry no gradient.
    """
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    s, m = sample_bn_noise(x.shape, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma,
                           per_position=per_position, generator=generator, device=x.device, dtype=x.dtype)
    if noise_after_affine or weight is None:  # without gamma and beta both orders are the same
        mean, var = batch_stats(x)
        if running_mean is not None and running_var is not None:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)
        return _NoisyBatchNormFn.apply(x, weight, bias, s, m, mean, torch.rsqrt(var + eps), eps)
    x_hat = F.batch_norm(x, running_mean, running_var, None, None, True, momentum, eps)
    gamma, beta = channel_view(weight, x), channel_view(bias, x)
    return torch.addcmul(torch.addcmul(beta, gamma, m), x_hat, gamma * s)


class NoisyBatchNorm(BatchStatsNorm):
    """BN plus Santurkar et al.'s Alg. 1 noise in training mode (see :func:`noisy_batch_norm`).

    Shapes: input and output (N, C, *S). Evaluation: plain BN with the running statistics, no noise.
    Running statistics are those of the clean input (the noise comes after normalization). Set
    ``layer.generator`` to a ``torch.Generator`` to draw the noise from it instead of the global RNG.
    """

    def __init__(
        self, num_features: int, *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1,
        r_sigma: float = 0.1, per_position: bool = False, noise_after_affine: bool = True, dims: int = 2,
        eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
    ) -> None:
        super().__init__(num_features, dims=dims, eps=eps, momentum=momentum, affine=affine)
        check_noise(n_mu, n_sigma, r_mu, r_sigma)
        self.noise = {"n_mu": float(n_mu), "n_sigma": float(n_sigma), "r_mu": float(r_mu),
                      "r_sigma": float(r_sigma)}
        self.per_position = bool(per_position)
        self.noise_after_affine = bool(noise_after_affine)
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        momentum = self._next_momentum() if self.training else 0.0
        return noisy_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=self.training,
            momentum=momentum, eps=self.eps, per_position=self.per_position,
            noise_after_affine=self.noise_after_affine, generator=self.generator, **self.noise,
        ).to(x.dtype)  # float32 parameters with fp16/bf16 input: the output keeps the input's dtype

    def extra_repr(self) -> str:
        noise = ", ".join(f"{k}={v}" for k, v in self.noise.items())
        return (f"{super().extra_repr()}, {noise}, per_position={self.per_position}, "
                f"noise_after_affine={self.noise_after_affine}")


@register_norm("noisy_bn")
def noisy_bn(
    num_channels: int, *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1, r_sigma: float = 0.1,
    per_position: bool = False, noise_after_affine: bool = True, dims: int = 2, eps: float = 1e-5,
    momentum: float | None = 0.1, affine: bool = True,
) -> nn.Module:
    return NoisyBatchNorm(num_channels, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma,
                          per_position=per_position, noise_after_affine=noise_after_affine, dims=dims,
                          eps=eps, momentum=momentum, affine=affine)
