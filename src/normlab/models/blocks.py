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
