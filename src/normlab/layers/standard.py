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


MAX_GROUPS = 32  # Wu & He 2018, Sec. 4.1: G = 32 by default
MIN_GROUP_SIZE = 2  # channels per group: one channel per group is Instance Norm, not Group Norm


def default_groups(num_channels: int) -> int:
    """Group Norm's default group count for ``num_channels`` channels: the largest divisor ``G`` of C with
    ``G <= 32`` (Wu & He 2018 use G = 32) that leaves at least 2 channels per group (``C / G >= 2``), so GN
    never silently becomes Instance Norm (C / G = 1). E.g. 16 -> 8, 24 -> 12, 25 -> 5, 48 -> 24, 64 -> 32,
    96 -> 32, 100 -> 25, 512 -> 32. One channel has one group (the only grouping there is).
    """
    if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
        raise NormlabError(f"num_channels must be a positive int, got {num_channels!r}")
    fitting = [
        g for g in range(1, MAX_GROUPS + 1) if num_channels % g == 0 and num_channels // g >= MIN_GROUP_SIZE
    ]
    return max(fitting, default=1)


@register_norm("gn")
def group_norm(
    num_channels: int, *, groups: int | None = None, dims: int = 2, eps: float = 1e-5, affine: bool = True
) -> nn.Module:
    """GroupNorm (Wu & He 2018, eq. 1-3) with ``groups`` groups; None = :func:`default_groups` (C).

    An explicit ``groups`` must divide C; ``groups == C`` is Instance Norm and is allowed when asked for.
    """
    check_dims(dims)
    if groups is None:
        groups = default_groups(num_channels)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise NormlabError(f"groups must be a positive int, got {groups!r}")
    if groups > num_channels or num_channels % groups:
        raise NormlabError(
            f"groups={groups} does not divide num_channels={num_channels}; "
            f"omit groups for the default ({default_groups(num_channels)} groups for {num_channels} channels)"
        )
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
