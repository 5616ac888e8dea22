"""Swap every normalization layer of a model for another kind, in the spirit of timm's
``convert_sync_batchnorm`` and torch's ``SyncBatchNorm.convert_sync_batchnorm``."""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.layers.factory import create_norm, norm_options
from normlab.layers.kinds import is_norm

_DIMS_BY_CLASS = {
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
    nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3,
    nn.LayerNorm: 1,
}
_COPIED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def convert_norm(model: nn.Module, to: str, **options) -> nn.Module:
    """Replace every normalization layer in ``model`` by ``create_norm(to, C, **options)``; return the model.

    Replaced: torch ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``,
    ``LayerNorm`` over one dimension (taken as the channels of (N, C) features), and normlab's own layers.
    The model is changed in place (and returned; if ``model`` is itself a norm layer, the new layer is
    returned). For each layer:
    - C comes from the source (``num_features`` / ``num_channels`` / ``normalized_shape[0]``);
    - ``dims`` from the source's class (BatchNorm2d -> 2, LayerNorm -> 1, normlab layers record it); GroupNorm
      and SyncBatchNorm do not know it, so they get ``options["dims"]`` or 2;
    - ``eps``, ``momentum`` and ``affine`` are carried over when the target takes them and ``options`` does
      not set them, so the converted layer computes the same function where it can;
    - ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked`` are copied where both
      layers have them with the same shape; the new layer gets the source's device, dtype and train flag.

    A norm the model calls as a function (``F.batch_norm`` in a ``forward``) has no module to swap: the
    model's traced graph (:mod:`normlab.layers.residual_graph`) is read first and such a model refused, so a
    conversion is never partial (a model torch.fx cannot trace is converted module by module).

    Raises:
        NormlabError: unknown ``to`` or option; a layer that cannot be mapped (its qualified name is in the
            message), e.g. a LayerNorm over several dimensions or a group count that does not divide C; a
            norm called as a function.
    """
    valid = norm_options(to)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise NormlabError(f"unknown option(s) {', '.join(unknown)} for norm {to!r}; valid options: "
                           f"{', '.join(valid) or 'none'}")
    if is_norm(model):
        return _convert_one(model, "<root>", to, options)
    _refuse_functional_norms(model, to)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if is_norm(child):
                qualified = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, _convert_one(child, qualified, to, options))
    return model


def _refuse_functional_norms(model: nn.Module, to: str) -> None:
    from normlab.layers.residual_graph import is_norm_node, module_of, trace

    try:
        gm = trace(model)
    except NormlabError:
        return  # untraceable: every norm module is still swapped; nothing else can be checked
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_norm_node(gm, node):
            raise NormlabError(
                f"cannot convert {type(model).__name__}'s norms to {to!r}: "
                f"{module_of(node) or type(model).__name__ + '.forward'} calls "
                f"{getattr(node.target, '__name__', node.target)} as a function, which has no module to swap"
            )


def _num_channels(layer: nn.Module, qualified: str) -> int:
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    if isinstance(layer, nn.LayerNorm):
        if len(layer.normalized_shape) != 1:
            raise NormlabError(
                f"cannot convert {qualified} (LayerNorm over "
                f"normalized_shape={tuple(layer.normalized_shape)}): "
                "only a LayerNorm over one dimension (the channels of (N, C) features) maps to a channel norm"
            )
        return layer.normalized_shape[0]
    return layer.num_features


def _carried_options(layer: nn.Module, to: str, options: dict) -> dict:
    valid = norm_options(to)
    carried = dict(options)
    if "dims" in valid and "dims" not in carried:
        dims = getattr(layer, "dims", None) or _DIMS_BY_CLASS.get(type(layer))
        if dims is not None:
            carried["dims"] = dims
    if "eps" in valid and "eps" not in carried and hasattr(layer, "eps"):
        carried["eps"] = layer.eps
    if "momentum" in valid and "momentum" not in carried and hasattr(layer, "momentum"):
        carried["momentum"] = layer.momentum
    if "affine" in valid and "affine" not in carried:
        affine = getattr(layer, "affine", getattr(layer, "elementwise_affine", None))
        if isinstance(affine, bool):
            carried["affine"] = affine
    return carried


def _convert_one(layer: nn.Module, qualified: str, to: str, options: dict) -> nn.Module:
    channels = _num_channels(layer, qualified)
    try:
        new = create_norm(to, channels, **_carried_options(layer, to, options))
    except NormlabError as err:
        raise NormlabError(f"cannot convert {qualified} ({type(layer).__name__}, {channels} channels) to "
                           f"{to!r}: {err}") from err
    ref = next(iter(layer.parameters()), None)
    if ref is None:
        ref = next(iter(layer.buffers()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    with torch.no_grad():
        for name in _COPIED:
            src, dst = getattr(layer, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
    new.train(layer.training)
    return new
