"""convert_norm, fold_bn and precise_bn on a torchvision-style ResNet built from torch.nn only."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError
from normlab.layers import FrozenBatchNorm, GhostBatchNorm, convert_norm, fold_bn, precise_bn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (stem, Bottleneck stages with a downsample Sequential, fc), small."""

    def __init__(self, widths=(4, 8), num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        layers, in_ch = [], 8
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = nn.Sequential(nn.Conv2d(in_ch, w * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(w * 4))
            layers.append(nn.Sequential(Bottleneck(in_ch, w, stride, down), Bottleneck(w * 4, w)))
            in_ch = w * 4
        self.layer1, self.layer2 = layers
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomized_resnet() -> TinyResNet:
    model = TinyResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


# --- convert_norm ----------------------------------------------------------------------------------------

def test_convert_bn_to_frozen_keeps_state_dict_values_and_function():
    model = _randomized_resnet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    convert_norm(model, "frozen_bn")
    assert _count(model, nn.BatchNorm2d) == 0 and _count(model, FrozenBatchNorm) == 15
    after = model.state_dict()
    for key, value in before.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(after[key], value), key
    torch.testing.assert_close(model(x), y)


def test_convert_bn_to_gn_copies_affine_and_to_ghost_copies_stats():
    model = _randomized_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_norm(model, "gn", groups=2)
    gns = dict(model.named_modules())
    assert isinstance(gns["layer1.0.downsample.1"], nn.GroupNorm)
    assert gns["layer1.0.downsample.1"].num_groups == 2
    assert torch.equal(model.state_dict()["layer2.1.bn3.weight"], before["layer2.1.bn3.weight"])
    assert torch.equal(model.state_dict()["layer2.1.bn3.bias"], before["layer2.1.bn3.bias"])
    model = _randomized_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_norm(model, "ghost_bn", virtual_batch_size=4)
    assert _count(model, GhostBatchNorm) == 15
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    back = convert_norm(model, "bn")
    assert isinstance(back.layer1[0].bn2, nn.BatchNorm2d)  # dims=2 recorded by the ghost layer
    assert torch.equal(back.state_dict()["layer1.0.bn2.running_var"], before["layer1.0.bn2.running_var"])


def test_convert_keeps_eps_momentum_training_and_dtype():
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4, eps=1e-3, momentum=0.3)).double().eval()
    convert_norm(model, "batch_renorm")
    layer = model[1]
    assert layer.eps == 1e-3 and layer.momentum == 0.3 and layer.dims == 1
    assert not layer.training and layer.weight.dtype == torch.float64


def test_convert_root_norm_groupnorm_and_layernorm():
    gn = nn.GroupNorm(2, 6)
    new = convert_norm(gn, "bn", dims=1)
    assert isinstance(new, nn.BatchNorm1d) and new.num_features == 6
    mlp = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.ReLU())
    convert_norm(mlp, "bn")
    assert isinstance(mlp[1], nn.BatchNorm1d) and mlp[1].num_features == 5


def test_convert_unmappable_layer_names_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.LayerNorm([4, 6, 6])))
    with pytest.raises(NormlabError, match=r"convert 1\.0 \(LayerNorm over normalized_shape=\(4, 6, 6"):
        convert_norm(model, "bn")
    model = _randomized_resnet()
    with pytest.raises(NormlabError, match=r"convert bn1 \(BatchNorm2d, 8 channels\) to .gn.: groups="):
        convert_norm(model, "gn", groups=3)
    with pytest.raises(NormlabError, match="unknown norm 'nope'"):
        convert_norm(model, "nope")
    with pytest.raises(NormlabError, match="unknown option"):
        convert_norm(model, "bn", groups=2)


# --- fold_bn ----------------------------------------------------------------------------------------------

def test_fold_bn_resnet_equal_outputs_and_input_untouched():
    model = _randomized_resnet().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_bn(model)
    assert _count(folded, nn.BatchNorm2d) == 0
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert _count(model, nn.BatchNorm2d) == 15
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_fold_bn_leaves_preactivation_bn_and_folds_linear_bn1d_and_frozen():
    model = nn.Sequential(
        nn.BatchNorm2d(3),                       # pre-activation: follows no conv, stays
        nn.Conv2d(3, 4, 3, bias=True), FrozenBatchNorm(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6),
    )
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean", "bias"):
                if getattr(m, name, None) is not None:
                    getattr(m, name).normal_()
            if getattr(m, "running_var", None) is not None:
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    folded = fold_bn(model)
    kinds = [type(m).__name__ for m in folded.modules()]
    assert kinds.count("BatchNorm2d") == 1 and "FrozenBatchNorm" not in kinds and "BatchNorm1d" not in kinds
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_bn_in_training_mode_raises():
    with pytest.raises(NormlabError, match=r"fold_bn needs a model in eval mode.*call model\.eval\(\) first"):
        fold_bn(_randomized_resnet())


