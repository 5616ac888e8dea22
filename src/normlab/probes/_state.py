"""Keep a probe from changing anything: parameters, buffers (BN running stats), train/eval flags, RNG.

Existing tools switch to eval mode or refuse BN in training mode; normlab measures in training mode with
batch statistics, which updates BN running statistics as a side effect. :func:`preserved` snapshots
everything a forward pass in either mode could touch and restores it in place (same tensor objects, so an
optimizer holding the parameters keeps working), bit for bit.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from normlab.errors import NormlabError

MODES = ("train", "eval")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise NormlabError(f"mode must be 'train' or 'eval', got {mode!r}")
    return mode


def batch_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that normalize with batch statistics in training mode: PyTorch's BatchNorm (any
    ``_BatchNorm``, SyncBatchNorm included) and normlab's BN-like layers (ghost BN, Batch Renorm, noisy BN,
    EvalNorm: ``normlab.layers.BatchStatsNorm``)."""
    from normlab.layers import BatchStatsNorm

    kinds = (nn.modules.batchnorm._BatchNorm, BatchStatsNorm)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def check_batch_for_mode(model: nn.Module, batch_size: int, mode: str, what: str = "batch") -> None:
    """BN in training mode normalizes over the batch: one example gives a zero variance (or an error)."""
    if mode == "train" and batch_size < 2 and batch_stat_layers(model):
        raise NormlabError(
            f"{what} of {batch_size} example(s) is too small for mode='train': the model has BatchNorm "
            "layers that normalize over the batch; use a batch of at least 2 or mode='eval'"
        )


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), numpy and Python RNG states on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextlib.contextmanager
def preserved(model: nn.Module, *, parameters: bool = True) -> Iterator[nn.Module]:
    """Snapshot buffers, every module's ``training`` flag and the RNG states, and unless
    ``parameters=False`` (for probes that only run forward passes without gradient) the parameters and
    their ``.grad``; restore them in place on exit, even after an exception."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = [(p, p.detach().clone()) for p in model.parameters()] if parameters else []
    # Keep the original .grad objects too: an optimizer or the trainer may hold references to them.
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p, _ in params]
    try:
        with rng_preserved():
            yield model
    finally:
        with torch.no_grad():
            for tensor, saved in buffers + params:
                tensor.copy_(saved)
            for p, grad, saved in grads:
                if grad is not None:
                    grad.copy_(saved)
                p.grad = grad
        for m, flag in flags:
            m.training = flag


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """``model.train()`` for "train", ``model.eval()`` for "eval" (restore with :func:`preserved`)."""
    return model.train(check_mode(mode) == "train")
