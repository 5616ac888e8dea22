"""normlab.models: every model x norm builds and trains, the paper layouts, the residual-block contract,
NF-ResNet signal propagation at init, parameter counts, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError
from normlab.layers import ScaledStdConv2d, ScaledStdLinear, SkipInit, activation_gamma
from normlab.models import ResidualBlock, ResidualModel, create_model, list_models
from normlab.models.nf_resnet import NFSkipGain, expected_variances

SMALL = {  # small but complete configurations, so the fast tier stays fast
    # VGG-A: the normalizer-free VGG-16 (13 plain Scaled WS convs, no AGC) does not settle in 4 steps of
    # SGD at lr 0.02; the VGG-16 layout is checked in test_vgg16_layout_matches_the_papers_table.
    "vgg": dict(width=0.125, depth=11),
    "mlp": dict(width=32),
    "dln": dict(depth=6),
    "cnn": dict(),
    "resnet": dict(depth=8),
    "wide_resnet": dict(depth=10, width=1),
    "nf_resnet": dict(depth=8),
}
NORMS = ["bn", "gn", "ln", "none", "nf", "in", "ghost_bn"]


def _input(name: str, dims: int, n: int = 8) -> tuple[torch.Tensor, dict]:
    if name == "dln":
        return torch.randn(n, 10), {}
    if dims == 1:
        return torch.randn(n, 2, 40), dict(in_channels=2)
    sized = {"input_size": 16} if name in ("mlp", "cnn") else {}
    return torch.randn(n, 3, 16, 16), dict(in_channels=3, **sized)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("name", list(SMALL))
def test_every_model_and_norm_trains(name: str, dims: int) -> None:
    norms = ["nf"] if name == "nf_resnet" else NORMS
    for norm in norms:
        torch.manual_seed(0)
        x, extra = _input(name, dims)
        y = torch.randint(0, 10, (len(x),))
        model = create_model(name, norm=norm, dims=dims, num_classes=10, **SMALL[name], **extra)
        assert isinstance(model.classifier, nn.Linear)
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        losses = []
        for _ in range(4):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses), (name, norm, dims, losses)
        assert losses[-1] < losses[0], (name, norm, dims, losses)


def test_norm_layers_are_the_requested_ones() -> None:
    model = create_model("resnet", norm="gn", depth=8, dims=2, in_channels=3, norm_options={"groups": 4})
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 2 * 3 + 1 and all(m.num_groups == 4 for m in gns)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    nf = create_model("vgg", norm="nf", dims=2, in_channels=3, width=0.125)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) for m in nf.modules())
    convs = [m for m in nf.features if isinstance(m, ScaledStdConv2d)]
    # the first conv sees the data (gamma 1); the others follow a ReLU (its gamma)
    assert [c.gamma for c in convs] == [1.0] + [activation_gamma("relu")] * 12  # VGG-16: 13 convs
    assert all(isinstance(m, ScaledStdLinear) for m in nf.head if isinstance(m, nn.Linear))


# --- VGG-16 / VGG-A (Santurkar et al. 2018; Simonyan & Zisserman 2015, Table 1, configurations D and A) ---


def _vgg_layout(model: nn.Module) -> list[str]:
    out = []
    for m in [*model.features, *model.head, model.classifier]:
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            out.append(f"conv{m.out_channels}")
        elif isinstance(m, nn.Linear):
            out.append(f"fc{m.out_features}")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append("bn")
        elif isinstance(m, nn.ReLU):
            out.append("relu")
        elif type(m).__name__ == "MaxPool":
            out.append("M")
    return out


def _conv(n: int) -> list[str]:
    return [f"conv{n}", "bn", "relu"]


#: The CIFAR head: two hidden linears with BN, then the classifier without one (BN after every layer but
#: the last).
_HEAD = ["fc512", "bn", "relu", "fc512", "bn", "relu", "fc10"]


def test_vgg16_layout_matches_the_papers_table() -> None:
    # Simonyan & Zisserman Table 1, configuration D: conv3-64 x2, M, conv3-128 x2, M, conv3-256 x3, M,
    # conv3-512 x3, M, conv3-512 x3, M: 13 convs; with the 3 linears, 16 weight layers. Santurkar et al.'s
    # "Layer #13" is the 13th normalized layer: the last conv.
    c = _conv
    paper = [*c(64), *c(64), "M", *c(128), *c(128), "M", *c(256), *c(256), *c(256), "M",
             *c(512), *c(512), *c(512), "M", *c(512), *c(512), *c(512), "M", *_HEAD]
    for dims in (1, 2):
        model = create_model("vgg", norm="bn", dims=dims, in_channels=3)
        assert _vgg_layout(model) == paper
        assert _vgg_layout(create_model("vgg", norm="bn", dims=dims, in_channels=3, depth=16)) == paper
        convs = [m for m in model.features if isinstance(m, (nn.Conv1d, nn.Conv2d))]
        assert all(m.kernel_size == (3,) * dims and m.padding == (1,) * dims for m in convs)
        weights = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert (len(convs), len(weights), len(norms)) == (13, 16, 15)
    # no norm after the last layer; Glorot-uniform bound sqrt(6 / (fan_in + fan_out)) on the classifier
    model = create_model("vgg", dims=2, in_channels=3)
    bound = math.sqrt(6 / (512 + 10))
    assert model.classifier.weight.abs().max() <= bound
    assert model.classifier.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert _vgg_layout(create_model("vgg", dims=2, in_channels=3, width=0.5))[0] == "conv32"
    assert create_model("vgg", dims=2, in_channels=3)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_a_is_depth_11() -> None:
    # Configuration A: conv3-64, M, conv3-128, M, conv3-256 x2, M, conv3-512 x2, M, conv3-512 x2, M.
    c = _conv
    paper = [*c(64), "M", *c(128), "M", *c(256), *c(256), "M", *c(512), *c(512), "M", *c(512), *c(512), "M"]
    model = create_model("vgg", norm="bn", dims=2, in_channels=3, depth=11)
    assert _vgg_layout(model) == paper + _HEAD
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == 11


def test_vgg_pooling_on_short_and_paper_sized_inputs() -> None:
    model = create_model("vgg", norm="none", dims=1, in_channels=1, width=0.125).eval()
    sizes = []
    for m in model.features:
        if type(m).__name__ == "MaxPool":
            m.register_forward_hook(lambda mod, i, o: sizes.append(o.shape[-1]))
    model(torch.randn(2, 1, 40))
    assert sizes == [20, 10, 5, 2, 1]  # MNIST-1D: five halvings end at one position, as 32x32 -> 1x1
    sizes.clear()
    assert model(torch.randn(2, 1, 6)).shape == (2, 10)  # pools skip dims already of size 1
    assert sizes == [3, 1, 1, 1, 1]


# --- residual models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet", dict(norm="bn")),
        ("resnet", dict(norm="none", skipinit=True, skipinit_value=0.3)),
        ("wide_resnet", dict(norm="gn", width=2, depth=10)),
        ("nf_resnet", dict(skip_gain_init=0.7)),
        ("nf_resnet", dict(skip_gain_init=0.5, downsample="conv")),
    ],
)
def test_blocks_contract_out_equals_shortcut_plus_scaled_branch(name: str, kwargs: dict) -> None:
    kwargs = {"depth": 8, **kwargs}
    model = create_model(name, dims=2, in_channels=3, **kwargs).eval()
    assert isinstance(model, ResidualModel)
    blocks = list(model.blocks())
    assert [n for n, _ in blocks] == [f"stages.{i}.0" for i in range(3)]
    modules = dict(model.named_modules())
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for qname, block in blocks:
        assert isinstance(block, ResidualBlock) and modules[qname] is block
        rec = seen.setdefault(qname, {})
        for part in ("preact", "branch", "skip_scale", "shortcut"):
            getattr(block, part).register_forward_hook(
                lambda m, i, o, rec=rec, part=part: rec.__setitem__(part, o)
            )
        block.register_forward_hook(lambda m, i, o, rec=rec: rec.__setitem__("out", o))
        block.branch.register_forward_hook(lambda m, i, o, rec=rec: rec.__setitem__("branch_in", i[0]))
    model(torch.randn(4, 3, 16, 16))
    for qname, block in blocks:
        rec = seen[qname]
        torch.testing.assert_close(rec["out"], rec["shortcut"] + rec["skip_scale"], rtol=0, atol=1e-6)
        torch.testing.assert_close(rec["branch_in"], rec["preact"])  # the branch runs on preact(x)
        # skip_scale multiplies the branch output by its scalar
        scale = {SkipInit: lambda b: b.alpha, NFSkipGain: lambda b: b.gain * b.alpha}.get(
            type(block.skip_scale)
        )
        if scale is not None:
            torch.testing.assert_close(rec["skip_scale"], rec["branch"] * scale(block.skip_scale))
    # the first block keeps width and resolution (identity shortcut) except in a WRN (16 -> 16k channels)
    assert isinstance(blocks[0][1].shortcut, nn.Identity) == (name != "wide_resnet")
    assert not any(isinstance(b.shortcut, nn.Identity) for _, b in blocks[1:])


def _count_resnet20_params() -> int:
    # He et al. 2016 CIFAR ResNet-20 (3 stages x 3 blocks, 16/32/64 channels), pre-activation, counted by
    # hand: bias-free 3x3 convs, 2 affine norm params per channel, 1x1 projections where width changes.
    conv = lambda cin, cout, k=3: cin * cout * k * k  # noqa: E731
    total = conv(3, 16)
    cin = 16
    for cout in (16, 32, 64):
        for _j in range(3):
            total += 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout)
            if cin != cout:
                total += conv(cin, cout, 1)
            cin = cout
    return total + 2 * 64 + 64 * 10 + 10


def test_param_counts_match_the_papers() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    resnet20 = create_model("resnet20", dims=2, in_channels=3)
    assert count(resnet20) == _count_resnet20_params() == 272_282  # paper: 0.27M
    assert count(create_model("resnet56", dims=2, in_channels=3)) == pytest.approx(0.85e6, rel=0.02)
    assert count(create_model("resnet110", dims=2, in_channels=3)) == pytest.approx(1.7e6, rel=0.02)
    wrn = create_model("wide_resnet", dims=2, in_channels=3, depth=16, width=8)
    assert count(wrn) == pytest.approx(11.0e6, rel=0.01)  # WRN-16-8: 11.0M (Zagoruyko & Komodakis, Table 4)
    assert count(create_model("cnn")) == 25 * 5 + 25 + 2 * (25 * 25 * 3 + 25) + 125 * 10 + 10 + 3 * 2 * 25
    assert len(list(resnet20.blocks())) == 9


def test_resnet_he_init_and_nf_head_as_deepmind() -> None:
    torch.manual_seed(0)
    model = create_model("resnet", depth=8, dims=2, in_channels=3, width=4)
    conv = model.stages[2][0].branch[3]  # 256 -> 256 3x3 conv: fan-out = 9 * 256
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
    # deepmind-research nfnets/nf_resnet.py: pool = mean(activation(out)) with gamma baked into the
    # activation (base.nonlinearities: relu(x) * 1.7139588594436646); fc weight ~ N(0, 0.01), bias 0.
    nf = create_model("nf_resnet", depth=8, dims=2, in_channels=3, width=8, num_classes=100)
    w = nf.classifier.weight
    assert w.shape == (100, 512) and w.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(w.mean().item()) < 0.001 and nf.classifier.bias.abs().sum() == 0
    x = torch.randn(4, 128, 3, 3)
    torch.testing.assert_close(nf.final(x), torch.relu(x) * 1.7139588594436646)
    feats = []
    nf.pool.register_forward_hook(lambda m, i, o: feats.append((i[0], o)))
    with torch.no_grad():
        nf(torch.randn(2, 3, 16, 16))
    pre_pool, _ = feats[0]
    assert pre_pool.min() >= 0  # the head sees the (scaled) activation, not the raw block output
    silu = create_model("nf_resnet", depth=8, dims=2, in_channels=3, activation="silu")
    torch.testing.assert_close(silu.final(x), F.silu(x) * 1.7881293296813965)
    zero = create_model("nf_resnet", depth=8, dims=2, in_channels=3, fc_init_std=0.0)
    assert zero.classifier.weight.abs().sum() == 0
    assert all(b.skip_scale.gain.item() == 0.0 and b.skip_scale.alpha == 0.2 for _, b in nf.blocks())


def test_nf_resnet_beta_follows_the_expected_variance_schedule() -> None:
    # timm nfnet.py: beta = expected_var ** -0.5; expected_var resets to 1 after a stage's first block
    alpha = 0.2
    assert expected_variances(3, 3, alpha) == pytest.approx(
        [1, 1 + alpha**2, 1 + 2 * alpha**2, 1 + 3 * alpha**2, 1 + alpha**2, 1 + 2 * alpha**2] * 1
        + [1 + 3 * alpha**2, 1 + alpha**2, 1 + 2 * alpha**2]
    )
    model = create_model("nf_resnet", depth=20, dims=1)
    betas = [b.preact.beta for _, b in model.blocks()]
    assert betas == pytest.approx([v**-0.5 for v in expected_variances(3, 3, alpha)])


def _block_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    out: list[float] = []
    for _, block in model.blocks():
        block.register_forward_hook(
            lambda m, i, o: out.append(o.var(dim=[0, *range(2, o.dim())], correction=0).mean().item())
        )
    with torch.no_grad():
        model(x)
    return out


def test_nf_resnet_signal_propagation_at_init() -> None:
    # Brock et al. 2021a Sec. 4: on unit Gaussian input the block outputs' average channel variance grows by
    # alpha^2 per block and resets to 1 + alpha^2 at each stage's first block (skip gain 1). Zero padding
    # lowers the variance at the image border, a few % more at each lower resolution, so the schedule is
    # checked in absolute terms loosely and as ratios (growth within a stage, drop at transitions) tightly.
    alpha = 0.5
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = [1 + k * alpha**2 for k in (1, 2, 3)] * 3
    torch.manual_seed(0)
    model = create_model(
        "nf_resnet", dims=2, in_channels=3, width=2, alpha=alpha, skip_gain_init=1.0, downsample="conv"
    )
    v = _block_variances(model, x)
    assert v == pytest.approx(expected, rel=0.2)
    for s in (0, 3, 6):  # within a stage: (1 + k alpha^2) / (1 + alpha^2)
        assert [v[s + 1] / v[s], v[s + 2] / v[s]] == pytest.approx([1.5 / 1.25, 1.75 / 1.25], rel=0.07)
    for s in (3, 6):  # transition: back from 1 + 3 alpha^2 to 1 + alpha^2
        assert v[s] / v[s - 1] == pytest.approx(1.25 / 1.75, rel=0.08)

    # skip gain 0 (the paper's init): blocks are identities within a stage; a transition's projection sees
    # act(x) * beta with beta^2 = 1 / (1 + 3 alpha^2), so nothing accumulates and the variance stays near 1.
    alpha = 0.2
    torch.manual_seed(0)
    model = create_model("nf_resnet", dims=2, in_channels=3, width=2, alpha=alpha, downsample="conv")
    v = _block_variances(model, x)
    assert v[0] == v[1] == v[2] and v[3] == v[4] == v[5] and v[6] == v[7] == v[8]
    assert [v[3] / v[2], v[6] / v[5]] == pytest.approx([1 / (1 + 3 * alpha**2)] * 2, rel=0.1)
    assert all(0.7 < u < 1.05 for u in v), v

    # timm's avg-pool shortcut: the first stage is identical, but at transitions the 2x2 average of nearly
    # uncorrelated white-noise activations cuts the shortcut's variance (to ~1/4)
    torch.manual_seed(0)
    model = create_model(
        "nf_resnet", dims=2, in_channels=3, width=2, alpha=0.5, skip_gain_init=1.0, downsample="avg"
    )
    avg = _block_variances(model, x)
    assert [avg[1] / avg[0], avg[2] / avg[0]] == pytest.approx([1.5 / 1.25, 1.75 / 1.25], rel=0.07)
    assert max(avg[3:]) < 0.5 * avg[2]


# --- options and bad input ----------------------------------------------------------------------------


def test_aliases_defaults_and_dln_regression_output() -> None:
    assert {
        "vgg",
        "mlp",
        "dln",
        "cnn",
        "resnet",
        "resnet20",
        "resnet56",
        "resnet110",
        "wide_resnet",
        "nf_resnet",
    } <= set(list_models())
    assert isinstance(create_model("resnet", norm="nf", depth=8, dims=1).stages[0][0].skip_scale, NFSkipGain)
    assert type(create_model("nf_resnet", depth=8)).__name__ == "NFResNet"  # its default norm is "nf"
    dln = create_model("dln", num_classes=0, norm="none", depth=3)
    layers = [m for m in dln.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in layers] == [(10, 10)] * 3 and all(m.bias is None for m in layers)
    x = torch.randn(5, 10)
    w = [m.weight for m in layers]
    torch.testing.assert_close(dln(x), x @ (w[2] @ w[1] @ w[0]).T)  # f(x) = W3 W2 W1 x, no nonlinearity
    bn = create_model("dln", num_classes=0, depth=4)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.modules()) == 3  # after every layer but the last


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="vgg16"), "unknown model 'vgg16'; valid models: cnn, dln, mlp"),
        (dict(name="vgg", norm="batchnorm"), "unknown norm 'batchnorm'; valid norms:"),
        (dict(name="vgg", foo=1), "unknown option(s) foo for model 'vgg'; valid options: activation"),
        (
            dict(name="resnet", depth=21),
            "resnet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got 21",
        ),
        (dict(name="wide_resnet", depth=28 + 1), "wide_resnet depth must be 6n+4"),
        (dict(name="resnet20", depth=56), "model 'resnet20' fixes depth=20, got depth=56"),
        (dict(name="vgg", dims=3), "dims must be 1 (N, C, L) or 2 (N, C, H, W), got 3"),
        (dict(name="vgg", width=0), "width must be a positive number, got 0"),
        (dict(name="vgg", depth=13), "depth must be 16, 11 or None, got 13"),
        (dict(name="cnn", num_classes=0), "cnn needs num_classes >= 1, got 0"),
        (dict(name="mlp", in_channels=0), "in_channels must be a positive int, got 0"),
        (dict(name="mlp", activation="swish"), "activation must be one of"),
        (dict(name="cnn", input_size=2), "input_size=2 is too small for cnn with depth=3"),
        (dict(name="nf_resnet", norm="bn"), "nf_resnet is normalizer-free: norm must be 'nf', got 'bn'"),
        (dict(name="nf_resnet", downsample="max"), "downsample must be one of 'avg', 'conv', got 'max'"),
        (dict(name="nf_resnet", fc_init_std=-0.1), "fc_init_std must be a number >= 0, got -0.1"),
        (dict(name="resnet", skip_gain_init=1.0), "skip_gain_init and downsample apply only to norm='nf'"),
        (dict(name="resnet", norm="nf", skipinit=True), "skipinit is for normalized nets"),
        (dict(name="resnet", dropout=1.5), "dropout must be in [0, 1), got 1.5"),
        (dict(name="wide_resnet", downsample="conv"), "downsample apply only to norm='nf', got norm='bn'"),
        (dict(name="vgg", norm="gn", norm_options={"dims": 2}), "norm_options may not set dims"),
        (dict(name="vgg", norm="nf", norm_options={"groups": 2}), "unknown option(s) groups for norm 'nf'"),
        (dict(name="vgg", norm="bn", norm_options={"groups": 2}), "unknown option(s) groups for norm 'bn'"),
        (dict(name="dln", depth=1), "dln needs depth >= 2"),
    ],
)
def test_bad_input_names_what_was_given_and_what_is_allowed(kwargs: dict, message: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(NormlabError) as info:
        create_model(name, **kwargs)
    assert message in str(info.value)


def test_wrong_input_size_is_reported() -> None:
    model = create_model("cnn")
    with pytest.raises(NormlabError, match="cnn was built for input_size=40; pass input_size="):
        model(torch.randn(2, 1, 64))


@pytest.mark.parametrize(
    "name, data",
    [
        ("mlp", dict(name="gaussian_linear")),
        ("dln", dict(name="gaussian_linear")),
        ("mlp", dict(name="synthetic", shape=(2, 40))),
        ("cnn", dict(name="synthetic", shape=(3, 12, 12))),
        ("vgg", dict(name="synthetic", shape=(3, 12, 12))),
    ],
)
def test_models_take_their_shape_from_dataset_fields(name: str, data: dict) -> None:
    # How normlab.train builds a model for a dataset: channels, dims, outputs and the input length.
    from normlab.data import load_dataset

    ds = load_dataset(data.pop("name"), **data)
    outputs = ds.num_classes or ds.y_train.shape[-1]
    extra = {"input_size": ds.input_shape[-1]} if name in ("mlp", "cnn") else {}
    width = {"vgg": 0.125}.get(name)
    model = create_model(
        name, num_classes=outputs, in_channels=ds.in_channels, dims=ds.dims, width=width, **extra
    )
    out = model(ds.x_train[:8])
    assert out.shape == (8, outputs)


@pytest.mark.parametrize("name", ["cnn", "vgg", "mlp"])
def test_fold_bn_folds_every_bn_of_the_plain_models(name: str) -> None:
    # These models put BN right after each conv/linear, so inference needs no BN at all; their input-size
    # check (FlattenTo) must not stop torch.fx from tracing them.
    from normlab.layers import fold_bn

    model = create_model(name, norm="bn", in_channels=1, dims=1, width=0.25 if name == "vgg" else None)
    x = torch.randn(16, 1, 40)
    for _ in range(3):
        model(x)  # move the running statistics away from (0, 1)
    model.eval()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
