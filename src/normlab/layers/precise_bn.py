"""PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv 2105.07576, Sec. 3).

The EMA that BN keeps during training is a biased estimate of the population statistics: it mixes statistics
of models from many steps ago and is dominated by the last few. PreciseBN recomputes them on the final,
frozen model: run it in training mode over a few thousand samples and average the per-batch statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.layers.kinds import has_batch_stats


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable, *, num_batches: int | None = None) -> nn.Module:
    """Replace every BN-like layer's running statistics by their exact average over ``batches``; return model.

    Each batch (a tensor, or a tuple/list whose first item is the input) goes through the model in training
    mode without gradient. For every BN-like layer (torch ``BatchNorm*d``/``SyncBatchNorm`` with running
    statistics, normlab's ghost/renorm/noisy/EvalNorm layers), with K batches and per-batch statistics
    mu_k and var_k (var_k unbiased, as PyTorch puts into ``running_var``):

        running_mean = (1/K) sum_k mu_k,        running_var = (1/K) sum_k var_k

    every batch weighted equally — the quantity BN's EMA estimates, without its bias towards recent steps
    (the estimator of fvcore/detectron2 ``update_bn_stats``, by the paper's authors). Each layer sees the
    training-mode activations of the layers before it, as in training. A ghost-BN layer averages over its
    ghost batches. It is computed with PyTorch's cumulative average (``momentum=None``).

    Parameters, train/eval flags, momenta and every other buffer (``num_batches_tracked``, renorm step
    counters) are restored; only ``running_mean`` and ``running_var`` change.

    Raises:
        NormlabError: the model has no BN-like layer with running statistics, ``num_batches < 1``, or the
            iterator yields no batch (the statistics are then left untouched).
    """
    layers = [m for m in model.modules() if has_batch_stats(m)]
    if not layers:
        raise NormlabError(
            f"precise_bn: {type(model).__name__} has no BatchNorm layer with running statistics"
        )
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise NormlabError(f"precise_bn: num_batches must be a positive int or None, got {num_batches!r}")
    keep = {id(m.running_mean) for m in layers} | {id(m.running_var) for m in layers}
    saved = {name: b.clone() for name, b in model.named_buffers()}
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    seen = 0
    try:
        for m in layers:
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.num_batches_tracked.zero_()
            m.momentum = None
        model.train()
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
    finally:
        for m, flag in flags.items():
            m.training = flag
        for m, momentum in momenta.items():
            m.momentum = momentum
        for name, b in model.named_buffers():
            if seen == 0 or id(b) not in keep:
                b.copy_(saved[name])
    if seen == 0:
        raise NormlabError("precise_bn: the batch iterator yielded no batch")
    return model
