"""A user's 1-D model file, for signals of shape (N, C, L) such as MNIST-1D (normlab's default data set,
40 samples, 1 channel), written from torch.nn only. Its factory takes no ``width``: a study run on it
(``normlab study large-batch --model examples/my_1d_models.py:net``) passes only the recipe fields the
factory names (``num_classes``, ``in_channels``).
"""

from __future__ import annotations

from torch import nn


def net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """conv-BN-ReLU x3 (32 channels, the second and third stride 2), global average pool, linear."""
    layers: list[nn.Module] = []
    channels = in_channels
    for stride in (1, 2, 2):
        layers += [nn.Conv1d(channels, 32, 5, stride=stride, padding=2, bias=False), nn.BatchNorm1d(32),
                   nn.ReLU()]
        channels = 32
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, num_classes))
