"""Group Norm's default group count (issue 10): Group Norm at every common width, never Instance Norm."""

import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.layers import create_norm, default_groups
from normlab.models import create_model


def _reference_rule(c: int) -> int:
    # Wu & He 2018: G = 32 where it fits; here the largest G <= 32 dividing C with >= 2 channels per group.
    return max([g for g in range(1, 33) if c % g == 0 and c // g >= 2] or [1])


@pytest.mark.parametrize("channels", [8, 12, 16, 24, 25, 32, 48, 64, 96, 100, 128, 192, 256, 384, 512])
def test_default_groups_is_group_norm_at_common_widths(channels):
    layer = create_norm("gn", channels)
    assert isinstance(layer, nn.GroupNorm)
    assert layer.num_groups == default_groups(channels) == _reference_rule(channels)
    assert channels // layer.num_groups >= 2  # never Instance Norm
    assert layer.num_groups <= 32
    x = torch.randn(3, channels, 4, 4)
    ref = nn.GroupNorm(layer.num_groups, channels)
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize(
    "channels,groups",
    [(8, 4), (16, 8), (24, 12), (25, 5), (48, 24), (64, 32), (96, 32), (100, 25), (256, 32), (512, 32),
     (7, 1)],
)
def test_default_groups_values(channels, groups):
    assert default_groups(channels) == groups


def test_mnist1d_cnn_gets_five_groups_of_five():
    model = create_model("cnn", norm="gn", dims=1, in_channels=1, num_classes=10)
    assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)] == [5, 5, 5]


def test_explicit_groups_must_divide():
    assert create_norm("gn", 25, groups=25).num_groups == 25  # Instance Norm only when asked for
    with pytest.raises(NormlabError, match=r"groups=32 does not divide num_channels=16; omit groups for the "
                                           r"default \(8 groups for 16 channels\)"):
        create_norm("gn", 16, groups=32)
    with pytest.raises(NormlabError, match="groups must be a positive int, got 0"):
        create_norm("gn", 16, groups=0)