# --- precise_bn -------------------------------------------------------------------------------------------

def _two_bn_model():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1),
                          nn.BatchNorm2d(4, momentum=0.05))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return model


def test_precise_bn_is_the_population_statistics_of_all_batches_by_hand():
    # Wu & Johnson 2021, Appendix: the variance of all batches combined, E[x^2] - E[x]^2 (biased), each layer
    # seeing the training-mode output of the layers before it; batches of different sizes weigh by size.
    model = _two_bn_model().eval()
    params = {k: v.clone() for k, v in model.named_parameters()}
    batches = [(torch.randn(2 + 2 * i, 2, 5, 5) * (1 + i) + i, torch.zeros(6)) for i in range(3)]
    inputs1, inputs2 = [], []
    for x, _ in batches:
        h = model[0](x)
        inputs1.append(h.transpose(0, 1).reshape(3, -1))
        a = F.relu(F.batch_norm(h, None, None, model[1].weight, model[1].bias, training=True))
        inputs2.append(model[3](a).transpose(0, 1).reshape(4, -1))
    precise_bn(model, batches)
    for bn, inputs in ((model[1], inputs1), (model[4], inputs2)):
        values = torch.cat(inputs, dim=1).double()
        torch.testing.assert_close(bn.running_mean, values.mean(1).float())
        torch.testing.assert_close(bn.running_var, values.var(1, correction=0).float())
        assert int(bn.num_batches_tracked) == 0
    assert not model.training and not model[1].training
    assert model[1].momentum == 0.1 and model[4].momentum == 0.05
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])


def _offset_conv_net() -> nn.Module:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)]
    return nn.Sequential(*convs, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.BatchNorm1d(6))


def _offset_images(n: int) -> torch.Tensor:
    """Images whose samples differ by a constant offset: the variance between samples is what small batches
    miss."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=gen) + 3 * torch.randn(n, 1, 1, 1, generator=gen)


@pytest.mark.parametrize("batch_size", [2, 8])
def test_precise_bn_equals_fvcore_update_bn_stats(batch_size):
    fvcore_precise_bn = pytest.importorskip("fvcore.nn.precise_bn")
    x = _offset_images(160)
    batches = list(x.split(batch_size))
    ours, theirs = _offset_conv_net(), _offset_conv_net()
    precise_bn(ours, batches)
    fvcore_precise_bn.update_bn_stats(theirs.train(), batches, num_iters=len(batches))
    bns = [m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    refs = [m for m in theirs.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn, ref in zip(bns, refs, strict=True):
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-4, atol=1e-5)
    # and both are the first layer input's population variance, which the mean of per-batch variances
    # underestimates at batch 2 (the between-sample offsets are missing)
    with torch.no_grad():
        h = ours[0](x).transpose(0, 1).reshape(8, -1).double()
    torch.testing.assert_close(bns[0].running_var.double(), h.var(1, correction=0), rtol=1e-5, atol=1e-6)
    if batch_size == 2:
        per_batch = torch.stack([ours[0](b).var(dim=(0, 2, 3)) for b in batches]).mean(0).double().detach()
        assert (per_batch / h.var(1, correction=0)).mean() < 0.9


def test_precise_bn_num_batches_and_errors():
    model = _two_bn_model().train()
    batches = [torch.randn(4, 2, 5, 5) for _ in range(5)]
    precise_bn(model, iter(batches), num_batches=1)
    h = model[0](batches[0])
    torch.testing.assert_close(model[1].running_mean, h.mean(dim=(0, 2, 3)).detach())
    assert model.training
    with pytest.raises(NormlabError, match="has no BatchNorm layer"):
        precise_bn(nn.Sequential(nn.Linear(2, 2)), batches)
    before = model[1].running_mean.clone()
    with pytest.raises(NormlabError, match="the batch iterator yielded no batch"):
        precise_bn(model, [])
    assert torch.equal(model[1].running_mean, before)
