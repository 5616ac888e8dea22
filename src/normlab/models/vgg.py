"""VGG-16 (default) and VGG-A for Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?"
(arXiv 1805.11604, Sec. 2 and App. A): the CIFAR-10 network on which BN's effect on the loss landscape
was measured.

Which VGG: the paper says "VGG" without a configuration, has no official code, and its Fig. 2 and Fig. 8
plot "Layer #13", so the network has at least 13 layers with a norm after them, more than VGG-A's 10
(8 convs + 2 hidden linears; VGG-A was this project's first choice and is wrong for the paper). VGG-16
(Simonyan & Zisserman 2015, configuration D) has exactly 13 convs: its layer #13 is the last conv, the
deepest layer that sits in every CIFAR variant of VGG-16 — the torchvision-style head with two hidden
linears (as in AlexeyGB/batch-norm-helps-optimization ``src/models/vgg.py``, which reproduces the paper
with VGG-A) and the single-linear head of kuangliu/pytorch-cifar, which MadryLab's ``robustness`` library
(the authors' lab) uses for its CIFAR VGG16. We take configuration D with the paper's "BN after every
conv/linear layer except the last" on a two-hidden-linear CIFAR head, i.e. 16 weight layers as in VGG-16.
``depth=11`` gives VGG-A (configuration A) with the same head. Layout (depth 16)::

    conv64 conv64 M conv128 conv128 M conv256 conv256 conv256 M conv512 conv512 conv512 M
    conv512 conv512 conv512 M -> flatten -> linear512 -> linear512 -> linear(num_classes)

every conv is 3x3 / stride 1 / padding 1 with bias, M is 2x2 max-pooling, and each conv and hidden linear
layer is followed by ``norm`` then ReLU ("BN after every layer but the last"). Glorot init.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models._layers import (
    MaxPool,
    activation_gamma,
    check_positive_float,
    conv,
    create_act,
    global_avg_pool,
    glorot_init_,
    make_norm,
    nf_eps,
    scaled_std_conv,
    scaled_std_linear,
)
from normlab.models.factory import NF, check_classes, register_model

#: VGG configuration A (VGG-11): output channels per conv, "M" = max-pool.
VGG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
#: VGG configuration D (VGG-16): 13 convs.
VGG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
#: Conv plans by depth (weight layers: convs + the two hidden linears + the classifier).
VGG_CONFIGS = {11: VGG_A, 16: VGG_D}
#: The two hidden fully connected layers of the CIFAR head.
VGG_A_HIDDEN = (512, 512)


class VGG(nn.Module):
    """VGG (configuration ``convs``, default VGG-16's) with a pluggable normalization (or the
    normalizer-free variant, ``norm="nf"``).

    Shapes: input (N, in_channels, L) for ``dims=1`` or (N, in_channels, H, W) for ``dims=2``; output
    (N, num_classes). The five poolings take 32x32 (CIFAR) to 1x1 and length 40 (MNIST-1D) to 1 (40 -> 20
    -> 10 -> 5 -> 2 -> 1), so on these inputs ``features`` ends at one position per channel exactly as
    in the paper. On shorter inputs a pooling skips a dim already of size 1 (:class:`MaxPool`); on
    longer ones the final map is averaged to one position per channel before the head (global average
    pooling, an identity for the paper's sizes).

    ``norm="nf"``: every conv and hidden linear is a Scaled WS layer (Brock et al. 2021a) with the
    activation's gamma (gamma = 1 for the first conv, which sees the data), and there are no norm layers.

    Attributes:
        features: the conv stack (conv, norm, act and pooling modules in forward order).
        head: global pooling, flatten and the hidden linear layers with their norms and activations.
        classifier: the final ``nn.Linear`` (never followed by a norm).
    """

    def __init__(
        self,
        *,
        norm: str = "bn",
        num_classes: int = 10,
        in_channels: int = 3,
        dims: int = 2,
        width: float = 1.0,
        activation: str = "relu",
        norm_options: dict | None = None,
        convs: tuple = VGG_D,
    ) -> None:
        super().__init__()
        norm_options = dict(norm_options or {})
        nf = norm == NF
        eps = nf_eps(norm_options) if nf else 0.0
        gamma = activation_gamma(activation) if nf else 1.0
        layers: list[nn.Module] = []
        channels = in_channels
        for item in convs:
            if item == "M":
                layers.append(MaxPool(dims))
                continue
            out = _scale(item, width)
            if nf:
                g = 1.0 if not layers else gamma  # the first conv sees the data, not an activation
                layers += [
                    scaled_std_conv(dims, channels, out, 3, padding=1, gamma=g, eps=eps),
                    create_act(activation),
                ]
            else:
                layers += [
                    conv(dims, channels, out, 3, padding=1),
                    make_norm(norm, out, dims, norm_options),
                    create_act(activation),
                ]
            channels = out
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [global_avg_pool(dims)]
        for hidden in VGG_A_HIDDEN:
            out = _scale(hidden, width)
            if nf:
                head += [scaled_std_linear(channels, out, gamma=gamma, eps=eps), create_act(activation)]
            else:
                head += [
                    nn.Linear(channels, out),
                    make_norm(norm, out, 1, norm_options),
                    create_act(activation),
                ]
            channels = out
        self.head = nn.Sequential(*head)
        self.classifier = nn.Linear(channels, num_classes)
        glorot_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))


def _scale(channels: int, width: float) -> int:
    return max(1, round(channels * width))


@register_model("vgg")
def vgg(
    *,
    norm: str,
    num_classes: int,
    in_channels: int,
    dims: int,
    width: float | None,
    depth: int | None,
    norm_options: dict,
    activation: str = "relu",
) -> nn.Module:
    """VGG for Santurkar et al. 2018: ``depth`` 16 (default, VGG-16) or 11 (VGG-A) weight layers; ``width``
    multiplies every layer's channels (1.0 = the paper)."""
    depth = 16 if depth is None else depth
    if depth not in VGG_CONFIGS:
        raise NormlabError(
            f"vgg has 16 (VGG-16, default) or 11 (VGG-A) weight layers; depth must be 16, 11 or None, "
            f"got {depth!r}"
        )
    width = 1.0 if width is None else check_positive_float("width", width)
    return VGG(
        norm=norm,
        num_classes=check_classes("vgg", num_classes),
        in_channels=in_channels,
        dims=dims,
        width=width,
        activation=activation,
        norm_options=norm_options,
        convs=VGG_CONFIGS[depth],
    )
