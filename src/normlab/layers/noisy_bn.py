"""Noisy Batch Normalization (Santurkar, Tsipras, Ilyas & Madry 2018, arXiv 1805.11604, Sec. 2.1, Alg. 1).

After BN, at every training step, for every channel j draw ``mu_j ~ U(-n_mu, n_mu)`` and
``sigma_j ~ U(1, n_sigma)``; for every activation i of channel j draw ``m_ij ~ U(mu_j - r_mu, mu_j + r_mu)``
and ``s_ij ~ N(sigma_j, r_sigma^2)`` (r_sigma read as a standard deviation) and output ``s_ij * a_ij + m_ij``.
For conv layers i runs over samples *and* positions: the paper follows "the standard convention of treating
the height and width dimensions as part of the batch" and "perturb[s] each activation for each sample", so by
default every activation (n, c, h, w) gets its own m and s (``per_position=True``). The noise makes the
layer's output distribution shift and rescale from step to step — "internal covariate shift" injected on
purpose; the paper finds training about as good as with BN (its Fig. 2 is about training).

Evaluation is the *expectation* of the training-time layer (``eval_expectation=True``, the default): the
noise is independent of the activation, so ``E[s a + m] = E[s] a + E[m]`` with ``E[s] = (1 + n_sigma) / 2``
(1.125 at the paper's constants) and ``E[m] = 0``: BN with the running statistics, scaled by E[s]. Dropping
the noise without this rescaling (``eval_expectation=False``, plain BN) leaves every later layer's running
statistics off by the factor E[s], and the error compounds with depth (measured on the noisy-BN study at
quick scale: 73.7% test accuracy without the rescaling vs 96.7% with it, 95.4% in train mode).

Choices the paper leaves open, as options:
- ``per_position=True`` (default): one (m, s) per activation, H and W counting as batch dimensions;
  ``False`` draws one (m_ij, s_ij) per sample and channel, shared by all positions.
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
from normlab.layers._batchnorm_base import BatchStatsNorm, channel_view, under_vmap
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


def expected_scale(n_sigma: float) -> float:
    """E[s] = E[sigma_j] = (1 + n_sigma) / 2: the eval-mode scale that makes the layer its own expectation."""
    return (1.0 + n_sigma) / 2.0


#: Per-position noise is drawn channel by channel (one fused ``normal_`` / ``uniform_`` call per channel,
#: on a channel-major buffer) when a channel holds at least this many values; below it the python loop's
#: overhead outweighs the two broadcast passes it saves.
_PER_CHANNEL_MIN_VALUES = 4096


def sample_bn_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    per_position: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Draw Alg. 1's multiplicative noise s and additive noise m for an activation of ``shape`` (N, C, *S).

    Returns ``(s, m)`` of ``shape`` itself (``per_position``, default: one draw per activation), or of shape
    (N, C, 1, ..., 1) (one draw per sample and channel). Moments over draws: ``E[m] = 0``,
    ``Var[m] = n_mu^2/3 + r_mu^2/3``, ``E[s] = (1 + n_sigma)/2``, ``Var[s] = (n_sigma - 1)^2/12 + r_sigma^2``.
    Per-position noise on CPU may come back as a non-contiguous (channel-major) view.
    """
    n, c = shape[0], shape[1]
    spatial = tuple(shape[2:]) if per_position else (1,) * (len(shape) - 2)
    kw = {"generator": generator, "device": device, "dtype": dtype}
    mu = torch.rand(c, **kw).mul_(2 * n_mu).sub_(n_mu)
    sigma = torch.rand(c, **kw).mul_(n_sigma - 1.0).add_(1.0)
    if _draws_per_channel(shape, per_position, mu.device):
        return _per_channel_noise(shape, mu, sigma, r_mu, r_sigma, generator)
    m = torch.rand(n, c, *spatial, **kw).mul_(2 * r_mu).sub_(r_mu)
    s = torch.randn(n, c, *spatial, **kw).mul_(r_sigma)
    view = (1, c) + (1,) * len(spatial)
    return s.add_(sigma.view(view)), m.add_(mu.view(view))


