"""Residual structure from the graph (normlab.layers.residual_graph) and what uses it: the NF conversion of
models written in the public styles (tests/user_models/styles.py) and the residual probes on them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError
from normlab.layers import ScaledStdConv2d, to_normalizer_free
from normlab.layers.kinds import is_norm
from normlab.layers.normalizer_free import NFSkipGain
from normlab.layers.residual_graph import analyze
from normlab.probes import residual_scale, signal_propagation

STYLES_FILE = Path(__file__).parent / "user_models" / "styles.py"
_spec = importlib.util.spec_from_file_location("user_styles", STYLES_FILE)
styles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(styles)
ALPHA2 = 0.2**2


def _joins(model):
    return [(j.name, j.kind, j.projects) for j in analyze(model).joins]


def test_joins_of_every_style_come_from_the_graph_whatever_the_names():
    post = [("layer1.0", "post-activation", False), ("layer1.1", "post-activation", False),
            ("layer2.0", "post-activation", True), ("layer2.1", "post-activation", False)]
    assert _joins(styles.cifar_resnet(width=4))[:4] == post  # `out += self.shortcut(x)`, F.relu after it
    pre = _joins(styles.preact_resnet(width=4))
    assert pre[:3] == [("layer1.0", "pre-activation", False), ("layer1.1", "pre-activation", False),
                       ("layer2.0", "pre-activation", True)]
    assert _joins(styles.mobilenet_v2()) == [(f"features.{i}", "plain", False) for i in (3, 4, 5, 7, 8, 10)]
    assert _joins(styles.named_blocks()) == [("units.0", "post-activation", False),
                                             ("units.1", "post-activation", True),
                                             ("units.2", "post-activation", False)]
    assert _joins(styles.sequential_cnn()) == []
    graph = analyze(styles.cifar_resnet(width=4))
    join = graph.joins[2]  # layer2.0: branch conv-bn-relu-conv-bn, projection conv-bn
    assert [n.target for n in join.branch_nodes if n.op == "call_module"] == [
        "layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2"]
    assert [n.target for n in join.shortcut_nodes] == ["layer2.0.shortcut.0", "layer2.0.shortcut.1"]
    assert join.output.target is F.relu and join.split is graph.joins[1].output
    assert graph.stem.target is F.relu  # the stem's F.relu feeds the first block


def test_operand_order_torch_add_and_constants():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
            self.offset = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            y = torch.add(x, self.b(self.a(x)))  # shortcut first
            y = y + 1.0                          # a constant: no join
            return y + self.offset               # a learned tensor: no join

    joins = analyze(Net()).joins
    assert len(joins) == 1 and joins[0].shortcut_out.op == "placeholder"
    assert joins[0].branch_out.target == "b" and joins[0].kind == "plain"


def _gains(model):
    return [m for m in model.modules() if isinstance(m, NFSkipGain)]


@pytest.mark.parametrize("factory",
                         ["cifar_resnet", "preact_resnet", "mobilenet_v2", "named_blocks", "kw_net"])
def test_nf_conversion_leaves_no_norm_and_starts_each_block_as_its_shortcut(factory):
    """No norm left; a skip gain (init 0) on every join; Scaled WS convs with a bias; zeroed classifier;
    at init the features do not depend on any residual branch's weights."""
    torch.manual_seed(0)
    kwargs = {"width": 8} if factory.endswith("resnet") else {}
    model = to_normalizer_free(getattr(styles, factory)(**kwargs))
    joins = analyze(model).joins
    assert not any(is_norm(m) for m in model.modules())
    assert len(_gains(model)) == len(joins) > 0 and all(g.gain.item() == 0.0 for g in _gains(model))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(c, ScaledStdConv2d) and c.bias is not None for c in convs)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert type(head) is nn.Linear and head.weight.abs().sum() == 0
    x = torch.randn(4, 3, 16, 16)
    head_in = {}
    head.register_forward_pre_hook(lambda _m, inputs: head_in.update(x=inputs[0].clone()))
    with torch.no_grad():
        model(x)
        before = head_in["x"]
        for join in joins:  # scramble every residual branch's convs: nothing changes at init
            for node in join.branch_nodes:
                if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Conv2d):
                    model.get_submodule(node.target).weight.normal_()
        model(x)
    torch.testing.assert_close(head_in["x"], before, rtol=0, atol=0)


