"""Model files written the way public CIFAR model files and quick experiments are written (test data for
the residual-graph analysis, NF conversion and the probes; not normlab's own models).

- ``cifar_resnet``: the post-activation ResNet of the common public CIFAR files (kuangliu/pytorch-cifar):
  projection in ``self.shortcut`` (an empty ``nn.Sequential`` when identity), ``out += self.shortcut(x)``,
  ``F.relu`` after the add;
- ``preact_resnet``: the pre-activation form of the same files (``PreActBlock``: the shortcut projects the
  pre-activated input);
- ``mobilenet_v2``: inverted residuals with depthwise convs and ReLU6 (a residual only at stride 1 with
  equal channels);
- ``named_blocks``: blocks with the user's own names (``c_a``, ``n_a``, ``c_b``, ``n_b``, ``proj``);
- ``sequential_cnn``: a plain ``nn.Sequential`` CNN (no residual);
- ``kw_net``: a keyword-only factory (``*, num_classes, in_channels``) of a small residual net.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 preact: bool = False):
        super().__init__()
        self.in_planes = width
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2)
        self.bn_final = nn.BatchNorm2d(8 * width) if preact else nn.Identity()
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x) if self.preact else F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


def cifar_resnet(num_classes: int = 10, in_channels: int = 3, width: int = 64, depth: int = 18) -> nn.Module:
    """ResNet-18 (depth 18: 2-2-2-2 blocks) or a shorter one (depth 10: 1-1-1-1), post-activation."""
    blocks = {18: (2, 2, 2, 2), 10: (1, 1, 1, 1)}[depth]
    return ResNet(BasicBlock, blocks, num_classes, in_channels, width)


def preact_resnet(num_classes: int = 10, in_channels: int = 3, width: int = 64, depth: int = 18) -> nn.Module:
    blocks = {18: (2, 2, 2, 2), 10: (1, 1, 1, 1)}[depth]
    return ResNet(PreActBlock, blocks, num_classes, in_channels, width, preact=True)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, out channels, repeats, stride) at width 1/4 of MobileNetV2's first stages
    cfg = ((1, 8, 1, 1), (6, 8, 2, 1), (6, 16, 3, 2), (6, 24, 2, 2))

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU6(inplace=True))
        inp = 8
        for t, c, n, s in self.cfg:
            for i in range(n):
                self.features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        self.features.append(nn.Sequential(nn.Conv2d(inp, 64, 1, bias=False), nn.BatchNorm2d(64),
                                           nn.ReLU6(inplace=True)))
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return MobileNetV2(num_classes, in_channels)


class Unit(nn.Module):
    """A residual unit with the user's own names."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n_a = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.c_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n_b = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        skip = x if self.proj is None else self.proj(x)
        h = self.n_b(self.c_b(self.act(self.n_a(self.c_a(x)))))
        return self.act(h + skip)


class NamedNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU())
        self.units = nn.ModuleList([Unit(width, width, 1), Unit(width, 2 * width, 2),
                                    Unit(2 * width, 2 * width, 1)])
        self.out = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.entry(x)
        for unit in self.units:
            x = unit(x)
        return self.out(x.mean((2, 3)))


def named_blocks(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    return NamedNet(num_classes, in_channels, width)


def sequential_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def kw_net(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A keyword-only factory (no ``width``): a small post-activation residual net."""
    return NamedNet(num_classes, in_channels, width=8)
