"""Which modules count as a probe's "layers", and in what order the forward pass reaches them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normlab.errors import NormlabError

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_norm(module: nn.Module) -> bool:
    """PyTorch's and normlab's normalization layers (``normlab.layers.kinds``), and any class whose name
    ends in "Norm"/"Norm1d"/"Norm2d"/"Norm3d" (timm's and other libraries')."""
    from normlab.layers.kinds import is_norm as normlab_norm

    by_name = type(module).__name__.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d"))
    return isinstance(module, _NORM_TYPES) or normlab_norm(module) or by_name


def own_parameters(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def weight_layers(model: nn.Module, *, include_norm: bool = False) -> list[tuple[str, nn.Module]]:
    """Modules with a trainable parameter of their own called ``weight`` (conv, linear, Scaled-WS conv),
    excluding normalization layers unless ``include_norm`` (then their affine ``weight``/``bias`` count)."""
    out = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or not weight.requires_grad:
            continue
        if is_norm(module) and not include_norm:
            continue
        out.append((name, module))
    return out


def require_layers(layers: list[tuple[str, nn.Module]], model: nn.Module, what: str) -> None:
    if not layers:
        raise NormlabError(
            f"{type(model).__name__} has no {what}; the probe needs at least one module with its own "
            "trainable 'weight' (conv/linear)"
        )


def forward_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of the modules with trainable parameters of their own, in the order ``run()`` (a forward pass)
    first enters them. Modules the forward pass never calls are left out."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if own_parameters(module):

            def hook(_m, _inputs, name=name):
                if name not in seen:
                    seen.add(name)
                    order.append(name)

            handles.append(module.register_forward_pre_hook(hook))
    seen: set[str] = set()
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return order


def select_modules(model: nn.Module, names: list[str] | None, default: list[tuple[str, nn.Module]]):
    """``names`` resolved to ``(name, module)`` (a clear error for an unknown one), else ``default``."""
    if names is None:
        return default
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        valid = ", ".join(n for n in list(modules)[1:20] if n)
        given = ", ".join(map(repr, unknown))
        raise NormlabError(f"unknown layer name(s) {given}; the model's modules include: {valid}, ...")
    return [(n, modules[n]) for n in names]
