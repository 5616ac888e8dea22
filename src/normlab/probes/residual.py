"""Scale of the residual branch relative to the skip path (De & Smith 2020, arXiv 2002.10444, Sec. 2-3).

BN on the residual branch downscales it by O(sqrt(depth)) relative to the skip path at initialization,
which biases deep residual networks toward the identity; SkipInit's zero-initialized scalar does the same
explicitly. Per block of the normlab residual contract (``out = shortcut(.) + skip_scale(branch(pre))``)::

    ratio = std(skip_scale output) / std(shortcut output)

the branch's contribution at the block output over the skip path's; std over every element of the batch
(population std). 0 for SkipInit at init; about 1/sqrt(block index) for a BN ResNet at init.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._blocks import find_blocks, graph_first
from normlab.probes._hooks import captured, captured_inputs, probe_input
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_batch_for_mode, check_mode, preserved, set_mode


@dataclasses.dataclass
class ResidualScale(ProbeResult):
    """Per block (forward order): ``ratio`` = ``branch_std`` / ``shortcut_std``."""

    mode: str
    input: str
    ratio: dict[str, float]
    branch_std: dict[str, float]
    shortcut_std: dict[str, float]


def residual_scale(
    model: nn.Module,
    x: torch.Tensor | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 8,
    mode: str = "train",
    seed: int = 0,
    blocks: list[str] | None = None,
) -> ResidualScale:
    """Branch-to-shortcut std ratio of every residual block of ``model`` on ``x`` (or N(0, 1) input of
    ``input_shape``). Blocks: the normlab contract (``skip_scale``, ``shortcut``), torchvision/timm ResNet
    blocks (branch = ``bn2``/``bn3`` output, shortcut = ``downsample`` output or the block's input), or the
    module names in ``blocks``, or else the residual joins of the traced graph (:mod:`normlab.probes._blocks`:
    branch = the added branch, shortcut = the other operand)."""
    check_mode(mode)
    points = graph_first(model, blocks)
    if points is not None:
        return _from_graph(points, model, x, input_shape, batch_size, mode, seed)
    try:
        _, found = find_blocks(model, blocks)
    except NormlabError:
        if blocks is not None:
            raise
        raise NormlabError(
            "residual_scale needs a residual model (model.stem + model.blocks() of normlab.models.blocks, "
            f"residual joins in its graph, or blocks=[module names]); {type(model).__name__} has none"
        ) from None
    x, source = probe_input(model, x, input_shape, batch_size, seed)
    check_batch_for_mode(model, x.shape[0], mode)
    points = [(f"{b.name}/branch", b.contribution) for b in found]
    points += [(f"{b.name}/shortcut", b.shortcut) for b in found if b.shortcut is not None]
    inputs = [(f"{b.name}/shortcut", b.module) for b in found if b.shortcut is None]
    with torch.no_grad(), preserved(model, parameters=False), captured(points) as out, captured_inputs(
        inputs
    ) as block_inputs:
        set_mode(model, mode)
        model(x)
    out.update(block_inputs)
    return _ratios(mode, source, [b.name for b in found], out)


def _ratios(mode: str, source: str, names: list[str], out: dict[str, torch.Tensor]) -> ResidualScale:
    result = ResidualScale(mode=mode, input=source, ratio={}, branch_std={}, shortcut_std={})
    for name in names:
        branch = out[f"{name}/branch"].double().std(unbiased=False).item()
        shortcut = out[f"{name}/shortcut"].double().std(unbiased=False).item()
        result.branch_std[name], result.shortcut_std[name] = branch, shortcut
        result.ratio[name] = branch / shortcut if shortcut > 0 else math.nan
    return result


def _from_graph(points, model, x, input_shape, batch_size, mode, seed) -> ResidualScale:
    if not points.contributions:
        raise NormlabError(
            "residual_scale needs a residual model (a branch added to a shortcut in its graph, or "
            f"model.stem + model.blocks()); {type(model).__name__} has none"
        )
    x, source = probe_input(model, x, input_shape, batch_size, seed)
    check_batch_for_mode(model, x.shape[0], mode)
    with torch.no_grad(), preserved(model, parameters=False):
        set_mode(model, mode)
        values = points.capture(x)
    out = {f"{n}/branch": v for n, v in values["contribution"].items()}
    out.update({f"{n}/shortcut": v for n, v in values["shortcut"].items()})
    return _ratios(mode, source, list(points.contributions), out)
