"""Multilayer perceptron: the MNIST-1D paper's MLP baseline (Greydanus 2020, ``MLPBase``) with a
configurable depth and a norm after every hidden layer."""

from __future__ import annotations

import torch
from torch import nn

from normlab.models._layers import (
    FlattenTo,
    activation_gamma,
    check_positive_int,
    create_act,
    make_norm,
    nf_eps,
    scaled_std_linear,
)
from normlab.models.factory import NF, check_classes, register_model


def default_input_size(dims: int) -> int:
    """MNIST-1D signals are 40 long; 2-D inputs default to CIFAR's 32x32."""
    return 40 if dims == 1 else 32


class MLP(nn.Module):
    """``depth`` hidden layers ``Linear -> norm -> act`` of ``width`` units, then ``classifier``.

    Shapes: input (N, in_channels, L) or (N, in_channels, H, W), flattened to
    ``in_channels * input_size**dims`` features; output (N, num_classes). Hidden norms get (N, width)
    (``create_norm(..., dims=1)``). Init: PyTorch's default ``nn.Linear`` init, as the MNIST-1D reference
    code uses. Differs from ``MLPBase`` in one way: no residual connection around the second layer, so
    depth is a plain knob. ``norm="nf"``: Scaled WS linears (gamma = 1 for the first, which sees the data;
    the activation's gamma after that), no norm layers.
    """

    def __init__(
        self,
        *,
        in_features: int,
        num_classes: int,
        depth: int = 2,
        width: int = 100,
        norm: str = "bn",
        activation: str = "relu",
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        norm_options = dict(norm_options or {})
        nf = norm == NF
        layers: list[nn.Module] = [
            FlattenTo(in_features, "pass input_size= (and in_channels=, dims=) to create_model")
        ]
        features = in_features
        for i in range(depth):
            if nf:
                gamma = 1.0 if i == 0 else activation_gamma(activation)
                layers += [scaled_std_linear(features, width, gamma=gamma, eps=nf_eps(norm_options))]
            else:
                layers += [nn.Linear(features, width), make_norm(norm, width, 1, norm_options)]
            layers.append(create_act(activation))
            features = width
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


@register_model("mlp")
def mlp(
    *,
    norm: str,
    num_classes: int,
    in_channels: int,
    dims: int,
    width: float | None,
    depth: int | None,
    norm_options: dict,
    input_size: int | None = None,
    activation: str = "relu",
) -> nn.Module:
    """MLP with ``depth`` hidden layers (default 2) of ``width`` units (default 100, as MNIST-1D's MLP);
    ``input_size`` is the input's length / side (default 40 for dims=1, 32 for dims=2)."""
    size = default_input_size(dims) if input_size is None else check_positive_int("input_size", input_size)
    return MLP(
        in_features=in_channels * size**dims,
        num_classes=check_classes("mlp", num_classes),
        depth=2 if depth is None else depth,
        width=100 if width is None else check_positive_int("width", width),
        norm=norm,
        activation=activation,
        norm_options=norm_options,
    )
