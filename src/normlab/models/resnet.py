"""Pre-activation ResNets for CIFAR-sized input: ResNet-(6n+2) (He et al. 2016, "Identity Mappings in Deep
Residual Networks", arXiv 1603.05027) and Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016, arXiv
1605.07146).

Both are a 3x3 stem conv, three stages of pre-activation basic blocks
``out = shortcut(x) + skip_scale(conv(act(norm(conv(act(norm(x)))))))`` with stride 2 at the first block
of stages 2 and 3, then ``norm -> act -> global average pool -> classifier``. Where a block changes width
or resolution its shortcut is a 1x1 conv (stride 2 where it downsamples) applied to the pre-activated
input, as in the pre-activation and WRN reference code (option B projections; the original CIFAR ResNet
used zero-padding shortcuts, ~1% fewer parameters). Every block follows ``normlab.models.blocks``.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models._layers import (
    blocks_per_stage,
    check_dropout,
    check_positive_float,
    conv,
    create_act,
    global_avg_pool,
    he_init_,
    make_norm,
)
from normlab.models.blocks import StagedResNet
from normlab.models.factory import NF, check_classes, register_alias, register_model
from normlab.models.nf_resnet import NFResNet


class PreActBlock(nn.Module):
    """Pre-activation basic block; ``preact = norm -> act``, ``branch = conv3x3 -> norm -> act [-> dropout]
    -> conv3x3``, ``skip_scale`` = ``nn.Identity`` or a SkipInit scalar (De & Smith 2020), ``shortcut`` =
    identity (on ``x``) or a 1x1 projection (on ``preact(x)``). Convs have no bias (a norm follows each)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        *,
        dims: int,
        norm: str,
        norm_options: dict,
        activation: str = "relu",
        dropout: float = 0.0,
        skip_scale: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.preact = nn.Sequential(make_norm(norm, in_ch, dims, norm_options), create_act(activation))
        branch = [
            conv(dims, in_ch, out_ch, 3, stride, 1, bias=False),
            make_norm(norm, out_ch, dims, norm_options),
        ]
        branch.append(create_act(activation))
        if dropout > 0:
            branch.append(nn.Dropout(dropout))
        branch.append(conv(dims, out_ch, out_ch, 3, 1, 1, bias=False))
        self.branch = nn.Sequential(*branch)
        self.skip_scale = nn.Identity() if skip_scale is None else skip_scale
        self.projects = stride != 1 or in_ch != out_ch
        self.shortcut = (
            conv(dims, in_ch, out_ch, 1, stride, 0, bias=False) if self.projects else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preact(x)
        return self.shortcut(pre if self.projects else x) + self.skip_scale(self.branch(pre))


class PreActResNet(StagedResNet):
    """Pre-activation ResNet with ``len(stage_widths)`` stages of ``blocks_per_stage`` blocks.

    Shapes: input (N, in_channels, L) for ``dims=1`` or (N, in_channels, H, W) for ``dims=2``; output
    (N, num_classes). Init: He et al. 2015 normal, fan-out, as fb.resnet.torch (the pre-activation paper's
    code) and the WRN code; norm scales 1, shifts 0; SkipInit scalars keep their own init.

    Attributes:
        stem: the first conv (``in_channels -> stem_width``, 3x3).
        stages: ``nn.ModuleList`` of stages, each an ``nn.Sequential`` of :class:`PreActBlock`.
        final: ``norm -> act`` after the last block (pre-activation nets end un-normalized otherwise).
        pool: global average pooling and flatten.
        classifier: the final ``nn.Linear``.
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
        norm: str = "bn",
        norm_options: dict | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        skipinit: bool = False,
        skipinit_value: float = 0.0,
    ) -> None:
        super().__init__()
        norm_options = dict(norm_options or {})
        self.stem = conv(dims, in_channels, stem_width, 3, 1, 1, bias=False)
        stages = []
        channels = stem_width
        for i, width in enumerate(stage_widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(
                    PreActBlock(
                        channels,
                        width,
                        stride,
                        dims=dims,
                        norm=norm,
                        norm_options=norm_options,
                        activation=activation,
                        dropout=dropout,
                        skip_scale=_skipinit(skipinit_value) if skipinit else None,
                    )
                )
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.final = nn.Sequential(make_norm(norm, channels, dims, norm_options), create_act(activation))
        self.pool = global_avg_pool(dims)
        self.classifier = nn.Linear(channels, num_classes)
        he_init_(self)


def _skipinit(value: float) -> nn.Module:
    from normlab.layers import SkipInit

    return SkipInit(init=value)


def _check_nf_options(
    name: str,
    norm: str,
    skipinit: bool,
    alpha: float | None,
    skip_gain_init: float | None,
    downsample: str | None,
) -> None:
    if norm == NF and skipinit:
        raise NormlabError(
            f"{name}: skipinit is for normalized nets; norm='nf' has its own skip gain (skip_gain_init)"
        )
    if norm != NF and (alpha is not None or skip_gain_init is not None or downsample is not None):
        raise NormlabError(
            f"{name}: alpha, skip_gain_init and downsample apply only to norm='nf', got norm={norm!r}"
        )
    if not isinstance(skipinit, bool):
        raise NormlabError(f"skipinit must be True or False, got {skipinit!r}")


def _build(
    name: str,
    *,
    stem_width: int,
    stage_widths: tuple[int, ...],
    n: int,
    norm: str,
    num_classes: int,
    in_channels: int,
    dims: int,
    norm_options: dict,
    activation: str,
    dropout: float,
    skipinit: bool,
    skipinit_value: float,
    alpha: float | None,
    skip_gain_init: float | None,
    downsample: str | None,
) -> nn.Module:
    _check_nf_options(name, norm, skipinit, alpha, skip_gain_init, downsample)
    dropout = check_dropout(dropout)
    if norm == NF:
        return NFResNet(
            stem_width=stem_width,
            stage_widths=stage_widths,
            blocks_per_stage=n,
            num_classes=num_classes,
            in_channels=in_channels,
            dims=dims,
            activation=activation,
            alpha=0.2 if alpha is None else alpha,
            skip_gain_init=0.0 if skip_gain_init is None else skip_gain_init,
            downsample="conv" if downsample is None else downsample,
            dropout=dropout,
            norm_options=norm_options,
        )
    return PreActResNet(
        stem_width=stem_width,
        stage_widths=stage_widths,
        blocks_per_stage=n,
        num_classes=num_classes,
        in_channels=in_channels,
        dims=dims,
        norm=norm,
        norm_options=norm_options,
        activation=activation,
        dropout=dropout,
        skipinit=skipinit,
        skipinit_value=skipinit_value,
    )


@register_model("resnet")
def resnet(
    *,
    norm: str,
    num_classes: int,
    in_channels: int,
    dims: int,
    width: float | None,
    depth: int | None,
    norm_options: dict,
    activation: str = "relu",
    skipinit: bool = False,
    skipinit_value: float = 0.0,
    dropout: float = 0.0,
    alpha: float | None = None,
    skip_gain_init: float | None = None,
    downsample: str | None = None,
) -> nn.Module:
    """Pre-activation CIFAR ResNet of ``depth`` = 6n+2 layers (default 20), stage widths 16/32/64 times
    ``width`` (default 1). ``skipinit=True`` puts ``SkipInit(skipinit_value)`` (default 0) at the end of every
    residual branch. ``norm="nf"`` builds the same layout as an NF-ResNet (``alpha``, ``skip_gain_init``,
    ``downsample``; see ``normlab.models.nf_resnet``)."""
    depth = 20 if depth is None else depth
    n = blocks_per_stage("resnet", depth, 2, "20, 32, 44, 56, 110")
    width = 1.0 if width is None else check_positive_float("width", width)
    widths = tuple(max(1, round(c * width)) for c in (16, 32, 64))
    return _build(
        "resnet",
        stem_width=widths[0],
        stage_widths=widths,
        n=n,
        norm=norm,
        num_classes=check_classes("resnet", num_classes),
        in_channels=in_channels,
        dims=dims,
        norm_options=norm_options,
        activation=activation,
        dropout=dropout,
        skipinit=skipinit,
        skipinit_value=skipinit_value,
        alpha=alpha,
        skip_gain_init=skip_gain_init,
        downsample=downsample,
    )


@register_model("wide_resnet")
def wide_resnet(
    *,
    norm: str,
    num_classes: int,
    in_channels: int,
    dims: int,
    width: float | None,
    depth: int | None,
    norm_options: dict,
    activation: str = "relu",
    skipinit: bool = False,
    skipinit_value: float = 0.0,
    dropout: float = 0.0,
    alpha: float | None = None,
    skip_gain_init: float | None = None,
    downsample: str | None = None,
) -> nn.Module:
    """Wide ResNet WRN-``depth``-``width`` (depth = 6n+4, default 16; widening factor k = ``width``, default
    4): stem 16 channels, stages 16k/32k/64k, ``dropout`` between the block's convs (0.3 in the paper's
    dropout runs, 0 by default). Defaults to WRN-16-4 (2.7M parameters), small enough for CPU studies."""
    depth = 16 if depth is None else depth
    n = blocks_per_stage("wide_resnet", depth, 4, "16, 22, 28, 40")
    k = 4.0 if width is None else check_positive_float("width", width)
    widths = tuple(max(1, round(c * k)) for c in (16, 32, 64))
    return _build(
        "wide_resnet",
        stem_width=16,
        stage_widths=widths,
        n=n,
        norm=norm,
        num_classes=check_classes("wide_resnet", num_classes),
        in_channels=in_channels,
        dims=dims,
        norm_options=norm_options,
        activation=activation,
        dropout=dropout,
        skipinit=skipinit,
        skipinit_value=skipinit_value,
        alpha=alpha,
        skip_gain_init=skip_gain_init,
        downsample=downsample,
    )


for _depth in (20, 56, 110):
    register_alias(f"resnet{_depth}", "resnet", depth=_depth)
