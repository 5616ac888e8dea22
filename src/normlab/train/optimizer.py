"""The optimizer of a run: SGD (momentum, Nesterov) or AdamW, with weight decay on weights only.

``wd_exclude_norm_bias``: parameters with fewer than 2 dimensions (norm gains/biases, biases, SkipInit and
NF skip gains) get no weight decay, as in nanoGPT and timm's ``param_groups_weight_decay``. Under BN the
decay of a pre-norm weight only acts as an effective learning-rate increase (van Laarhoven 2017), while the
decay of a norm gain is the explicit "gamma decay" regulariser of Luo et al. 2019; both are left to the
config.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool) -> list[dict]:
    """``[{params: decayed}, {params: not decayed, weight_decay: 0}]`` (empty groups dropped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``model``'s trainable parameters."""
    groups = param_groups(model, config.weight_decay, config.wd_exclude_norm_bias)
    # PyTorch picks the per-tensor Python loop on the CPU; the fused multi-tensor (_foreach) kernels do the
    # same arithmetic with one call per group, which matters for the small models normlab trains on CPUs.
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, foreach=True
        )
    # config.momentum is SGD's; AdamW keeps its published betas (0.9, 0.999) so "adamw" is one optimizer.
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)