def test_preactivation_nf_net_follows_the_schedule_and_keeps_the_mean_bounded():
    """Brock et al. 2021a Fig. 2 on N(0, 1) input (skip gain 1): within a stage avg_var grows by
    alpha^2 * res_avg_var per block, it resets to ~1 + alpha^2 at each projection, and the squared channel
    mean stays near 0 with depth (the BN-free ReLU net without WS grows it)."""
    torch.manual_seed(0)
    model = to_normalizer_free(styles.preact_resnet(width=16), skip_gain_init=1.0)
    spp = signal_propagation(model, input_shape=(3, 32, 32), batch_size=32)
    var, res = spp.avg_var, spp.res_avg_var
    assert list(var) == ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert var["conv1"] == pytest.approx(1.0, abs=0.08)
    names = list(var)
    for prev, block in zip(names, names[1:], strict=False):
        if block.endswith(".0") and block != "layer1.0":
            assert var[block] < var[prev], block  # reset by the projection shortcut
        elif not block.startswith("layer4"):  # 4x4 maps: padding lowers the branch variance there
            growth = var[block] - var[prev]  # alpha^2 Var(branch) + the branch-shortcut covariance
            assert growth == pytest.approx(ALPHA2 * res[block], abs=0.02), block
            assert 0.5 * ALPHA2 < growth < 1.5 * ALPHA2, block
    assert var["layer2.0"] == pytest.approx(1 + ALPHA2, abs=0.1)  # its input: below the expected 1.08
    assert max(spp.avg_sq_mean.values()) < 0.05
    betas = [c.gamma / 1.7139588594436646 for n, c in model.named_modules()
             if n.endswith("conv1") and n.startswith("layer")]
    assert betas == pytest.approx([1.0, (1 + ALPHA2) ** -0.5, (1 + 2 * ALPHA2) ** -0.5, (1 + ALPHA2) ** -0.5,
                                   (1 + 2 * ALPHA2) ** -0.5, (1 + ALPHA2) ** -0.5, (1 + 2 * ALPHA2) ** -0.5,
                                   (1 + ALPHA2) ** -0.5], rel=1e-6)


def test_post_activation_nf_net_keeps_the_mean_bounded_where_the_old_conversion_grew_it():
    """The issue's ResNet-18: squared channel mean 0.0002 -> 26 with depth after the old conversion; gated
    as SkipInit it stays at the stem's level (skip gain 1: the branches are live)."""
    torch.manual_seed(0)
    spp = signal_propagation(to_normalizer_free(styles.cifar_resnet(width=16), skip_gain_init=1.0),
                             input_shape=(3, 32, 32), batch_size=16)
    assert list(spp.avg_sq_mean)[:2] == ["relu", "layer1.0"]
    assert max(spp.avg_sq_mean.values()) < 0.4 and max(spp.avg_var.values()) < 0.6


def test_residual_probes_on_user_names_sequential_and_in_place_adds():
    torch.manual_seed(0)
    model = styles.named_blocks()
    ratio = residual_scale(model, input_shape=(3, 16, 16), batch_size=16)
    assert list(ratio.ratio) == ["units.0", "units.1", "units.2"]
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():  # by hand: branch = n_b output, shortcut = proj output or the unit's input
        h = model.entry(x)
        unit = model.units[0]
        branch = unit.n_b(unit.c_b(unit.act(unit.n_a(unit.c_a(h)))))
    got = residual_scale(model, x, mode="train").ratio["units.0"]
    assert got == pytest.approx((branch.double().std(unbiased=False) / h.double().std(unbiased=False)).item(),
                                rel=1e-5)
    nf = residual_scale(to_normalizer_free(styles.cifar_resnet(width=4)), input_shape=(3, 16, 16))
    assert set(nf.ratio.values()) == {0.0}  # in-place `out +=` did not overwrite the captured branch
    spp = signal_propagation(styles.sequential_cnn(), input_shape=(3, 16, 16), batch_size=16)
    assert list(spp.avg_var) == ["2", "6"] and spp.res_avg_var == {}  # one point per activation
    bn = spp.avg_var["2"]  # after BN + ReLU on N(0, 1): Var[relu(z)] = 1/2 - 1/(2 pi)
    assert bn == pytest.approx(0.5 - 1 / (2 * torch.pi), abs=0.03)


def test_what_the_conversion_cannot_place_is_refused_naming_the_module():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.gate(x))

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else x

    with pytest.raises(NormlabError, match=r"module gate \(Gate\) cannot be traced.*tensor-dependent"):
        to_normalizer_free(Branchy())

    class FunctionalNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            x = F.batch_norm(self.conv(x), None, None, training=True)
            return self.fc(x.mean((2, 3)))

    with pytest.raises(NormlabError, match="calls batch_norm as a function"):
        to_normalizer_free(FunctionalNorm())

    class FunctionEnd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            x = x + torch.tanh(self.conv(x))
            return self.fc(x.mean((2, 3)))

    with pytest.raises(NormlabError, match="join add normalizer-free: its branch end is call_function tanh"):
        to_normalizer_free(FunctionEnd())


def test_convert_norm_refuses_a_norm_called_as_a_function_and_converts_user_names():
    from normlab.layers import convert_norm

    class FunctionalNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.batch_norm(self.bn(self.conv(x)), None, None, training=True)

    with pytest.raises(NormlabError, match=r"FunctionalNorm.forward calls batch_norm as a function"):
        convert_norm(FunctionalNorm(), "gn")
    model = convert_norm(styles.named_blocks(), "gn")
    assert isinstance(model.units[1].n_a, nn.GroupNorm) and not any(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())
