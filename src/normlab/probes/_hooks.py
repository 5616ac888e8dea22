"""Forward hooks that capture module outputs during one forward pass, and the blocks of residual models."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import check_batch, check_positive_int, model_device

# timm / torchvision naming (timm/utils/model.py SignalPropagationPlots uses "layer?.?"-style patterns).
_BLOCK_PATTERNS = ("layer?.?", "layer?.??", "stages.?.?", "stages.?.??", "stages.?.blocks.?",
                   "stages.?.blocks.??", "blocks.?", "blocks.??")
_RESIDUAL_END = ("bn3", "bn2", "conv3", "conv2")  # Bottleneck, BasicBlock; NF blocks end at a conv
_STEM = ("stem", "maxpool", "bn1", "conv1")


@contextlib.contextmanager
def captured(modules: list[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the context, ``out[name]`` holds the output of module ``name`` from its first call."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules:

        def hook(_m, _inputs, output, name=name):
            if name not in out and isinstance(output, torch.Tensor):
                out[name] = output.detach()

        handles.append(module.register_forward_hook(hook))
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


def residual_points(model: nn.Module) -> tuple[tuple[str, nn.Module], list[tuple[str, nn.Module, nn.Module]]]:
    """``(stem name, stem)`` and ``[(block name, block, end of its residual branch)]``.

    The normlab contract gives ``model.stem`` and ``block.branch``. Other models are matched by timm /
    torchvision names: blocks ``layer1.0`` / ``stages.0.0`` / ``stages.0.blocks.0`` / ``blocks.0``, branch end
    the block's ``bn3``, ``bn2``, ``conv3`` or ``conv2`` (first found), stem ``stem``, ``maxpool``, ``bn1`` or
    ``conv1``.
    """
    blocks = contract_blocks(model)
    if blocks:
        return ("stem", model.stem), [(n, b, b.branch) for n, b in blocks]
    modules = dict(model.named_modules())
    found = [(n, m) for n, m in modules.items() if any(fnmatch.fnmatchcase(n, p) for p in _BLOCK_PATTERNS)]
    out = []
    for name, block in found:
        children = dict(block.named_children())
        end = next((children[c] for c in _RESIDUAL_END if c in children), None)
        if end is not None:
            out.append((name, block, end))
    stem = next(((n, modules[n]) for n in _STEM if n in modules), None)
    if not out or stem is None:
        raise NormlabError(
            f"cannot find residual blocks in {type(model).__name__}: it has no model.stem + model.blocks() "
            "(the normlab.models.blocks contract) and no modules named like timm/torchvision blocks "
            "(layer1.0, stages.0.0, ... with a bn2/bn3/conv2/conv3 child)"
        )
    return stem, out


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
