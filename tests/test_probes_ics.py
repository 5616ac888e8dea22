import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.probes import ics


def _mlp(bn: bool) -> nn.Sequential:
    def norm():
        return [nn.BatchNorm1d(6)] if bn else []

    return nn.Sequential(
        nn.Linear(4, 6), *norm(), nn.ReLU(), nn.Linear(6, 6), *norm(), nn.ReLU(), nn.Linear(6, 3)
    ).double()


def _hand_forward(params, x, bn):
    """The MLP written out; params = [W1, b1, (g1, be1), W2, b2, (g2, be2), W3, b3]."""
    it = iter(params)
    h = x
    for layer in range(3):
        W, b = next(it), next(it)
        h = h @ W.T + b
        if layer < 2:
            if bn:
                g, be = next(it), next(it)
                h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * g + be
            h = torch.relu(h)
    return h


def _sgd_update(w, g, state, lr, momentum, wd):
    d = g + wd * w
    buf = momentum * state["momentum_buffer"] + d
    return w - lr * buf


def _adam_update(w, g, state, lr, betas=(0.9, 0.999), eps=1e-8):
    b1, b2 = betas
    t = int(state["step"]) + 1
    m = b1 * state["exp_avg"] + (1 - b1) * g
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return w - lr * m_hat / (v_hat.sqrt() + eps)


@pytest.mark.parametrize(
    "opt_name,bn", [("sgd", False), ("adam", False), ("sgd", True)], ids=["sgd-momentum", "adam", "sgd-bn"]
)
def test_ics_equals_hand_unrolled_two_step_computation(opt_name, bn):
    torch.manual_seed(0)
    model = _mlp(bn)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    # One real step first, so momentum / Adam moments are non-trivial.
    x0, y0 = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x0), y0).backward()
    opt.step()
    opt.zero_grad()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                  for i, s in opt.state_dict()["state"].items()}

    result = ics(model, opt, (x, y))

    # By hand: G at W^t, W^{t+1} by the optimizer's formula, then G' for each linear layer.
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(_hand_forward(params, x, bn), y), params)
    states = [opt.state[p] for p in model.parameters()]
    if opt_name == "sgd":
        new = [_sgd_update(w, g, s, 0.3, 0.9, 1e-3) for w, g, s in zip(params, grads, states, strict=True)]
    else:
        new = [_adam_update(w, g, s, 0.05) for w, g, s in zip(params, grads, states, strict=True)]
    per_layer = 4 if bn else 2  # tensors per (linear [+ norm]) group
    linear_names = ["0", "3", "6"] if bn else ["0", "2", "4"]
    for i, name in enumerate(linear_names):
        start = i * per_layer
        mixed = [(n.detach() if j < start else w.detach()).requires_grad_(True)
                 for j, (w, n) in enumerate(zip(params, new, strict=True))]
        loss = F.cross_entropy(_hand_forward(mixed, x, bn), y)
        g_shift = torch.autograd.grad(loss, mixed[start : start + 2])
        G = torch.cat([g.reshape(-1) for g in grads[start : start + 2]])
        Gs = torch.cat([g.reshape(-1) for g in g_shift])
        assert result.l2[name] == pytest.approx((G - Gs).norm().item(), rel=1e-9, abs=1e-12)
        assert result.cos[name] == pytest.approx((G @ Gs / G.norm() / Gs.norm()).item(), rel=1e-9)
        assert result.grad_norm[name] == pytest.approx(G.norm().item(), rel=1e-12)
    assert list(result.l2) == linear_names and result.mode == "train"
    assert result.l2[linear_names[0]] == 0.0  # nothing comes before the first layer
    assert result.l2[linear_names[2]] > 0.0

    # Nothing moved: parameters, buffers, optimizer state.
    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_before[i][k]))


def test_ics_includes_norm_layers_on_request():
    model = _mlp(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    result = ics(model, opt, (x, y), include_norm=True)
    assert list(result.l2) == ["0", "1", "3", "4", "6"]
    assert set(result.to_dict()) == {"mode", "l2", "cos", "grad_norm", "lr"} and result.lr == 0.1


def test_ics_bad_input():
    model = _mlp(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(NormlabError, match="1 example\\(s\\) is too small for mode='train'"):
        ics(model, opt, (x[:1], y[:1]))
    with pytest.raises(NormlabError, match="needs a batch \\(x, y\\) with targets"):
        ics(model, opt, x)
    with pytest.raises(NormlabError, match="mode must be 'train' or 'eval', got 'test'"):
        ics(model, opt, (x, y), mode="test")
    with pytest.raises(NormlabError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        ics(model, {}, (x, y))
    with pytest.raises(NormlabError, match="ReLU has no layer with its own weight"):
        ics(nn.ReLU(), opt, (x, y))


def test_ics_on_the_deep_linear_network_matches_matrix_products():
    """Santurkar et al.'s DLN: f(x) = W3 W2 W1 x, loss ||f(x) - A x||^2 (mean), plain SGD."""
    from normlab.models import create_model

    torch.manual_seed(0)
    model = create_model("dln", norm="none", width=4, depth=3, num_classes=4).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 4, dtype=torch.float64)
    target = x @ torch.randn(4, 4, dtype=torch.float64).T
    result = ics(model, opt, (x, target), F.mse_loss)
    Ws = [p.detach().clone() for p in model.parameters()]  # W1, W2, W3 in forward order

    def loss(mats):
        return F.mse_loss(x @ mats[0].T @ mats[1].T @ mats[2].T, target)

    leaves = [w.clone().requires_grad_(True) for w in Ws]
    G = torch.autograd.grad(loss(leaves), leaves)
    W_next = [w - 0.05 * g for w, g in zip(Ws, G, strict=True)]
    for i, name in enumerate(result.l2):
        mixed = [(W_next[j] if j < i else Ws[j]).clone().requires_grad_(True) for j in range(3)]
        G_shift = torch.autograd.grad(loss(mixed), mixed[i])[0]
        assert result.l2[name] == pytest.approx((G[i] - G_shift).norm().item(), rel=1e-9, abs=1e-15)
    assert len(result.l2) == 3 and list(result.l2)[-1] == "classifier"
