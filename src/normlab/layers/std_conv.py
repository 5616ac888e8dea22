"""Scaled Weight Standardization convolutions and linear layers (Brock, De & Smith 2021a, arXiv 2101.08692,
Sec. 4 / Eq. 3; used by NF-ResNets and NFNets, Brock et al. 2021b, arXiv 2102.06171).

Per output unit i with fan-in N (all weights feeding unit i):

    W_hat_i = gain_i * gamma * (W_i - mean(W_i)) / (std(W_i) * sqrt(N)),   std biased, eps added to var

so that a unit-variance input gives a unit-variance pre-activation at initialization whatever the weights'
scale; gamma is the activation's gain (:func:`normlab.layers.activation_gamma`), gain_i a learnable
per-unit scale (init ``gain_init``). Official code: deepmind-research ``nfnets/base.py`` (WSConv2D); timm
``timm/layers/std_conv.py`` (ScaledStdConv2d), which this follows.

NOTE: DeepMind computes ``(W - mean) * rsqrt(max(N * var, 1e-4))`` and applies gamma after the activation;
here, as in timm, eps is added to the variance (``rsqrt(var + eps) / sqrt(N)``) and gamma is folded into
the weight. The two agree whenever N * var >> 1e-4 and var >> eps (always, for sensibly initialized
weights); folding gamma into the weight instead of scaling the activation gives the same function, since the
scaled activation only feeds this layer, and saves one elementwise pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.errors import NormlabError


def scaled_std_weight(weight: Tensor, gain: Tensor, gamma: float, eps: float) -> Tensor:
    """``gain_i * gamma * (W_i - mean W_i) / (sqrt(var W_i + eps) * sqrt(N))`` for W of shape (out, ...).

    One fused ``F.batch_norm`` over the weight viewed as (1, out, N): "batch" statistics per channel are
    exactly the per-unit mean and biased variance; its affine weight carries ``gain * gamma / sqrt(N)``.
    """
    out, fan_in = weight.shape[0], weight[0].numel()
    scale = gain.reshape(-1) * (gamma / math.sqrt(fan_in))
    return F.batch_norm(
        weight.reshape(1, out, -1), None, None, weight=scale, training=True, momentum=0.0, eps=eps
    ).reshape_as(weight)


def _check_ws_options(gamma: float, eps: float, gain_init: float) -> None:
    for name, value, strictly_positive in (("gamma", gamma, True), ("eps", eps, True),
                                           ("gain_init", gain_init, False)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (strictly_positive and value <= 0):
            allowed = "a finite number > 0" if strictly_positive else "a finite number"
            raise NormlabError(f"{name} must be {allowed}, got {value!r}")


class _ScaledStd:
    """The shared part of the Scaled WS layers: the ``gain`` parameter and the standardized weight."""

    weight: Tensor
    gain: nn.Parameter

    def _init_ws(self, gamma: float, eps: float, gain_init: float) -> None:
        _check_ws_options(gamma, eps, gain_init)
        self.gamma = float(gamma)
        self.eps = float(eps)
        shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
        self.gain = nn.Parameter(torch.full(shape, float(gain_init), device=self.weight.device,
                                            dtype=self.weight.dtype))

    def standardized_weight(self) -> Tensor:
        return scaled_std_weight(self.weight, self.gain, self.gamma, self.eps)


class ScaledStdConv1d(_ScaledStd, nn.Conv1d):
    """``nn.Conv1d`` with Scaled Weight Standardization (module docstring). Input (N, C_in, L)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int | str = 0,
        dilation: int = 1, groups: int = 1, bias: bool = True, *, gamma: float = 1.0, eps: float = 1e-5,
        gain_init: float = 1.0,
    ) -> None:
        nn.Conv1d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=bias)
        self._init_ws(gamma, eps, gain_init)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.6g}, eps={self.eps}"


class ScaledStdConv2d(_ScaledStd, nn.Conv2d):
    """``nn.Conv2d`` with Scaled Weight Standardization (module docstring). Input (N, C_in, H, W)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1, padding: int | str | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, *, gamma: float = 1.0,
        eps: float = 1e-5, gain_init: float = 1.0,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=bias)
        self._init_ws(gamma, eps, gain_init)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.6g}, eps={self.eps}"


class ScaledStdLinear(_ScaledStd, nn.Linear):
    """``nn.Linear`` with Scaled Weight Standardization (module docstring): fan-in N = in_features."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, gamma: float = 1.0,
        eps: float = 1e-5, gain_init: float = 1.0,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_ws(gamma, eps, gain_init)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.6g}, eps={self.eps}"
