"""Adaptive Gradient Clipping against a straightforward per-parameter reference (Brock et al. 2021b, Eq 3)."""

import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.optim import adaptive_clip_grad_, agc_parameters, unitwise_norms


def reference_agc(params, clip=0.01, eps=1e-3):
    """Eq. 3 unit by unit in float64 with Python loops: the independent computation the tests trust."""
    out = []
    for p in params:
        w, g = p.detach().double(), p.grad.detach().double().clone()
        units = [(...,)] if w.dim() <= 1 else [(i,) for i in range(w.shape[0])]
        for u in units:
            w_norm = max(w[u].norm().item(), eps)
            g_norm = g[u].norm().item()
            if g_norm / w_norm > clip:
                g[u] = g[u] * (clip * w_norm / g_norm)
        out.append(g)
    return out


SHAPES = [(8, 3, 3, 3), (8, 3, 3, 3), (16, 8), (8,), (), (5, 4, 2), (8, 3, 3, 3)]


def _params(grad_scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = []
    for i, shape in enumerate(SHAPES):
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype) * (0.1 if i != 2 else 1e-5))
        # Gradients of mixed size so that some units are clipped and others are not.
        exponent = torch.rand(shape[:1] if shape else (), generator=gen, dtype=dtype) * 4 - 5
        scale = grad_scale * 10**exponent  # log-uniform in [1e-5, 1e-1]
        p.grad = torch.randn(shape, generator=gen, dtype=dtype) * (scale.view(-1, *[1] * (len(shape) - 1))
                                                                   if shape else scale)
        params.append(p)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip,eps", [(0.01, 1e-3), (0.16, 1e-2)])
def test_agc_equals_per_parameter_reference(dtype, clip, eps):
    params = _params(dtype=dtype)
    expected = reference_agc(params, clip, eps)
    changed = torch.cat([(e != p.grad.double()).flatten() for e, p in zip(expected, params, strict=True)])
    assert 0.05 < changed.double().mean().item() < 0.95  # some units clipped, others not
    adaptive_clip_grad_(params, clip=clip, eps=eps)
    for e, p in zip(expected, params, strict=True):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-9)


def test_agc_leaves_small_gradients_untouched():
    params = _params(grad_scale=1e-6)
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad_(params)
    for b, p in zip(before, params, strict=True):
        assert torch.equal(b, p.grad)


def test_agc_clipped_unit_has_exactly_the_limit_norm():
    w = nn.Parameter(torch.full((2, 3), 1.0))
    w.grad = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.001, 0.0]])
    adaptive_clip_grad_([w], clip=0.01)
    assert w.grad[0].norm().item() == pytest.approx(0.01 * 3**0.5)
    assert w.grad[1, 1].item() == torch.tensor(0.001).item()  # unclipped: bitwise unchanged
    zero = nn.Parameter(torch.zeros(4))
    zero.grad = torch.ones(4)
    adaptive_clip_grad_(zero, clip=0.5, eps=1e-3)  # ||W||* = eps
    assert zero.grad.norm().item() == pytest.approx(0.5e-3)


def test_unitwise_norms():
    tensors = [torch.randn(4, 3, 2), torch.randn(4, 3, 2), torch.randn(5), torch.tensor(-3.0)]
    norms = unitwise_norms(tensors)
    torch.testing.assert_close(norms[0], torch.stack([t.norm() for t in tensors[0]]))
    torch.testing.assert_close(norms[1], torch.stack([t.norm() for t in tensors[1]]))
    torch.testing.assert_close(norms[2], tensors[2].norm().reshape(1))
    assert norms[3].tolist() == [3.0]


class WithClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_agc_parameters_skip_the_classifier():
    model = WithClassifier()
    model.body[0].bias.requires_grad_(False)
    chosen = {id(p) for p in agc_parameters(model)}
    assert chosen == {id(model.body[0].weight), id(model.body[2].weight), id(model.body[2].bias)}
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 6), nn.Linear(6, 2))
    chosen = {id(p) for p in agc_parameters(plain)}
    assert id(plain[3].weight) not in chosen and id(plain[2].weight) in chosen and len(chosen) == 4


def test_agc_through_agc_parameters_never_touches_the_classifier():
    model = WithClassifier()
    model(torch.randn(16, 4)).square().sum().mul(1e4).backward()
    head = [p.grad.clone() for p in model.classifier.parameters()]
    body = model.body[2].weight.grad.clone()
    adaptive_clip_grad_(agc_parameters(model), clip=0.01)
    for h, p in zip(head, model.classifier.parameters(), strict=True):
        assert torch.equal(h, p.grad)
    assert not torch.equal(body, model.body[2].weight.grad)


@pytest.mark.parametrize("kw,text", [
    ({"clip": 0.0}, "AGC clip must be a finite number > 0, got 0.0"),
    ({"clip": -1}, "AGC clip must be a finite number > 0, got -1"),
    ({"eps": 0.0}, "AGC eps must be a finite number > 0, got 0.0"),
])
def test_agc_bad_options(kw, text):
    with pytest.raises(NormlabError) as err:
        adaptive_clip_grad_(_params(), **kw)
    assert text in str(err.value)
