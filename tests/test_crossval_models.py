"""Model cross-checks: every real backend agrees on normlab models in eval mode; graph translation limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normlab.crossval import crossval_model, trace_model
from normlab.crossval.state import randomize_norm_state
from normlab.errors import NormlabError
from normlab.models import create_model

REAL = "numpy,torch,onnxruntime,jax"


def _inputs(shape, n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _check_agreement(model, x, backends=REAL):
    report = crossval_model(model, x, backends)
    assert [s.status for s in report.backends] == ["ok"] * len(backends.split(","))
    assert not report.inconsistent, [(p.backends, p.reasons) for p in report.pairs]
    for pair in report.pairs:
        assert pair.first_inconsistent is None
        assert pair.max_abs < 1e-5, (pair.backends, pair.max_abs)
        assert max(pair.d_class) == 0.0  # same top-5 ranking of the oracle's class everywhere
    print({"|".join(p.backends): f"{p.delta:.2e}/{p.max_abs:.2e}" for p in report.pairs})
    return report


def test_resnet20_bn_agrees_on_all_real_backends_in_eval_mode():
    torch.manual_seed(0)
    model = randomize_norm_state(create_model("resnet20", norm="bn", num_classes=10, in_channels=3, dims=2))
    report = _check_agreement(model, _inputs((3, 16, 16)))
    pair = report.pair("torch", "onnxruntime")
    assert len(pair.layers) == report.config["layers"] == 87  # every conv, norm, relu, add, pool, linear
    assert {layer.op for layer in pair.layers} >= {"conv", "bn", "relu", "add", "gap", "linear"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "norm", "shape", "dims"),
    [
        ("resnet20", "gn", (3, 16, 16), 2),
        ("resnet20", "ln", (3, 16, 16), 2),
        ("vgg", "bn", (3, 32, 32), 2),
        ("cnn", "bn", (3, 32, 32), 2),
        ("mlp", "bn", (1, 40), 1),
        ("dln", "bn", (10,), 1),
    ],
)
def test_other_models_agree_on_all_real_backends(name, norm, shape, dims):
    torch.manual_seed(0)
    kw = {} if name == "dln" else {"in_channels": shape[0], "dims": dims}
    model = randomize_norm_state(create_model(name, norm=norm, **kw))
    _check_agreement(model, _inputs(shape))


def test_train_mode_flax_running_var_convention_is_reported_not_flagged():
    torch.manual_seed(0)
    model = create_model("resnet20", norm="bn", num_classes=10, in_channels=3, dims=2)
    x = _inputs((3, 8, 8), n=4)
    train = [_inputs((3, 8, 8), n=4, seed=s) for s in (1, 2)]
    report = crossval_model(model, x, "numpy,torch,jax", mode="eval", train_batches=train)
    assert not report.inconsistent, [(p.backends, p.reasons) for p in report.pairs]
    diffs = {c.backends: c for c in report.conventions}
    torch_flax = diffs[("torch", "jax")]
    assert torch_flax.values == ("unbiased", "biased")
    # the two backends differ by about what the oracle predicts under the two conventions
    assert torch_flax.expected > 1e-4
    assert torch_flax.measured == pytest.approx(torch_flax.expected, rel=0.05)


def test_labels_as_ground_truth_uses_softmax_against_one_hot():
    torch.manual_seed(0)
    model = create_model("cnn", norm="bn", in_channels=1, dims=1)
    x = _inputs((1, 40), n=6)
    labels = np.array([0, 1, 2, 3, 4, 5])
    report = crossval_model(model, x, "numpy,torch", labels=labels, truth="labels")
    pair = report.pair("numpy", "torch")
    assert len(pair.d_mad) == 6 and max(pair.d_mad) < 1e-4  # float32 vs float64 only
    assert not pair.inconsistent


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _CustomAct(nn.Module):
    def forward(self, x):
        return _Double.apply(x)


def test_custom_autograd_layer_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _CustomAct())
    with pytest.raises(
        NormlabError, match="cannot translate layer '2': it calls the custom autograd function _Double"
    ):
        trace_model(model, _inputs((3, 6, 6)))
    assert torch.autograd.Function.apply.__func__ is not None  # the patch is undone
    y = _Double.apply(torch.ones(2))
    assert y.tolist() == [2.0, 2.0]


def test_unknown_layer_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    with pytest.raises(NormlabError, match=r"cannot translate layer '1' \(function gelu\)"):
        crossval_model(model, _inputs((4,)), "numpy,torch")


def test_normalizer_free_resnet_is_refused_naming_its_weight_standardized_stem():
    model = create_model("nf_resnet", norm="nf", in_channels=3, dims=2)
    with pytest.raises(NormlabError, match="cannot translate layer 'stem'"):
        trace_model(model, _inputs((3, 8, 8)))


def test_mismatched_shapes_are_reported():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(NormlabError, match=r"cannot run model Sequential on an input of shape \[4, 5\]"):
        crossval_model(model, _inputs((5,)), "numpy")
    with pytest.raises(NormlabError, match=r"mismatched shapes: train batch 0 has shape \[4, 3, 5\]"):
        crossval_model(model, _inputs((3, 4)), "numpy", train_batches=[_inputs((3, 5))])
    with pytest.raises(NormlabError, match=r"mismatched shapes: labels \[3\] for 4 inputs"):
        crossval_model(model, _inputs((3, 4)), "numpy", labels=np.zeros(3, int))
    with pytest.raises(NormlabError, match="unknown backend 'tf'; valid backends: numpy, torch"):
        crossval_model(model, _inputs((3, 4)), "numpy,tf")


@pytest.mark.slow
def test_torch_compile_agrees_on_a_layer_and_on_resnet20():
    from normlab.crossval import LayerSpec, crossval_layer

    layer = crossval_layer(LayerSpec(kind="bn", mode="train", steps=2), "numpy,torch,torch-compile")
    assert not layer.inconsistent and layer.pair("torch", "torch-compile").max_abs < 1e-5
    torch.manual_seed(0)
    model = randomize_norm_state(create_model("resnet20", norm="bn", num_classes=10, in_channels=3, dims=2))
    report = _check_agreement(model, _inputs((3, 16, 16)), "numpy,torch,torch-compile")
    compile_status = report.backends[2]
    print("torch-compile seconds (incl. compile):", compile_status.seconds)


def test_model_mode_and_truth_bad_input_messages():
    model = nn.Sequential(nn.Linear(4, 3))
    x = _inputs((4,))
    with pytest.raises(NormlabError, match="unknown mode 'test'; valid: train, eval"):
        crossval_model(model, x, "numpy", mode="test")
    with pytest.raises(NormlabError, match="unknown truth 'gold'; valid: oracle, labels"):
        crossval_model(model, x, "numpy", truth="gold")
    with pytest.raises(NormlabError, match=r"truth='labels' needs labels \(N,\) for the inputs"):
        crossval_model(model, x, "numpy", truth="labels")
    with pytest.raises(
        NormlabError, match=r"truth='labels' needs a classifier output \(N, classes\), got \[4, 1\]"
    ):
        crossval_model(nn.Linear(4, 1), x, "numpy", truth="labels", labels=np.zeros(4, int))
    with pytest.raises(NormlabError, match="compare in eval mode"):
        crossval_model(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), x, "numpy", mode="train")
