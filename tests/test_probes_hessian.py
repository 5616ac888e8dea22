import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.probes import hessian


def _net(norm: str = "none") -> nn.Sequential:
    layer = {"none": nn.Identity(), "bn": nn.BatchNorm1d(4)}[norm]
    return nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 3)).double()


def _full_hessian(model, x, y):
    """The dense Hessian of the loss in the flat parameter vector, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return F.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_eigenvalues_and_exact_trace_match_dense_hessian(norm):
    model = _net(norm).train()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    H = _full_hessian(model, x, y)
    eig = torch.linalg.eigvalsh(H)
    result = hessian(model, (x, y), top_k=3, max_iter=H.shape[0], trace_method="exact")
    assert result.num_params == H.shape[0] and result.mode == "train"
    assert result.eigenvalues == pytest.approx(eig.flip(0)[:3].tolist(), rel=1e-8, abs=1e-10)
    assert result.trace == pytest.approx(torch.trace(H).item(), rel=1e-10)


def test_power_iteration_finds_largest_magnitude_eigenvalue():
    model = _net()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    eig = torch.linalg.eigvalsh(_full_hessian(model, x, y))
    by_magnitude = eig[eig.abs().argsort(descending=True)]
    result = hessian(model, (x, y), top_k=2, method="power", max_iter=2000, tol=1e-10, trace_samples=2)
    assert result.eigenvalues == pytest.approx(by_magnitude[:2].tolist(), rel=1e-4)


def test_hutchinson_trace_within_its_standard_error():
    model = _net("bn")
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    exact = torch.trace(_full_hessian(model, x, y)).item()
    result = hessian(model, (x, y), max_iter=5, trace_samples=2000)
    assert 0 < result.trace_std_error < 0.1 * abs(exact)
    assert abs(result.trace - exact) < 4 * result.trace_std_error


def test_per_layer_blocks_match_dense_diagonal_blocks():
    model = _net()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    H = _full_hessian(model, x, y)
    result = hessian(model, (x, y), max_iter=40, trace_method="exact", per_layer=True)
    blocks = {"0": slice(0, 16), "3": slice(16, 31)}
    for name, s in blocks.items():
        block = H[s, s]
        assert result.layer_trace[name] == pytest.approx(torch.trace(block).item(), rel=1e-10)
        top = torch.linalg.eigvalsh(block)[-1].item()
        assert result.layer_top_eigenvalue[name] == pytest.approx(top, rel=1e-8)


def test_eval_mode_and_state_untouched():
    model = _net("bn")
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    H = _full_hessian(model, x, y)  # eval: running statistics, a function of the parameters only
    result = hessian(model.train(), (x, y), mode="eval", max_iter=31, trace_method="exact")
    assert result.mode == "eval"
    assert result.eigenvalues[0] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-8)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_hessian_bad_input():
    model = _net("bn")
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    with pytest.raises(NormlabError, match="method must be 'lanczos' or 'power', got 'qr'"):
        hessian(model, (x, y), method="qr")
    with pytest.raises(NormlabError, match="trace_method must be 'hutchinson' or 'exact', got 'x'"):
        hessian(model, (x, y), trace_method="x")
    with pytest.raises(NormlabError, match="top_k must be a positive int, got 0"):
        hessian(model, (x, y), top_k=0)
    with pytest.raises(NormlabError, match="too small for mode='train'"):
        hessian(model, (x[:1], y[:1]))
    with pytest.raises(NormlabError, match="Tanh has no trainable parameters"):
        hessian(nn.Tanh(), (x, y))
