"""Forward-pass probes (SPP, residual scale, example similarity, activation stats) against by-hand numbers."""

import numpy as np
import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes import (
    ActivationTracker,
    activation_stats,
    example_similarity,
    residual_scale,
    signal_propagation,
)


class Scale(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x * self.value


class Block(nn.Module):
    def __init__(self, ch, skip):
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1)
        )
        self.skip_scale = Scale(skip)
        self.shortcut = nn.Identity()

    def forward(self, x):
        pre = self.preact(x)
        return self.shortcut(x) + self.skip_scale(self.branch(pre))


class TwoBlockNet(nn.Module):
    def __init__(self, skip=0.5):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.body = nn.Sequential(Block(3, skip), Block(3, skip))
        self.classifier = nn.Linear(3, 4)

    def blocks(self):
        yield "body.0", self.body[0]
        yield "body.1", self.body[1]

    def forward(self, x):
        return self.classifier(self.body(self.stem(x)).mean((2, 3)))


def _by_hand_stats(t):
    """avg_sq_mean and avg_var written out channel by channel (biased variance)."""
    sq, var = [], []
    for c in range(t.shape[1]):
        v = t[:, c].reshape(-1).double()
        m = v.sum() / v.numel()
        sq.append(m**2)
        var.append(((v - m) ** 2).sum() / v.numel())
    return (sum(sq) / len(sq)).item(), (sum(var) / len(var)).item()


def _manual_forward(net, x):
    """Stem, block outputs and branch outputs computed by calling the submodules in order."""
    points, branches, shortcuts, contribs = {}, {}, {}, {}
    h = net.stem(x)
    points["stem"] = h
    for name, block in net.blocks():
        pre = block.preact(h)
        branch = block.branch(pre)
        contrib = block.skip_scale(branch)
        branches[name], shortcuts[name], contribs[name] = branch, h, contrib
        h = h + contrib
        points[name] = h
    return points, branches, shortcuts, contribs


