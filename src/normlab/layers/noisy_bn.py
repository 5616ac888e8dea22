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

Speed floor (CPU). Per-position noise needs two random tensors of x's size every step, one ``normal_`` and
one ``uniform_`` fill (one serial mt19937 draw per value in torch's CPU generator; ``normal_`` is a
``uniform_`` fill plus a vectorized Box-Muller pass). Those fills alone take 1.0-1.25x of
``nn.BatchNorm2d``'s forward+backward at (128, 64, 32, 32) float32 (benchmarks/layers.py prints the ratio,
measured in the same run), so this layer cannot come below ~2-2.25x BN's time whatever it fuses; the
earlier 1.3x goal is withdrawn (issue 26), since the generator's raw output alone (``random_`` on
int32, 1.5 words per activation for two 24-bit draws) is ~0.5x BN's forward+backward. The other generators
in reach are slower still (one thread, 8.4M float32 values: numpy's PCG64 / SFC64 uniform 15 ms but
normal 67-78 ms; jax's threefry 87 ms each; torch ``uniform_`` 24 ms, ``normal_`` 40 ms; inductor's
compiled ``rand`` + ``randn``, ~8x slower than torch's pair). What the layer adds on top of BN and the fills:
one ``addcmul`` pass (forward), one ``mul`` pass (backward) and the page faults of the fresh s it saves for
backward (about 0.4-0.6x BN together). Measured on a loaded 2-core machine, medians of same-round ratios:
2.5-2.8x BN in all, from 2.8-3.5x before :class:`_NoisyBNFn` wrote BN into the output and reused one
scratch buffer for m and ``dy * s``. One draw per sample and channel (``per_position=False``) has no such
floor: 1.2-1.3x.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm, channel_view, under_vmap
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


def _channel_params(c: int, n_mu: float, n_sigma: float, **kw) -> tuple[Tensor, Tensor]:
    """Alg. 1's per-channel draws ``mu_j ~ U(-n_mu, n_mu)`` and ``sigma_j ~ U(1, n_sigma)``, in that order."""
    mu = torch.rand(c, **kw).mul_(2 * n_mu).sub_(n_mu)
    sigma = torch.rand(c, **kw).mul_(n_sigma - 1.0).add_(1.0)
    return mu, sigma


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
    mu, sigma = _channel_params(c, n_mu, n_sigma, **kw)
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
    buffer (returned as an (N, C, *S) view): ``normal_`` takes its vectorized path only on contiguous memory
    (on a strided (N, *S) view it is ~4x slower). m is drawn straight into ``m_out`` (N, C, *S) when given
    (the layer's reused scratch buffer) or into a channel-major buffer."""
    n, c, spatial = shape[0], shape[1], tuple(shape[2:])
    s = mu.new_empty((c, n, *spatial))
    m = mu.new_empty((c, n, *spatial)).transpose(0, 1) if m_out is None else m_out
    for j, (mu_j, sigma_j) in enumerate(zip(mu.tolist(), sigma.tolist(), strict=True)):
        s[j].normal_(sigma_j, r_sigma, generator=generator)
        m[:, j].uniform_(mu_j - r_mu, mu_j + r_mu, generator=generator)
    return s.transpose(0, 1), m


class _NoisyBNFn(torch.autograd.Function):
    """``y = s * BN(x) + m`` (noise after gamma and beta), s and m per activation or per (sample, channel).

    Forward: one fused ``native_batch_norm`` writing BN's output straight into the output tensor (it also
    updates the running statistics, unbiased batch variance as torch BN), then ``out <- m + s * out`` in
    place, one ``addcmul``. Backward: ``dy * s`` (the chain rule through the noise, the only use of s) into
    a reused scratch buffer, then BN's fused backward, which returns dx, dgamma = sum(dy s x_hat) and
    dbeta = sum(dy s). Saved: x, gamma, s and the batch statistics; no BN output, no m.

    So on CPU the layer allocates what BN does (output, dx) plus s, which backward needs; m and ``dy * s``
    live in :func:`_scratch_like`'s buffer. Each fresh tensor of tens of MB costs a pass of page faults on
    CPU (glibc serves it with a new ``mmap``): the former version, with BN's output, m and ``dy * s`` as
    fresh tensors, took 2.8-3.5x ``nn.BatchNorm2d``'s forward+backward, this one 2.5-2.8x, of which the two
    random fills alone are ~1.0-1.25x (benchmarks/layers.py, its "floor" line, and the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, s, m, running_mean, running_var, momentum, eps):
        # (An old-style Function never runs under torch.func.vmap, so the out= kernels are safe here.)
        if x.device.type == "cpu":
            stat_dtype = x.dtype if weight is None else weight.dtype  # the CPU kernel's statistics dtype
            out = torch.empty_like(x)
            mean = x.new_empty(x.shape[1], dtype=stat_dtype)
            invstd = x.new_empty(x.shape[1], dtype=stat_dtype)
            torch.ops.aten.native_batch_norm.out(x, weight, bias, running_mean, running_var, True, momentum,
                                                 eps, out=out, save_mean=mean, save_invstd=invstd)
        else:  # elsewhere the statistics' dtype rules differ, and a caching allocator makes out= moot
            out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                        momentum, eps)
        torch.addcmul(m, s, out, out=out)
        ctx.save_for_backward(x, weight, s, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, s, mean, invstd = ctx.saved_tensors
        grads = _bn_backward_times_noise(dy, x, weight, s, mean, invstd, ctx.eps, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None)


def _bn_backward_times_noise(
    dy: Tensor, x: Tensor, weight: Tensor | None, s: Tensor, mean: Tensor, invstd: Tensor, eps: float,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dgamma, dbeta) of ``s * BN(x) + m``: BN's fused backward of ``dy * s``. On CPU ``dy * s`` goes
    into a reused scratch buffer (:func:`_scratch_like`); vmapped gradients (``is_grads_batched``) take the
    functional ``mul``. The functional backward kernel, not its ``out=`` form: that one is generated as the
    functional kernel plus a copy into ``out``, so writing dx over ``dy * s`` would cost a pass."""
    if under_vmap(dy):
        dy_s = dy * s
    else:
        dy_s = torch.mul(dy, s, out=_scratch_like(x) if x.device.type == "cpu" else torch.empty_like(x))
    mask = [needs[0], weight is not None and needs[1], weight is not None and needs[2]]
    return torch.ops.aten.native_batch_norm_backward(dy_s, x, weight, None, None, mean, invstd, True, eps,
                                                     mask)


_scratch = threading.local()


def _scratch_like(x: Tensor) -> Tensor:
    """A contiguous CPU tensor of x's shape and dtype, a view of one buffer per thread and dtype that grows
    to the largest size asked for and is reused by every later call.

    Only for values that die within the call that asks: m (folded into the output before forward returns)
    and ``dy * s`` (consumed by BN's backward kernel before backward returns). Why: CPU tensors of tens of
    MB are served by a fresh ``mmap`` each time and the first write to every page faults; at the benchmark's
    (128, 64, 32, 32) float32 each such pass costs about 0.15-0.2x of ``nn.BatchNorm2d``'s forward+backward.
    Cost: one buffer the size of the largest noisy-BN input, kept.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(x.dtype)
    if buffer is None or buffer.numel() < x.numel():
        buffer = buffers[x.dtype] = torch.empty(x.numel(), dtype=x.dtype)
    return buffer[: x.numel()].view(x.shape)


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

    ``noise_after_affine=True``: ``y = s * (gamma * x_hat + beta) + m`` (fused, see :class:`_NoisyBNFn`).
    ``False``: ``y = gamma * (s * x_hat + m) + beta``, computed as ``(gamma s) * x_hat + (gamma m + beta)`` so
    the big tensor is touched by one fused ``addcmul``. s and m carry no gradient.

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
    if noise_after_affine or weight is None:  # without gamma and beta both orders are the same
        if _draws_per_channel(x.shape, per_position, x.device):
            # The same draws as sample_bn_noise, with m drawn into the reused scratch buffer.
            mu, sigma = _channel_params(x.shape[1], n_mu, n_sigma, generator=generator, device=x.device,
                                        dtype=x.dtype)
            s, m = _per_channel_noise(x.shape, mu, sigma, r_mu, r_sigma, generator, m_out=_scratch_like(x))
        else:
            s, m = sample_bn_noise(x.shape, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma,
                                   per_position=per_position, generator=generator, device=x.device,
                                   dtype=x.dtype)
        return _NoisyBNFn.apply(x, weight, bias, s, m, running_mean, running_var, momentum, eps)
    s, m = sample_bn_noise(x.shape, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma,
                           per_position=per_position, generator=generator, device=x.device, dtype=x.dtype)
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
