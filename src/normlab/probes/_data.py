"""Input checks and batching shared by the probes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def check_batch(x: object, y: object | None = None, *, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise NormlabError(f"{name} must be a tensor with a batch dimension of at least 1 example, got {got}")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise NormlabError(f"targets must be a tensor with {x.shape[0]} rows like {name}, got {got}")


def check_labels(y: torch.Tensor) -> None:
    if y.dim() != 1 or y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise NormlabError(
            f"class labels must be a 1-D integer tensor, got dtype {y.dtype} and shape {tuple(y.shape)}"
        )


def check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NormlabError(f"{name} must be a positive int, got {value!r}")
    return value


def full_batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of exactly ``batch_size`` examples; a trailing partial batch is dropped because
    train-mode outputs depend on the batch size being measured."""
    if n < batch_size:
        raise NormlabError(f"batch_size={batch_size} is larger than the {n} examples given")
    return [slice(i, i + batch_size) for i in range(0, n - batch_size + 1, batch_size)]


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer class targets, mean squared error otherwise."""
    if target.is_floating_point():
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def unpack(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` or ``(x, y)`` (as a data iterator or the trainer's ``ctx.batch`` gives it) -> ``(x, y|None)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise NormlabError(f"a batch must be a tensor x or a pair (x, y), got {type(batch).__name__}")


def loss_inputs(model: nn.Module, batch, mode: str, loss_fn, probe: str, purpose: str = ""):
    """``(x, y, loss_fn, params)`` of a probe that evaluates the loss: a batch with targets checked for
    ``mode``, the default loss when None, the model's trainable parameters (at least one; ``purpose`` ends
    that message, e.g. " to move along")."""
    from normlab.probes._state import check_batch_for_mode

    x, y = unpack(batch)
    if y is None:
        raise NormlabError(f"{probe} needs a batch (x, y) with targets to compute the loss, got x only")
    check_batch(x, y)
    check_batch_for_mode(model, x.shape[0], mode)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NormlabError(f"{type(model).__name__} has no trainable parameters{purpose}")
    return x, y, loss_fn or default_loss, params
