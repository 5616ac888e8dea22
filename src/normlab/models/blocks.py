"""The residual-block contract every normlab residual model follows, so probes need not guess names.

A residual block computes ``out = shortcut(x or pre) + skip_scale(branch(pre))`` with ``pre = preact(x)``:

- ``block.preact``: pre-activation (norm + activation for pre-act ResNets, ``act(x) * beta`` for NF-ResNets);
- ``block.branch``: the residual branch, ending at its last conv (science.md section 3 measures
  ``res_avg_var`` here, before any skip gain, SkipInit scalar or alpha);
- ``block.skip_scale``: what multiplies the branch before the addition (``nn.Identity`` for a plain
  block, a ``SkipInit`` scalar, or the NF skip gain times alpha): its output is the branch's contribution
  at the block output;
- ``block.shortcut``: identity or the downsampling projection.

A residual model exposes ``model.blocks() -> Iterator[tuple[str, ResidualBlock]]`` (qualified name,
block) in forward order and ``model.stem`` (the module before the first block).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ResidualBlock(Protocol):
    preact: nn.Module
    branch: nn.Module
    skip_scale: nn.Module
    shortcut: nn.Module


@runtime_checkable
class ResidualModel(Protocol):
    stem: nn.Module

    def blocks(self) -> Iterator[tuple[str, nn.Module]]: ...


class StagedResNet(nn.Module):
    """Base of normlab's residual models: ``stem -> stages (of blocks) -> final -> pool -> classifier``.

    Subclasses build ``self.stem``, ``self.stages`` (an ``nn.ModuleList`` of ``nn.Sequential`` blocks),
    ``self.final``, ``self.pool`` and ``self.classifier``; this class adds :meth:`blocks` and the forward.
    """

    stages: nn.ModuleList

    def blocks(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, block) for every residual block, in forward order."""
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                yield f"stages.{i}.{j}", block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.classifier(self.pool(self.final(x)))
