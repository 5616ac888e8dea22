"""Normalizer-free pre-activation ResNet (NF-ResNet; Brock, De & Smith 2021a, arXiv 2101.08692, Sec. 4),
CIFAR layout (see ``normlab.models.resnet``); science.md section 4.

Each block computes, with ``h = act(x) * beta``::

    out = shortcut + alpha * skip_gain * branch(h)
    shortcut = x                       (same width and resolution)
             = conv1x1_stride(h)       (changes width or resolution, downsample="conv": DeepMind's default)
             = conv1x1(avgpool2(h))    (downsample="avg": timm's DownsampleAvg)
    branch   = ScaledStdConv3x3 -> act -> ScaledStdConv3x3

``beta = 1 / sqrt(expected_var)``, the analytic variance of the block's input: it starts at 1 (the stem's
output on unit-variance input), grows by ``alpha^2`` after every block and is reset to ``1 + alpha^2`` after
the first block of each stage, whose projection shortcut re-normalizes the signal (timm
``timm/models/nfnet.py`` schedule). Every conv after an activation is Scaled WS with the activation's gain
gamma in the conv (timm's default); the stem sees the data, so its gamma is 1 (DeepMind applies gamma in
the activation, which leaves the stem unscaled too). No norm layers anywhere.

Head, as DeepMind's ``nfnets/nf_resnet.py`` (``NF_ResNet.__call__``): ``pool = mean(self.activation(out))``
where ``base.nonlinearities`` bakes gamma into every activation, so the final activation is gamma-scaled
(``act(x) * gamma``, :class:`GammaAct`) before global average pooling; the classifier's weight is drawn from
N(0, 0.01^2) ("Head. By default, initialize with N(0, 0.01)": ``hk.initializers.RandomNormal(0.01, 0)``) and
its bias is zero. timm's ``NormFreeNet`` also draws the fc from N(0, 0.01) (``zero_init_fc=False``) but
applies a plain activation before the head (its gamma lives in the next conv, and there is none);
``fc_init_std=0`` gives a zero-initialized classifier. The Scaled WS layers keep their own init
(standardization makes the function at init independent of the weights' scale).

NOTE on ``downsample``: the default "conv" follows DeepMind's nfnets code; "avg" follows timm. timm's 2x2
average pool divides the shortcut's variance by up to 4 when neighbouring activations are uncorrelated, as
they are on the white-noise N(0, 1) input of signal-propagation plots (measured at init, CIFAR layout, 32x32
input: the block-output variance drops to ~0.25 in stage 2 and ~0.06 in stage 3 instead of resetting to
1 + alpha^2; on natural images, which are spatially smooth, the drop is small). "conv" keeps the analytic
schedule on any input (within a few % of zero-padding border loss). Both are in science.md section 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError
from normlab.models._layers import (
    activation_gamma,
    blocks_per_stage,
    check_choice,
    check_dropout,
    check_positive_float,
    create_act,
    global_avg_pool,
    nf_eps,
    scaled_std_conv,
)
from normlab.models.blocks import StagedResNet
from normlab.models.factory import NF, check_classes, register_model

#: Shortcut of a block that changes width or resolution: "avg" = 2x2 average pool then 1x1 conv (timm's
#: DownsampleAvg), "conv" = strided 1x1 conv (the ResNet-V2 projection).
DOWNSAMPLES = ("avg", "conv")


class NFPreact(nn.Module):
    """``act(x) * beta``: the block input scaled to unit variance (beta = 1/sqrt(expected var))."""

    def __init__(self, activation: str, beta: float) -> None:
        super().__init__()
        self.act = create_act(activation)
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta:.6g}"


class GammaAct(nn.Module):
    """``act(x) * gamma``: DeepMind's activation with its gain gamma baked in (``base.nonlinearities``)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.act = create_act(activation)
        self.gamma = activation_gamma(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.gamma

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:.6g}"


class NFSkipGain(nn.Module):
    """``x * skip_gain * alpha``: a learnable scalar gain (init ``skip_gain_init``, 0 in the NF paper) times
    the fixed residual scale alpha; the branch's contribution at the block output."""

    def __init__(self, alpha: float, init: float = 0.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gain * self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class AvgPool(nn.Module):
    """2x average pooling (stride 2, ceil mode, padding excluded), the pool of timm's DownsampleAvg."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool1d if self.dims == 1 else F.avg_pool2d
        return pool(x, 2, 2, ceil_mode=True, count_include_pad=False)


class NFBlock(nn.Module):
    """One NF-ResNet basic block (``normlab.models.blocks`` contract)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        *,
        dims: int,
        alpha: float,
        beta: float,
        skip_gain_init: float,
        activation: str,
        eps: float,
        dropout: float = 0.0,
        downsample: str = "conv",
    ) -> None:
        super().__init__()
        gamma = activation_gamma(activation)
        self.preact = NFPreact(activation, beta)
        branch = [
            scaled_std_conv(dims, in_ch, out_ch, 3, stride, 1, gamma=gamma, eps=eps),
            create_act(activation),
        ]
        if dropout > 0:
            branch.append(nn.Dropout(dropout))
        branch.append(scaled_std_conv(dims, out_ch, out_ch, 3, 1, 1, gamma=gamma, eps=eps))
        self.branch = nn.Sequential(*branch)
        self.skip_scale = NFSkipGain(alpha, skip_gain_init)
        self.projects = stride != 1 or in_ch != out_ch
        if self.projects and downsample == "conv":
            self.shortcut = scaled_std_conv(dims, in_ch, out_ch, 1, stride, gamma=gamma, eps=eps)
        elif self.projects:
            pool = AvgPool(dims) if stride != 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, scaled_std_conv(dims, in_ch, out_ch, 1, gamma=gamma, eps=eps))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preact(x)
        return self.shortcut(pre if self.projects else x) + self.skip_scale(self.branch(pre))


