"""Fold inference-mode BatchNorm into the preceding convolution or linear layer (Ioffe & Szegedy 2015,
Sec. 3.1: at inference BN is an affine map, so conv followed by BN is a conv).

For BN statistics (mu, var), affine (gamma, beta) and eps, with ``s = gamma / sqrt(var + eps)``:
``W' = s[:, None, ...] * W`` and ``b' = s * (b - mu) + beta`` (b = 0 when the conv has no bias).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from normlab.errors import NormlabError
from normlab.layers._batchnorm_base import BatchStatsNorm
from normlab.layers.evalnorm import EvalNorm
from normlab.layers.frozen_bn import FrozenBatchNorm
from normlab.layers.kinds import has_batch_stats, is_norm

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _LeafNormTracer(torch.fx.Tracer):
    """Keeps norms and every module without submodules as single graph nodes: their input checks are
    Python control flow fx cannot trace, and folding only needs to see how leaf modules connect."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm(m) or not any(m.children()) or super().is_leaf_module(m, module_qualified_name)


def _is_foldable_bn(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm):
        return True
    # EvalNorm's evaluation uses per-sample statistics unless both blend weights are 0.
    if isinstance(module, EvalNorm):
        return float(module.alpha) == 0.0 and float(module.beta) == 0.0
    # Noisy BN evaluates as its expectation (BN times E[s]) unless told otherwise: not a plain BN to fold.
    if getattr(module, "eval_expectation", False):
        return False
    return has_batch_stats(module)


def folded_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of the module docstring, computed in float64 and returned in ``weight``'s dtype."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    s = gamma * torch.rsqrt(var + bn.eps)
    b = bias.double() if bias is not None else torch.zeros_like(mean)
    w = weight.double() * s.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), (s * (b - mean) + beta).to(weight.dtype)


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing the same function with every foldable BN folded into its conv/linear;
    ``model`` is untouched.

    The copy keeps the user's module class, attributes and submodule names (``model.units[1].conv``): each
    folded conv/linear gets the folded weight and bias in place and its BN becomes ``nn.Identity`` at the
    same name; nothing is rewritten into a GraphModule. Pairs are found in the graph traced by ``torch.fx``
    (only to read how modules connect): a BN node (torch BN with running statistics, FrozenBatchNorm,
    normlab's ghost / renorm layers, noisy BN with eval_expectation=False, EvalNorm with a = b = 0) is folded
    when it is called once and its only input is the single call of an ``nn.Conv1d/2d/3d`` or ``nn.Linear``
    (exact types; its output channels = BN's channels) that has no other user. Other BNs (pre-activation BN,
    BN after an addition, a BN module called twice) stay. A Linear followed by BN is folded on the reading
    that BN normalizes the Linear's last dim, true for (N, C) input.

    Raises:
        NormlabError: the model or one of its BN layers is in training mode (call ``model.eval()``), or the
            model cannot be traced by torch.fx.
    """
    training = [n or "<root>" for n, m in model.named_modules()
                if m.training and (m is model or has_batch_stats(m) or isinstance(m, BatchStatsNorm))]
    if training:
        raise NormlabError(
            f"fold_bn needs a model in eval mode, but {', '.join(training[:5])} "
            f"{'is' if len(training) == 1 else 'are'} in training mode; call model.eval() first"
        )
    model = copy.deepcopy(model)
    try:
        graph = _LeafNormTracer().trace(model)
    except Exception as err:  # fx raises many types for untraceable code
        raise NormlabError(f"fold_bn could not trace {type(model).__name__} with torch.fx: {err}") from err
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        bn = model.get_submodule(node.target)
        if not _is_foldable_bn(bn) or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = model.get_submodule(prev.target)
        if type(layer) not in _FOLD_INTO or calls[prev.target] != 1:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        old_bias = None if layer.bias is None else layer.bias.detach()
        weight, bias = folded_weights(layer.weight.detach(), old_bias, bn)
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        parent, _, child = node.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model
