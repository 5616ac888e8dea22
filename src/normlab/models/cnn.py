"""The MNIST-1D paper's CNN (Greydanus 2020, arXiv 2011.14439; ``ConvBase`` in greydanus/mnist1d
``notebooks/models.py``): normlab's default small model.

Three convs ``1 -> 25 -> 25 -> 25`` channels (kernel 5, then 3; stride 2, padding 1), each followed by ReLU,
then the flattened 25 x 5 = 125 features go to a linear classifier. normlab puts ``norm`` between each
conv and its activation.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models._layers import (
    FlattenTo,
    activation_gamma,
    check_positive_int,
    conv,
    conv_out_size,
    create_act,
    make_norm,
    nf_eps,
    scaled_std_conv,
)
from normlab.models.factory import NF, check_classes, register_model
from normlab.models.mlp import default_input_size


class CNN(nn.Module):
    """``depth`` convs (first kernel 5, others 3; stride 2, padding 1) with ``width`` channels, each
    ``conv -> norm -> act``; flatten; ``classifier``.

    Shapes: input (N, in_channels, L) (``dims=1``) or (N, in_channels, H, W) (``dims=2``) with size
    ``input_size``; output (N, num_classes). Length 40 -> 19 -> 10 -> 5. Init: PyTorch's default conv and
    linear init, as the reference code. ``norm="nf"``: Scaled WS convs (gamma = 1 for the first, the
    activation's gamma after), no norm layers.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        dims: int = 1,
        input_size: int = 40,
        width: int = 25,
        depth: int = 3,
        norm: str = "bn",
        activation: str = "relu",
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        norm_options = dict(norm_options or {})
        layers: list[nn.Module] = []
        channels, size = in_channels, input_size
        for i in range(depth):
            kernel = 5 if i == 0 else 3
            if norm == NF:
                gamma = 1.0 if i == 0 else activation_gamma(activation)
                layers.append(
                    scaled_std_conv(
                        dims, channels, width, kernel, 2, 1, gamma=gamma, eps=nf_eps(norm_options)
                    )
                )
            else:
                layers += [
                    conv(dims, channels, width, kernel, 2, 1),
                    make_norm(norm, width, dims, norm_options),
                ]
            layers.append(create_act(activation))
            channels, size = width, conv_out_size(size, kernel, 2, 1)
            if size < 1:
                raise NormlabError(f"input_size={input_size} is too small for cnn with depth={depth}")
        self.features = nn.Sequential(*layers)
        features = width * size**dims
        self.flatten = FlattenTo(
            features, f"cnn was built for input_size={input_size}; pass input_size= to create_model"
        )
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model("cnn")
def cnn(
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
    """MNIST-1D CNN: ``width`` channels (default 25), ``depth`` convs (default 3), ``input_size`` the input's
    length / side (default 40 for dims=1, 32 for dims=2)."""
    return CNN(
        in_channels=in_channels,
        num_classes=check_classes("cnn", num_classes),
        dims=dims,
        input_size=default_input_size(dims)
        if input_size is None
        else check_positive_int("input_size", input_size),
        width=25 if width is None else check_positive_int("width", width),
        depth=3 if depth is None else depth,
        norm=norm,
        activation=activation,
        norm_options=norm_options,
    )
