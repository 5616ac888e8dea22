"""Deep linear network (DLN) of Santurkar et al. 2018 (arXiv 1805.11604, Sec. 2.2 / 3.2 and App. A).

``f(x) = W_k ... W_2 W_1 x`` with k square ``width x width`` matrices, no biases and no nonlinearity,
trained on ``||f(x) - A x||^2`` (``load_dataset("gaussian_linear")``). The BN variant puts a norm after every
layer but the last.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models._layers import (
    FlattenTo,
    check_positive_int,
    glorot_init_,
    make_norm,
    nf_eps,
    scaled_std_linear,
)
from normlab.models.factory import NF, register_model


class DLN(nn.Module):
    """``depth`` bias-free linear layers of size ``width``; norm (on (N, width), ``dims=1``) after each but
    the last. Input (N, width) (any (N, ...) with ``width`` elements per example is flattened); output
    (N, out_features). Init: Glorot uniform (the paper's stated init). ``norm="nf"``: the layers are Scaled
    WS linears with gamma = 1 (there is no activation) and no norm layers.

    Attributes:
        layers: every layer before the last, with the norms, in forward order.
        classifier: the last linear layer ``W_k``.
    """

    def __init__(
        self,
        *,
        width: int = 10,
        depth: int = 25,
        out_features: int = 10,
        norm: str = "bn",
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        norm_options = dict(norm_options or {})
        layers: list[nn.Module] = [FlattenTo(width, "the DLN's input dimension is its width")]
        for _ in range(depth - 1):
            if norm == NF:
                layers.append(
                    scaled_std_linear(width, width, gamma=1.0, eps=nf_eps(norm_options), bias=False)
                )
            else:
                layers += [nn.Linear(width, width, bias=False), make_norm(norm, width, 1, norm_options)]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, out_features, bias=False)
        glorot_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x))


@register_model("dln")
def dln(
    *,
    norm: str,
    num_classes: int,
    in_channels: int,
    dims: int,
    width: float | None,
    depth: int | None,
    norm_options: dict,
) -> nn.Module:
    """DLN with ``depth`` layers (default 25, the paper's) of size ``width`` (default 10). The output has
    ``num_classes`` units, or ``width`` (all layers square, the paper's setup) when ``num_classes=0`` as for
    the regression datasets. ``in_channels`` and ``dims`` are not used: the input is flattened to
    ``width`` features."""
    width = 10 if width is None else check_positive_int("width", width)
    depth = 25 if depth is None else depth
    if depth < 2:
        raise NormlabError(f"dln needs depth >= 2 (layers), got {depth}")
    out = width if num_classes == 0 else num_classes
    return DLN(width=width, depth=depth, out_features=out, norm=norm, norm_options=norm_options)