def test_spp_matches_by_hand_on_a_two_block_net():
    net = TwoBlockNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(6, 2, 5, 5) * 2 + 1
    result = signal_propagation(net, x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # running stats untouched
    with torch.no_grad():
        points, branches, _, _ = _manual_forward(net, x)
    assert list(result.avg_var) == ["stem", "body.0", "body.1"]
    assert list(result.res_avg_var) == ["body.0", "body.1"]
    for name, t in points.items():
        sq, var = _by_hand_stats(t)
        assert result.avg_sq_mean[name] == pytest.approx(sq, rel=1e-6)
        assert result.avg_var[name] == pytest.approx(var, rel=1e-6)
    for name, t in branches.items():
        assert result.res_avg_var[name] == pytest.approx(_by_hand_stats(t)[1], rel=1e-6)
    assert result.input == "batch" and result.mode == "train"


def test_spp_gaussian_input_and_unbiased_option():
    net = TwoBlockNet()
    a = signal_propagation(net, input_shape=(2, 5, 5), batch_size=4, seed=3)
    x = torch.randn((4, 2, 5, 5), generator=torch.Generator().manual_seed(3))
    b = signal_propagation(net, x)
    assert a.input == "gaussian" and a.avg_var == pytest.approx(b.avg_var)
    n = 4 * 25  # elements per channel at the stem
    c = signal_propagation(net, x, unbiased=True)
    assert c.avg_var["stem"] == pytest.approx(b.avg_var["stem"] * n / (n - 1), rel=1e-9)


class BasicBlockLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.conv2, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TorchvisionLike(nn.Module):
    """timm/torchvision naming: conv1, bn1, layer1.0 with a bn2 at the end of the branch; no blocks()."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.layer1 = nn.Sequential(BasicBlockLike(), BasicBlockLike())

    def forward(self, x):
        return self.layer1(self.bn1(self.conv1(x)))


def test_spp_falls_back_to_timm_names_and_errors_without_blocks():
    net = TorchvisionLike()
    x = torch.randn(4, 1, 4, 4)
    result = signal_propagation(net, x)
    with torch.no_grad():
        h = net.bn1(net.conv1(x))
        expected = {"bn1": h}
        for i, blk in enumerate(net.layer1):
            branch = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(h)))))
            h = torch.relu(h + branch)
            expected[f"layer1.{i}"] = h
            assert result.res_avg_var[f"layer1.{i}"] == pytest.approx(_by_hand_stats(branch)[1], rel=1e-6)
    assert list(result.avg_var) == list(expected)
    for name, t in expected.items():
        assert result.avg_var[name] == pytest.approx(_by_hand_stats(t)[1], rel=1e-6)
    with pytest.raises(NormlabError, match="cannot find residual blocks in Sequential"):
        signal_propagation(nn.Sequential(nn.Linear(3, 3)), torch.randn(4, 3))
    with pytest.raises(NormlabError, match="give a batch x or an input_shape"):
        signal_propagation(TwoBlockNet())
    with pytest.raises(NormlabError, match="of 1 example\\(s\\) is too small for mode='train'"):
        signal_propagation(TwoBlockNet(), torch.randn(1, 2, 5, 5))
    assert signal_propagation(TwoBlockNet(), torch.randn(1, 2, 5, 5), mode="eval").mode == "eval"


def test_residual_scale_matches_by_hand_and_skipinit_zero():
    net = TwoBlockNet(skip=0.5)
    x = torch.randn(6, 2, 5, 5)
    result = residual_scale(net, x)
    with torch.no_grad():
        _, _, shortcuts, contribs = _manual_forward(net, x)
    for name in ("body.0", "body.1"):
        expected = contribs[name].double().std(unbiased=False) / shortcuts[name].double().std(unbiased=False)
        assert result.ratio[name] == pytest.approx(expected.item(), rel=1e-6)
    zero = residual_scale(TwoBlockNet(skip=0.0), x)
    assert all(r == 0.0 for r in zero.ratio.values())
    with pytest.raises(NormlabError, match="residual_scale needs a residual model .* Sequential has none"):
        residual_scale(nn.Sequential(nn.Linear(3, 3)), torch.randn(4, 3))


def test_example_similarity_by_hand_and_collapse():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    result = example_similarity(net, x)
    with torch.no_grad():
        h = {"0": net[0](x), "2": net(x)}
    for name, a in h.items():
        a = a.double()
        cos, inner = [], []
        for i in range(6):
            for j in range(6):
                if i != j:
                    inner.append(a[i] @ a[j])
                    cos.append(a[i] @ a[j] / (a[i].norm() * a[j].norm()))
        assert result.mean_cosine[name] == pytest.approx(torch.stack(cos).mean().item(), rel=1e-9)
        assert result.mean_inner[name] == pytest.approx(torch.stack(inner).mean().item(), rel=1e-9)
    preds = h["2"].argmax(1)
    top = torch.bincount(preds, minlength=3).max().item()
    assert result.collapse == pytest.approx(top / 6)
    # A network whose output ignores the input predicts one class for all: collapse = 1, cosine = 1.
    const = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        const[0].weight.zero_()
        const[0].bias.copy_(torch.tensor([0.0, 2.0, 1.0]))
    collapsed = example_similarity(const, x)
    assert collapsed.collapse == 1.0 and collapsed.top_class == 1
    assert collapsed.mean_cosine["0"] == pytest.approx(1.0)
    with pytest.raises(NormlabError, match="at least 2 examples, got 1"):
        example_similarity(net, x[:1])
    with pytest.raises(NormlabError, match="unknown layer name\\(s\\) 'fc'"):
        example_similarity(net, x, layers=["fc"])


def test_activation_stats_against_numpy_percentiles():
    net = nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4, 3))
    x = torch.randn(10, 2, 6)
    stats = activation_stats(net, x, units_per_layer=3, seed=7)
    again = activation_stats(net, x, units_per_layer=3, seed=7)
    assert stats.units == again.units and len(stats.units["0"]) == 3
    with torch.no_grad():
        conv = net[0](x).numpy()
    for j, unit in enumerate(stats.units["0"]):
        values = conv[:, unit, :].reshape(-1)  # batch and length both count as batch
        expected = np.percentile(values, [1, 15, 50, 85, 99])
        assert stats.percentiles["0"][j] == pytest.approx(expected, rel=1e-5)
        assert stats.mean["0"][j] == pytest.approx(values.mean(), rel=1e-5, abs=1e-6)
        assert stats.var["0"][j] == pytest.approx(values.var(), rel=1e-5)
    assert list(stats.units) == ["0", "4"]
    with pytest.raises(NormlabError, match="percentiles must be .* in \\[0, 100\\], got \\[150.0\\]"):
        activation_stats(net, x, percentiles=[150])


def test_activation_tracker_changes_and_drift():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(16, 3)
    tracker = ActivationTracker(layers=["0"], units_per_layer=4)
    means, variances = [], []
    for step in range(3):
        tracker.update(net, x, step)
        with torch.no_grad():
            h = net[0](x).double()
            means.append(h.mean(0))
            variances.append(h.var(0, unbiased=False))
            net[0].weight.mul_(1.5).add_(0.1)
    traj = tracker.result()
    assert traj.steps == [0, 1, 2]
    mu, var = torch.stack(means), torch.stack(variances)
    assert traj.mean_change["0"] == pytest.approx([0.0, *(mu[1:] - mu[:-1]).abs().mean(1).tolist()], rel=1e-9)
    assert traj.var_drift["0"] == pytest.approx((var - var[0]).abs().mean(1).tolist(), rel=1e-9)
    assert traj.mean["0"] == pytest.approx(mu.mean(1).tolist(), rel=1e-9)
    with pytest.raises(NormlabError, match="no recorded steps"):
        ActivationTracker().result()


def test_activation_stats_layer_not_called():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(3, 4), nn.Linear(3, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(NormlabError, match="layer 'spare' was not called by the forward pass"):
        activation_stats(WithSpare(), torch.randn(4, 3), layers=["used", "spare"])
