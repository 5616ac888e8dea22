import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.probes import landscape
from normlab.probes.loss_landscape import eta_grid, filter_normalized_direction


def _net(dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(dropout), nn.Flatten(),
        nn.Linear(4 * 6, 3),
    )


def _batch():
    return torch.randn(10, 2, 6), torch.randint(0, 3, (10,))


def test_landscape_matches_direct_evaluation_along_the_gradient():
    model, (x, y) = _net(), _batch()
    etas = [0.05, 0.2, 0.4]
    result = landscape(model, (x, y), etas=etas)
    # Independent computation on a copy: step the weights by hand and take the gradient there.
    ref = copy.deepcopy(model).train()
    params = list(ref.parameters())
    g = [t.clone() for t in torch.autograd.grad(F.cross_entropy(ref(x), y), params)]
    g_norm = torch.sqrt(sum((t**2).sum() for t in g)).item()
    start = [p.detach().clone() for p in params]
    for j, eta in enumerate(etas):
        with torch.no_grad():
            for p, w, d in zip(params, start, g, strict=True):
                p.copy_(w - eta * d)
        loss = F.cross_entropy(ref(x), y)
        g_eta = torch.autograd.grad(loss, params)
        change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g, g_eta, strict=True))).item()
        assert result.losses[j] == pytest.approx(loss.item(), rel=1e-5)
        assert result.grad_change[j] == pytest.approx(change, rel=1e-4)
    assert result.grad_norm == pytest.approx(g_norm, rel=1e-5)
    beta = max(c / (e * g_norm) for c, e in zip(result.grad_change, etas, strict=True))
    assert result.beta_smoothness == pytest.approx(beta, rel=1e-6)
    assert result.loss_min == min(result.losses) and result.loss_max == max(result.losses)
    assert result.mode == "train" and result.direction == "gradient"


@pytest.mark.parametrize("direction", ["gradient", "random"])
def test_landscape_leaves_everything_bit_identical(direction):
    model, (x, y) = _net(dropout=0.3), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # momentum buffers and .grad now exist
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()

    result = landscape(model, (x, y), optimizer=opt, num_points=3, direction=direction)

    assert result.etas == pytest.approx([0.05, 0.225, 0.4])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is g and torch.equal(g, saved) for p, (g, saved) in zip(model.parameters(), grads,
                                                                                 strict=True))
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    assert all(torch.equal(after["state"][i]["momentum_buffer"], s["momentum_buffer"])
               for i, s in opt_state["state"].items())
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert np.array_equal(np.random.get_state()[1], np_rng[1])
    assert not model.training and not any(m.training for m in model.modules())


def test_filter_normalized_direction_matches_filter_norms():
    model = _net()
    params = list(model.parameters())
    d = filter_normalized_direction(params, torch.Generator().manual_seed(3))
    for p, v in zip(params, d, strict=True):
        if p.dim() <= 1:
            assert torch.count_nonzero(v) == 0  # biases and BN affines ignored (Li et al. 'biasbn')
        else:
            torch.testing.assert_close(v.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))


def test_eta_grid_and_bad_input():
    assert eta_grid(0.1, 8) == pytest.approx([0.1 * (0.5 + 0.5 * j) for j in range(8)])
    model, batch = _net(), _batch()
    with pytest.raises(NormlabError, match="etas must be a non-empty list of positive finite .*, got \\[\\]"):
        landscape(model, batch, etas=[])
    with pytest.raises(NormlabError, match="positive finite step lengths, got \\[0.1, -0.2\\]"):
        landscape(model, batch, etas=[0.1, -0.2])
    with pytest.raises(NormlabError, match="0 < low <= high, got lr=0.1, eta_range=\\(-1.0, 4.0\\)"):
        landscape(model, batch, lr=0.1, eta_range=(-1.0, 4.0))
    with pytest.raises(NormlabError, match="needs lr=, optimizer= or an explicit etas="):
        landscape(model, batch)
    with pytest.raises(NormlabError, match="direction must be 'gradient' or 'random', got 'hessian'"):
        landscape(model, batch, lr=0.1, direction="hessian")
    with pytest.raises(NormlabError, match="batch of 1 example\\(s\\) is too small for mode='train'"):
        landscape(model, (batch[0][:1], batch[1][:1]), lr=0.1)
    # eval mode with one example is fine: running statistics do not depend on the batch
    assert landscape(model, (batch[0][:1], batch[1][:1]), lr=0.1, mode="eval", num_points=2).mode == "eval"
