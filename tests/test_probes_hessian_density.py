"""Hessian eigenvalue density (SLQ) against PyHessian's ``density`` and the dense Hessian."""

from __future__ import annotations

import copy

import pytest
import torch
from test_probes_hessian import _full_hessian
from torch import nn

from normlab.errors import NormlabError
from normlab.probes import hessian_density
from normlab.probes.hessian_density import density_on_grid, rademacher


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)


def _eig(T, eigenvectors=False):
    # pyhessian 0.1 calls torch.eig (removed in torch 2.0; T is symmetric, so eigh is what it computed).
    values, vectors = torch.linalg.eigh(T)
    return torch.stack([values, torch.zeros_like(values)], 1), vectors


def test_nodes_and_weights_match_pyhessian_density(monkeypatch):
    pyhessian = pytest.importorskip("pyhessian")
    monkeypatch.setattr(torch, "eig", _eig, raising=False)
    model, (x, y) = _net(), _batch()
    comp = pyhessian.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    torch.manual_seed(7)  # PyHessian draws its Rademacher vectors from the global RNG
    nodes, weights = comp.density(iter=20, n_v=2)
    ours = hessian_density(model, (x, y), iterations=20, runs=2, mode="eval", seed=7)
    assert ours.runs == 2 and ours.iterations == 20 and ours.num_params == 91
    for run in range(2):
        order = sorted(range(20), key=lambda i: nodes[run][i])
        # PyHessian keeps T in float32 and normalizes by (norm + 1e-6): agreement to ~1e-5.
        assert ours.nodes[run] == pytest.approx([nodes[run][i] for i in order], abs=2e-5)
        assert ours.weights[run] == pytest.approx([weights[run][i] for i in order], abs=2e-5)
        first = sum(w * t for t, w in zip(nodes[run], weights[run], strict=True))
        second = sum(w * t**2 for t, w in zip(nodes[run], weights[run], strict=True))
        pairs = list(zip(ours.nodes[run], ours.weights[run], strict=True))
        mine = [sum(w * t**k for t, w in pairs) for k in (1, 2)]
        assert mine == pytest.approx([first, second], rel=1e-4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_full_lanczos_moments_and_support_are_exact(mode):
    model, (x, y) = _net(), _batch()
    model.train(mode == "train")
    H = _full_hessian(model, x, y)
    n = H.shape[0]
    result = hessian_density(model.train(), (x, y), iterations=n, runs=3, mode=mode, seed=2)
    eig = torch.linalg.eigvalsh(H)
    # Full Lanczos: the extreme nodes are H's extreme eigenvalues, and each run's quadrature reproduces
    # v^T H^k v for its own start vector exactly.
    assert result.lambda_max == pytest.approx(eig[-1].item(), rel=1e-7)
    assert result.lambda_min == pytest.approx(eig[0].item(), rel=1e-6, abs=1e-9)
    gen = torch.Generator().manual_seed(2)
    params = list(model.parameters())
    expected = torch.zeros(4, dtype=torch.float64)
    for _ in range(3):
        v = rademacher(params, gen)
        expected += torch.stack([v @ torch.linalg.matrix_power(H, k) @ v for k in range(1, 5)]) / 3
    assert result.moments == pytest.approx(expected.tolist(), rel=1e-7)
    assert result.trace == pytest.approx(n * expected[0].item(), rel=1e-7)
    assert 0 < result.trace_std_error < float("inf")


def test_trace_estimate_is_unbiased_within_its_error():
    model, (x, y) = _net(), _batch()
    exact = torch.trace(_full_hessian(model.train(), x, y)).item()
    result = hessian_density(model, (x, y), iterations=10, runs=60, seed=0)
    assert abs(result.trace - exact) < 4 * result.trace_std_error


def test_density_integrates_to_one_and_matches_the_pyhessian_formula():
    grid, density = density_on_grid([[0.0, 1.0]], [[0.25, 0.75]], num_bins=201, sigma_squared=1e-3)
    step = grid[1] - grid[0]
    assert sum(density) * step == pytest.approx(1.0, rel=1e-12)
    assert grid[0] == pytest.approx(-0.01) and grid[-1] == pytest.approx(1.01)
    # Mass of each Gaussian is its weight: the density near 1 carries 3x the one near 0.
    left = sum(d for g, d in zip(grid, density, strict=True) if g < 0.5)
    assert left * step == pytest.approx(0.25, rel=1e-6)


def test_model_and_rng_untouched():
    model, batch = _net(), _batch()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    hessian_density(model, batch, iterations=5)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs():
    model, batch = _net(), _batch()
    with pytest.raises(NormlabError, match="iterations must be a positive int, got 0"):
        hessian_density(model, batch, iterations=0)
    with pytest.raises(NormlabError, match="mode must be 'train' or 'eval', got 'x'"):
        hessian_density(model, batch, mode="x")
    with pytest.raises(NormlabError, match="hessian_density needs a batch \\(x, y\\) with targets"):
        hessian_density(model, batch[0])
    with pytest.raises(NormlabError, match="num_bins must be at least 2 to span a grid, got 1"):
        hessian_density(model, batch, iterations=3, num_bins=1)
