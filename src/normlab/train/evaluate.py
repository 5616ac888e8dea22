"""Loss and accuracy of a model on a whole split, in evaluation mode, in fixed-size chunks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    classification: bool,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over ``x`` (N, ...), ``y`` (N,) or (N, D) in eval mode; accuracy is NaN for
    regression. ``loss_fn`` must average over its batch (the chunk means are re-weighted by chunk size).
    The model's train/eval flag is restored afterwards."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, x.shape[0]
    try:
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            out = model(xb)
            total_loss += loss_fn(out, yb).item() * xb.shape[0]
            if classification:
                correct += (out.argmax(dim=1) == yb).sum().item()
    finally:
        model.train(was_training)
    return total_loss / n, (correct / n if classification else math.nan)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    classification: bool,
) -> tuple[float, float]:
    """:func:`evaluate` over batches streamed from a loader (moved to ``device``), weighted by batch size."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        for xb, yb in batches:
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            total_loss += loss_fn(out, yb).item() * xb.shape[0]
            n += xb.shape[0]
            if classification:
                correct += (out.argmax(dim=1) == yb).sum().item()
    finally:
        model.train(was_training)
    return total_loss / n, (correct / n if classification else math.nan)