def _draws_per_channel(shape: tuple[int, ...] | torch.Size, per_position: bool, device: torch.device) -> bool:
    return per_position and device.type == "cpu" and math.prod(shape) // shape[1] >= _PER_CHANNEL_MIN_VALUES


def _per_channel_noise(
    shape: tuple[int, ...] | torch.Size, mu: Tensor, sigma: Tensor, r_mu: float, r_sigma: float,
    generator: torch.Generator | None, m_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-position (s, m), one fused draw per channel with the channel's own mean and bounds, so the random
    numbers (the dominant cost) are generated once and never touched again. s lives in a channel-major
    buffer (returned as an (N, C, *S) view); m is drawn straight into ``m_out`` (N, C, *S) when given (the
    layer's output buffer: one tensor fewer to allocate) or into a channel-major buffer."""
    n, c, spatial = shape[0], shape[1], tuple(shape[2:])
    s = mu.new_empty((c, n, *spatial))
    m = mu.new_empty((c, n, *spatial)).transpose(0, 1) if m_out is None else m_out
    for j, (mu_j, sigma_j) in enumerate(zip(mu.tolist(), sigma.tolist(), strict=True)):
        s[j].normal_(sigma_j, r_sigma, generator=generator)
        m[:, j].uniform_(mu_j - r_mu, mu_j + r_mu, generator=generator)
    return s.transpose(0, 1), m


class _NoisyBNPerPositionFn(torch.autograd.Function):
    """``y = s * BN(x) + m`` with per-activation s, m: one fused BN forward, then ``m += s * a`` in place (m,
    laid out like x, becomes the output: no further tensor); backward is ``dy * s`` (the chain rule through
    the noise, reusing the saved s) fed to BN's fused backward, which returns dx, dgamma = sum(dy s x_hat)
    and dbeta = sum(dy s). BN's output is not kept (only x and s). ``native_batch_norm`` also updates the
    running statistics (unbiased batch variance, as torch BN).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s, m, running_mean, running_var, momentum, eps):
        a, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum,
                                                  eps)
        if under_vmap(a) or under_vmap(s):
            out = torch.addcmul(m, s, a)
        else:
            ctx.mark_dirty(m)
            out = m.addcmul_(s, a)
        ctx.save_for_backward(x, weight, s, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, _, s, _, _ = ctx.saved_tensors
        # out= keeps x's layout (s may be a channel-major view); vmapped gradients take the functional mul.
        dy_s = dy * s if under_vmap(dy) else torch.mul(dy, s, out=torch.empty_like(x))
        return (*_bn_backward(ctx, dy_s), None, None, None, None, None, None)


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
        s = ctx.saved_tensors[2]
        return (*_bn_backward(ctx, dy * s), None, None, None, None, None)


def _bn_backward(ctx, dy_s: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """BN's fused backward for ``dy * s`` (the chain rule through the noise): (dx, dgamma, dbeta), given the
    ``(x, weight, s, mean, invstd)`` a noisy-BN Function saved."""
    x, weight, _, mean, invstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
            weight is not None and ctx.needs_input_grad[2]]
    return torch.ops.aten.native_batch_norm_backward(
        dy_s, x, weight, None, None, mean, invstd, True, ctx.eps, mask
    )


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
    per_position: bool = True,
    noise_after_affine: bool = True,
    eval_expectation: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BN of ``x`` (N, C, *S) followed (training only) by ``s * a + m`` from :func:`sample_bn_noise`.

    ``noise_after_affine=True``: ``y = s * (gamma * x_hat + beta) + m`` (fused, see _NoisyBNPerPositionFn
    and _NoisyBatchNormFn). ``False``: ``y = gamma * (s * x_hat + m) + beta``, computed as
    ``(gamma s) * x_hat + (gamma m + beta)`` so the big tensor is touched by one fused ``addcmul``. s and m
    carry no gradient.

    Evaluation (``training=False``) with ``eval_expectation=True`` is the expectation over the noise, BN with
    the running statistics and ``E[s] = (1 + n_sigma) / 2``, ``E[m] = 0``: ``E[s] * (gamma x_hat + beta)``
    after the affine, ``gamma * E[s] * x_hat + beta`` before it. ``eval_expectation=False``: plain BN.
    """
    if not training:
        if not eval_expectation:
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        scale = expected_scale(n_sigma)
        if weight is None:
            weight = torch.full((x.shape[1],), scale, device=x.device, dtype=x.dtype)
            bias = None if bias is None else bias * scale
        else:
            weight = weight * scale
            bias = bias * scale if noise_after_affine and bias is not None else bias
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if per_position and (noise_after_affine or weight is None):
        if _draws_per_channel(x.shape, True, x.device):
            # The same draws as sample_bn_noise, with m written straight into the output buffer.
            kw = {"generator": generator, "device": x.device, "dtype": x.dtype}
            mu = torch.rand(x.shape[1], **kw).mul_(2 * n_mu).sub_(n_mu)
            sigma = torch.rand(x.shape[1], **kw).mul_(n_sigma - 1.0).add_(1.0)
            s, m = _per_channel_noise(x.shape, mu, sigma, r_mu, r_sigma, generator, m_out=torch.empty_like(x))
        else:
            s, m = sample_bn_noise(x.shape, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma,
                                   generator=generator, device=x.device, dtype=x.dtype)
        return _NoisyBNPerPositionFn.apply(x, weight, bias, s, m.contiguous(), running_mean, running_var,
                                           momentum, eps)
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

    Shapes: input and output (N, C, *S). Evaluation: the expectation of the training-time layer, BN with the
    running statistics times E[s] = (1 + n_sigma) / 2 (``eval_expectation=True``; ``False``: plain BN).
    Running statistics are those of the clean input (the noise comes after normalization). Set
    ``layer.generator`` to a ``torch.Generator`` to draw the noise from it instead of the global RNG.
    """

    def __init__(
        self, num_features: int, *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1,
        r_sigma: float = 0.1, per_position: bool = True, noise_after_affine: bool = True,
        eval_expectation: bool = True, dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, dims=dims, eps=eps, momentum=momentum, affine=affine)
        check_noise(n_mu, n_sigma, r_mu, r_sigma)
        self.noise = {"n_mu": float(n_mu), "n_sigma": float(n_sigma), "r_mu": float(r_mu),
                      "r_sigma": float(r_sigma)}
        self.per_position = bool(per_position)
        self.noise_after_affine = bool(noise_after_affine)
        self.eval_expectation = bool(eval_expectation)
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        momentum = self._next_momentum() if self.training else 0.0
        return noisy_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=self.training,
            momentum=momentum, eps=self.eps, per_position=self.per_position,
            noise_after_affine=self.noise_after_affine, eval_expectation=self.eval_expectation,
            generator=self.generator, **self.noise,
        ).to(x.dtype)  # float32 parameters with fp16/bf16 input: the output keeps the input's dtype

    def extra_repr(self) -> str:
        noise = ", ".join(f"{k}={v}" for k, v in self.noise.items())
        return (f"{super().extra_repr()}, {noise}, per_position={self.per_position}, "
                f"noise_after_affine={self.noise_after_affine}, eval_expectation={self.eval_expectation}")


@register_norm("noisy_bn")
def noisy_bn(
    num_channels: int, *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1, r_sigma: float = 0.1,
    per_position: bool = True, noise_after_affine: bool = True, eval_expectation: bool = True, dims: int = 2,
    eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
) -> nn.Module:
    return NoisyBatchNorm(num_channels, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma,
                          per_position=per_position, noise_after_affine=noise_after_affine,
                          eval_expectation=eval_expectation, dims=dims, eps=eps, momentum=momentum,
                          affine=affine)
