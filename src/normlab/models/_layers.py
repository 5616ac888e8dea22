"""Dimension-generic building parts shared by the models: convs, pools, activations, init.

Every model works on 1-D signals (``dims=1``: (N, C, L)) and images (``dims=2``: (N, C, H, W)); these
helpers pick the PyTorch class for ``dims`` so model code is written once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d}
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "selu": nn.SELU,
    "identity": nn.Identity,
}


def check_choice(what: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise NormlabError(f"{what} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_positive_int(what: str, value: object) -> int:
    """``value`` as an int >= 1; an integral float (25.0, as config files give) is accepted."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NormlabError(f"{what} must be a positive int, got {value!r}")
    return value


def check_positive_float(what: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise NormlabError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def make_norm(norm: str, channels: int, dims: int, options: dict) -> nn.Module:
    """``create_norm(norm, channels, dims=dims, **options)``: the one place models build a norm layer.

    GroupNorm without an explicit ``groups`` uses :func:`normlab.layers.standard.default_groups` (the largest
    divisor of C up to 32 that leaves >= 2 channels per group), so widths such as the MLP's 100 (25 groups)
    or the MNIST-1D CNN's 25 (5 groups) are Group Norm, never Instance Norm.
    """
    from normlab.layers import create_norm

    return create_norm(norm, channels, dims=dims, **options)


def nf_eps(options: dict) -> float:
    """The Scaled WS eps from ``norm_options`` of ``norm="nf"`` (only ``eps`` is meaningful there)."""
    unknown = sorted(set(options) - {"eps"})
    if unknown:
        raise NormlabError(f"unknown option(s) {', '.join(unknown)} for norm 'nf'; valid options: eps")
    eps = options.get("eps", 1e-5)
    return check_positive_float("eps", eps)


def blocks_per_stage(name: str, depth: int, offset: int, examples: str) -> int:
    """n for depth = 6n + offset (2 for ResNet: stem + classifier; 4 for WRN: also counts 2 projections)."""
    n, rest = divmod(depth - offset, 6)
    if rest or n < 1:
        raise NormlabError(f"{name} depth must be 6n+{offset} with n >= 1 (e.g. {examples}), got {depth}")
    return n


def check_dropout(dropout: float) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise NormlabError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def list_activations() -> list[str]:
    return sorted(_ACTIVATIONS)


def create_act(name: str) -> nn.Module:
    """The activation module called ``name`` (the names ``normlab.layers.activation_gamma`` knows)."""
    check_choice("activation", name, list_activations())
    return _ACTIVATIONS[name]()


def conv(
    dims: int, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True
) -> nn.Module:
    return _CONVS[dims](in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)


def scaled_std_conv(
    dims: int,
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    gamma: float,
    eps: float,
) -> nn.Module:
    """Scaled Weight-Standardized conv (Brock et al. 2021a) for 1-D or 2-D input."""
    from normlab.layers import ScaledStdConv1d, ScaledStdConv2d

    cls = ScaledStdConv1d if dims == 1 else ScaledStdConv2d
    return cls(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=True, gamma=gamma, eps=eps)


def scaled_std_linear(
    in_features: int, out_features: int, *, gamma: float, eps: float, bias: bool = True
) -> nn.Module:
    from normlab.layers import ScaledStdLinear

    return ScaledStdLinear(in_features, out_features, bias=bias, gamma=gamma, eps=eps)


def activation_gamma(name: str) -> float:
    """The activation's gain constant gamma (science.md section 4), from ``normlab.layers``."""
    from normlab.layers import activation_gamma as gamma_of

    return float(gamma_of(name))


class MaxPool(nn.Module):
    """2x max-pooling (stride 2) over every spatial dim that is at least 2 long; a dim of size 1 is kept.

    VGG halves the resolution five times (32 -> 1); on shorter inputs a dim that has already shrunk to 1
    is left alone instead of failing, so VGG-A runs on MNIST-1D (length 40 -> 20, 10, 5, 2, 1) and on any
    input of size >= 1 with the paper's layer sequence unchanged.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = [2 if s >= 2 else 1 for s in x.shape[2:]]
        if self.dims == 1:
            return F.max_pool1d(x, kernel, kernel)
        return F.max_pool2d(x, kernel, kernel)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, kernel_size=2, stride=2"


def global_avg_pool(dims: int) -> nn.Module:
    """(N, C, *spatial) -> (N, C): the mean over every spatial position."""
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(pool, nn.Flatten(1))


def conv_out_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a conv along one dim: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel_size) // stride + 1


def glorot_init_(model: nn.Module) -> None:
    """Glorot & Bengio (2010) uniform init, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), for every conv
    and linear weight; biases 0; norm scales 1 and shifts 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    reset_norms_(model)


def he_init_(model: nn.Module) -> None:
    """He et al. (2015) init as the pre-activation ResNet code (fb.resnet.torch) does: conv weights
    N(0, 2 / (k^d * C_out)) (fan-out), linear bias 0 (weight: PyTorch default), norm scales 1, shifts 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    reset_norms_(model)


def reset_norms_(model: nn.Module) -> None:
    for m in model.modules():
        if (
            isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            and m.weight is not None
        ):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FlattenTo(nn.Module):
    """Flatten (N, ...) to (N, features), with a clear error when the input has the wrong size.

    Models whose classifier sees flattened features (MLP, the MNIST-1D CNN) are built for one input size;
    without this check a wrong size would surface as an opaque matmul shape error.
    """

    def __init__(self, features: int, hint: str) -> None:
        super().__init__()
        self.features = features
        self.hint = hint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.features:
            raise NormlabError(
                f"input has {x.shape[1]} features per example after flattening, the model expects "
                f"{self.features}; {self.hint}"
            )
        return x

    def extra_repr(self) -> str:
        return f"features={self.features}"
