"""PyTorch's own normalization layers, registered by name: ``bn``, ``gn``, ``ln``, ``in``, ``none``."""

from __future__ import annotations

from torch import nn

from normlab.errors import NormlabError
from normlab.layers.factory import register_norm

_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_dims(dims: int) -> int:
    if dims not in _BATCHNORMS:
        raise NormlabError(f"dims must be 1, 2 or 3, got {dims!r}")
    return dims


def check_eps(eps: float) -> float:
    if not eps > 0:
        raise NormlabError(f"eps must be > 0, got {eps!r}")
    return eps


def check_momentum(momentum: float | None) -> float | None:
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise NormlabError(f"momentum must be in [0, 1] or None, got {momentum!r}")
    return momentum


@register_norm("bn")
def batch_norm(
    num_channels: int, *, dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True
) -> nn.Module:
    return _BATCHNORMS[check_dims(dims)](
        num_channels, eps=check_eps(eps), momentum=check_momentum(momentum), affine=affine
    )


@register_norm("gn")
def group_norm(
    num_channels: int, *, groups: int = 32, dims: int = 2, eps: float = 1e-5, affine: bool = True
) -> nn.Module:
    """GroupNorm with ``min(groups, num_channels)`` groups (the group count must divide C)."""
    check_dims(dims)
    if not isinstance(groups, int) or groups < 1:
        raise NormlabError(f"groups must be a positive int, got {groups!r}")
    groups = min(groups, num_channels)
    if num_channels % groups:
        raise NormlabError(f"groups={groups} does not divide num_channels={num_channels}")
    return nn.GroupNorm(groups, num_channels, eps=check_eps(eps), affine=affine)


@register_norm("ln")
def layer_norm(num_channels: int, *, dims: int = 2, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """LayerNorm over C and all spatial dims (GroupNorm with one group: per-channel affine parameters)."""
    check_dims(dims)
    return nn.GroupNorm(1, num_channels, eps=check_eps(eps), affine=affine)


@register_norm("in")
def instance_norm(num_channels: int, *, dims: int = 2, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """InstanceNorm: each channel of each example over its spatial dims (GroupNorm with C groups)."""
    check_dims(dims)
    return nn.GroupNorm(num_channels, num_channels, eps=check_eps(eps), affine=affine)


@register_norm("none")
def no_norm(num_channels: int, *, dims: int = 2) -> nn.Module:
    check_dims(dims)
    return nn.Identity()