def expected_variances(num_stages: int, blocks_per_stage: int, alpha: float) -> list[float]:
    """The analytic variance of every block's input, in forward order (beta = 1/sqrt of it).

    expected_var = 1 at the first block; after each block it grows by alpha^2, except after a stage's
    first block, whose output is ``1 + alpha^2`` (the shortcut is re-normalized). timm nfnet.py does the
    same (``if block_idx == 0: expected_var = 1.``, then ``+= alpha**2``).
    """
    variances, var = [], 1.0
    for _ in range(num_stages):
        for j in range(blocks_per_stage):
            variances.append(var)
            var = (1.0 if j == 0 else var) + alpha**2
    return variances


class NFResNet(StagedResNet):
    """NF-ResNet: stem (Scaled WS 3x3 conv, gamma 1), stages of :class:`NFBlock`, ``act * gamma``
    (:class:`GammaAct`), global average pool, ``classifier`` with weight ~ N(0, fc_init_std^2) and zero bias.

    Shapes: input (N, in_channels, L) (``dims=1``) or (N, in_channels, H, W) (``dims=2``); output
    (N, num_classes). At init with ``skip_gain_init=1`` the block outputs' average channel variance on unit
    Gaussian input follows ``expected_variances`` shifted by one block (1 + k alpha^2 within a stage); with
    the paper's ``skip_gain_init=0`` every block starts as (a projection of) the identity and stays near 1.
    """

    def __init__(
        self,
        *,
        stem_width: int,
        stage_widths: tuple[int, ...],
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        dims: int = 2,
        activation: str = "relu",
        alpha: float = 0.2,
        skip_gain_init: float = 0.0,
        dropout: float = 0.0,
        downsample: str = "conv",
        norm_options: dict | None = None,
        fc_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        check_positive_float("alpha", alpha)
        if isinstance(fc_init_std, bool) or not isinstance(fc_init_std, (int, float)) or not fc_init_std >= 0:
            raise NormlabError(f"fc_init_std must be a number >= 0, got {fc_init_std!r}")
        check_choice("downsample", downsample, DOWNSAMPLES)
        if isinstance(skip_gain_init, bool) or not isinstance(skip_gain_init, (int, float)):
            raise NormlabError(f"skip_gain_init must be a number, got {skip_gain_init!r}")
        eps = nf_eps(dict(norm_options or {}))
        self.alpha = alpha
        self.stem = scaled_std_conv(dims, in_channels, stem_width, 3, 1, 1, gamma=1.0, eps=eps)
        variances = iter(expected_variances(len(stage_widths), blocks_per_stage, alpha))
        stages, channels = [], stem_width
        for i, width in enumerate(stage_widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                beta = next(variances) ** -0.5
                blocks.append(
                    NFBlock(
                        channels,
                        width,
                        stride,
                        dims=dims,
                        alpha=alpha,
                        beta=beta,
                        skip_gain_init=skip_gain_init,
                        activation=activation,
                        eps=eps,
                        dropout=dropout,
                        downsample=downsample,
                    )
                )
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.final = GammaAct(activation)
        self.pool = global_avg_pool(dims)
        self.classifier = nn.Linear(channels, num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, float(fc_init_std))
        nn.init.zeros_(self.classifier.bias)


@register_model("nf_resnet", default_norm=NF)
def nf_resnet(
    *,
    norm: str,
    num_classes: int,
    in_channels: int,
    dims: int,
    width: float | None,
    depth: int | None,
    norm_options: dict,
    activation: str = "relu",
    alpha: float = 0.2,
    skip_gain_init: float = 0.0,
    dropout: float = 0.0,
    downsample: str = "conv",
    fc_init_std: float = 0.01,
) -> nn.Module:
    """NF-ResNet with the CIFAR ResNet layout: ``depth`` = 6n+2 (default 20), stage widths 16/32/64 times
    ``width``; ``alpha`` (0.2), ``skip_gain_init`` (0, the paper), ``activation`` (its gamma is used),
    ``fc_init_std`` (0.01, DeepMind's classifier init; 0 = zero-initialized)."""
    if norm != NF:
        raise NormlabError(
            f"nf_resnet is normalizer-free: norm must be 'nf', got {norm!r} (for a normalized net use resnet)"
        )
    depth = 20 if depth is None else depth
    n = blocks_per_stage("nf_resnet", depth, 2, "20, 32, 44, 56, 110")
    width = 1.0 if width is None else check_positive_float("width", width)
    widths = tuple(max(1, round(c * width)) for c in (16, 32, 64))
    return NFResNet(
        stem_width=widths[0],
        stage_widths=widths,
        blocks_per_stage=n,
        num_classes=check_classes("nf_resnet", num_classes),
        in_channels=in_channels,
        dims=dims,
        activation=activation,
        alpha=alpha,
        skip_gain_init=skip_gain_init,
        dropout=check_dropout(dropout),
        downsample=downsample,
        norm_options=norm_options,
        fc_init_std=fc_init_std,
    )
