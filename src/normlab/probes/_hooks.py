"""Forward hooks that capture module outputs during one forward pass, and the blocks of residual models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import check_batch, check_positive_int, model_device


@contextlib.contextmanager
def captured(modules: list[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the context, ``out[name]`` holds the output of module ``name`` from its first call."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules:

        def hook(_m, _inputs, output, name=name):
            if name not in out and isinstance(output, torch.Tensor):
                out[name] = output.detach().clone()  # clone: a later in-place add may change it

        handles.append(module.register_forward_hook(hook))
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def captured_inputs(modules: list[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the context, ``out[name]`` holds the first positional input of module ``name``'s first call
    (the identity shortcut of a block whose skip path has no module)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules:

        def hook(_m, inputs, name=name):
            if name not in out and inputs and isinstance(inputs[0], torch.Tensor):
                out[name] = inputs[0].detach().clone()  # clone: an in-place op later may change it

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


def contract_blocks(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``model.blocks()`` of the normlab residual-block contract (normlab/models/blocks.py), or None."""
    blocks = getattr(model, "blocks", None)
    if not callable(blocks) or not hasattr(model, "stem"):
        return None
    return list(blocks())


def residual_points(
    model: nn.Module, names: list[str] | None = None
) -> tuple[tuple[str, nn.Module], list[tuple[str, nn.Module, nn.Module]]]:
    """``(stem name, stem)`` and ``[(block name, block, end of its residual branch)]``, found by
    :func:`normlab.probes._blocks.find_blocks` (contract, torchvision/timm blocks, or ``names``)."""
    from normlab.probes._blocks import find_blocks

    stem, blocks = find_blocks(model, names)
    return stem, [(b.name, b.module, b.branch_end) for b in blocks]


def channel_moments(t: torch.Tensor, *, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance over the batch and spatial dims of (N, C, *spatial) or (N, C)."""
    if t.dim() < 2:
        raise NormlabError(f"expected an activation of shape (N, C, ...), got {tuple(t.shape)}")
    flat = t.transpose(0, 1).reshape(t.shape[1], -1).double()
    return flat.mean(dim=1), flat.var(dim=1, unbiased=unbiased)


def probe_input(
    model: nn.Module, x: torch.Tensor | None, input_shape: tuple[int, ...] | None, batch_size: int, seed: int
) -> tuple[torch.Tensor, str]:
    """``(x on the model's device, "batch")``, or N(0, 1) of shape (batch_size, *input_shape) drawn from a
    private generator seeded by ``seed`` (the global RNG is untouched) and ``"gaussian"``."""
    device = model_device(model)
    if x is not None:
        check_batch(x)
        return x.to(device), "batch"
    if input_shape is None:
        raise NormlabError("give a batch x or an input_shape (without the batch dim) for Gaussian input")
    check_positive_int(batch_size, "batch_size")
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_shape), generator=gen).to(device=device, dtype=dtype), "gaussian"
