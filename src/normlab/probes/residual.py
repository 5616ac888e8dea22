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
from normlab.probes._hooks import captured, contract_blocks, probe_input
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
) -> ResidualScale:
    """Branch-to-shortcut std ratio of every residual block of ``model`` on ``x`` (or N(0, 1) input of
    ``input_shape``); needs ``model.blocks()`` with ``skip_scale`` and ``shortcut``
    (normlab.models.blocks)."""
    check_mode(mode)
    blocks = contract_blocks(model)
    if not blocks:
        raise NormlabError(
            f"residual_scale needs a residual model with model.stem and model.blocks() yielding blocks with "
            f"skip_scale and shortcut (normlab.models.blocks); {type(model).__name__} has none"
        )
    x, source = probe_input(model, x, input_shape, batch_size, seed)
    check_batch_for_mode(model, x.shape[0], mode)
    points = [(f"{n}/branch", b.skip_scale) for n, b in blocks]
    points += [(f"{n}/shortcut", b.shortcut) for n, b in blocks]
    with torch.no_grad(), preserved(model, parameters=False), captured(points) as out:
        set_mode(model, mode)
        model(x)
    result = ResidualScale(mode=mode, input=source, ratio={}, branch_std={}, shortcut_std={})
    for name, _ in blocks:
        branch = out[f"{name}/branch"].double().std(unbiased=False).item()
        shortcut = out[f"{name}/shortcut"].double().std(unbiased=False).item()
        result.branch_std[name], result.shortcut_std[name] = branch, shortcut
        result.ratio[name] = branch / shortcut if shortcut > 0 else math.nan
    return result
