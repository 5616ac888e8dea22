"""Seeded non-trivial normalization state, so that an eval-mode cross-check exercises the formula.

A freshly built model has gamma = 1, beta = 0, running_mean = 0, running_var = 1: eval-mode BN is then the
identity map up to eps and cannot reveal a gamma/beta swap or a wrong use of the running statistics.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_norm_state(model: nn.Module, seed: int = 0) -> nn.Module:
    """In place: gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5^2), running_mean ~ N(0, 0.5^2), running_var ~ U(0.5, 2)
    for every BatchNorm/GroupNorm/LayerNorm of ``model``; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, norms):
                continue
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))
    return model
