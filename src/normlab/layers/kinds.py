"""Which modules count as normalization layers, for :func:`convert_norm`, :func:`precise_bn` and
:func:`fold_bn`."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.layers._batchnorm_base import BatchStatsNorm
from normlab.layers.frozen_bn import FrozenBatchNorm
from normlab.layers.noise import NoiseInjection

NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm, BatchStatsNorm, FrozenBatchNorm, NoiseInjection,
)


def is_norm(module: nn.Module) -> bool:
    """A normalization layer :func:`convert_norm` replaces (torch's BN/GN/LN/IN and normlab's own)."""
    return isinstance(module, NORM_TYPES)


def has_batch_stats(module: nn.Module) -> bool:
    """A layer that normalizes with batch statistics in training and keeps running ones (BN and variants)."""
    return isinstance(module, (_BatchNorm, BatchStatsNorm)) and module.running_mean is not None
