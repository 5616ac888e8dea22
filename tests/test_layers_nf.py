"""Normalizer-free parts: Scaled WS layers, activation gains, SkipInit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from normlab.errors import NormlabError
from normlab.layers import ScaledStdConv1d, ScaledStdConv2d, ScaledStdLinear, SkipInit, activation_gamma


def _by_hand_ws(weight, gain, gamma, eps):
    w = weight.double().reshape(weight.shape[0], -1)
    n = w.shape[1]
    mean = w.mean(dim=1, keepdim=True)
    var = ((w - mean) ** 2).mean(dim=1, keepdim=True)  # biased
    w_hat = gain.double().reshape(-1, 1) * gamma * (w - mean) / (torch.sqrt(var + eps) * math.sqrt(n))
    return w_hat.reshape(weight.shape)


@pytest.mark.parametrize("make,x_shape,fn", [
    (lambda: ScaledStdConv2d(6, 5, 3, padding=1, gamma=1.7, eps=1e-5, gain_init=0.7), (2, 6, 7, 7), F.conv2d),
    (lambda: ScaledStdConv1d(6, 5, 3, stride=2, gamma=1.2), (2, 6, 9), F.conv1d),
    (lambda: ScaledStdLinear(6, 5, gamma=1.5, gain_init=2.0), (4, 6), None),
])
def test_scaled_ws_matches_formula(make, x_shape, fn):
    layer = make()
    with torch.no_grad():
        layer.gain.mul_(torch.rand_like(layer.gain) + 0.5)
    expected_w = _by_hand_ws(layer.weight, layer.gain, layer.gamma, layer.eps).float()
    torch.testing.assert_close(layer.standardized_weight(), expected_w, atol=1e-6, rtol=1e-5)
    x = torch.randn(x_shape)
    if fn is None:
        expected = F.linear(x, expected_w, layer.bias)
    else:
        expected = fn(x, expected_w, layer.bias, layer.stride, layer.padding)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_relu_then_ws_conv_keeps_unit_variance():
    # z ~ N(0, 1); relu(z) has variance 1/2 - 1/(2 pi); a zero-mean unit-norm filter times gamma_relu gives
    # gamma^2 (1/2 - 1/(2 pi)) = 1.0013 whatever the raw weight scale.
    torch.manual_seed(0)
    conv = ScaledStdConv2d(64, 64, 3, bias=False, gamma=activation_gamma("relu"))
    with torch.no_grad():
        conv.weight.mul_(37.0)
        y = conv(F.relu(torch.randn(32, 64, 16, 16)))
    assert y.var().item() == pytest.approx(1.0, abs=0.05)
    lin = ScaledStdLinear(256, 128, bias=False, gamma=activation_gamma("relu"))
    with torch.no_grad():
        y = lin(F.relu(torch.randn(4096, 256)))
    assert y.var().item() == pytest.approx(1.0, abs=0.05)


def test_scaled_ws_gradcheck():
    layer = ScaledStdConv2d(3, 4, 3, gamma=1.7).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, w, g):
        from normlab.layers import scaled_std_weight

        return F.conv2d(x, scaled_std_weight(w, g, 1.7, 1e-5), None)

    w = layer.weight.detach().clone().requires_grad_()
    g = (torch.rand(4, 1, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    assert gradcheck(fn, (x, w, g))


@pytest.mark.parametrize("kw,text", [
    ({"gamma": 0.0}, "gamma must be a finite number > 0, got 0.0"),
    ({"eps": -1e-5}, "eps must be a finite number > 0, got -1e-05"),
    ({"gain_init": math.nan}, "gain_init must be a finite number, got nan"),
])
def test_scaled_ws_bad_options(kw, text):
    with pytest.raises(NormlabError) as err:
        ScaledStdConv2d(3, 4, 3, **kw)
    assert text in str(err.value)


def test_activation_gamma_table_and_relu_analytic():
    assert activation_gamma("relu") == 1.7139588594436646
    assert activation_gamma("identity") == 1.0
    assert activation_gamma("relu") == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), abs=2e-3)
    # Empirical check of the definition gamma = 1/std(g(z)), z ~ N(0, 1).
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, fn in (("tanh", torch.tanh), ("silu", F.silu), ("gelu", F.gelu)):
        assert activation_gamma(name) == pytest.approx(1 / fn(z).std().item(), rel=2e-3)
    with pytest.raises(NormlabError, match=r"unknown activation 'swish'.*valid: elu, gelu, identity"):
        activation_gamma("swish")


def test_skipinit():
    layer = SkipInit()
    x = torch.randn(3, 4)
    assert torch.equal(layer(x), torch.zeros(3, 4))
    layer = SkipInit(0.25)
    y = layer(x)
    torch.testing.assert_close(y, 0.25 * x)
    g = torch.randn(3, 4)
    y.backward(g)
    torch.testing.assert_close(layer.alpha.grad, (x * g).sum())
    assert [n for n, _ in layer.named_parameters()] == ["alpha"]
    with pytest.raises(NormlabError, match="SkipInit init must be a finite number, got inf"):
        SkipInit(math.inf)
