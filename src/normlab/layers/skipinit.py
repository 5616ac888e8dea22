"""SkipInit (De & Smith 2020, arXiv 2002.10444, Sec. 4): a learnable scalar at the end of a residual branch.

``y = alpha * x`` with alpha initialized to 0 (or a small value below 1/sqrt(depth)), so every residual block
starts as the identity, which is what BN achieves implicitly by downscaling the branch by O(sqrt(depth)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlab.errors import NormlabError


class SkipInit(nn.Module):
    """``y = alpha * x`` (any shape), alpha a learnable scalar parameter initialized to ``init``."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(init, (int, float)) and not isinstance(init, bool) and math.isfinite(init)):
            raise NormlabError(f"SkipInit init must be a finite number, got {init!r}")
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4g}"
