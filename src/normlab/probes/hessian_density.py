"""Eigenvalue density of the loss Hessian by stochastic Lanczos quadrature (SLQ), as PyHessian.

Ghorbani, Krishnan & Xiao (2019, arXiv 1901.10159, Sec. 2) and PyHessian (Yao et al. 2020, arXiv
1912.07145, Sec. 3.3, ``hessian.density``): for a unit Rademacher vector v, ``m`` Lanczos steps of H from v
give a tridiagonal T_m = U diag(theta) U^T; the spectral measure of H seen from v is approximated by the
quadrature nodes ``theta_i`` (Ritz values) with weights ``tau_i = U[0, i]^2`` (they sum to 1), exact for
every polynomial of degree < 2m::

    v^T f(H) v  ~=  sum_i tau_i f(theta_i),     E_v[v^T f(H) v] = tr(f(H)) / n

So over ``runs`` vectors, ``mean sum_i tau_i theta_i^k`` estimates the k-th moment of the eigenvalue
density, ``tr(H^k) / n``: ``trace = n * first moment`` is Hutchinson's estimate with the same vectors, and
the extreme nodes bound the support (they converge to the extreme eigenvalues first). The density on a grid
is PyHessian's ``density_generate``: a Gaussian of variance ``sigma_squared * max(1, range)`` at each node,
weighted, averaged over runs and normalized to integrate to 1 on ``[min - 0.01, max + 0.01]``.

As PyHessian, each run draws its vector as ``randint(0, 2)`` per parameter tensor (0 -> -1) and
normalizes it; here from a private generator seeded by ``seed`` (PyHessian uses the global RNG, so
``torch.manual_seed(seed)`` before its ``density`` draws the same vectors). PyHessian re-orthogonalizes
once (Gram-Schmidt) and keeps going when the Krylov space closes; this probe re-orthogonalizes twice and
stops there (the nodes are then exact eigenvalues). One forward pass is shared by every product (mode
"train": BN batch statistics, the default; PyHessian always switches the model to eval, i.e. mode "eval").
Cost: ``runs * iterations`` Hessian-vector products; memory: ``iterations`` vectors of #params.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import LossFn, check_positive_int, loss_inputs, model_device
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_mode, preserved, set_mode
from normlab.probes.hessian_spectrum import hvp_operator, lanczos_tridiagonal, tridiagonal


@dataclasses.dataclass
class HessianDensity(ProbeResult):
    """``nodes[r]`` / ``weights[r]``: run r's quadrature (ascending nodes; weights sum to 1).
    ``density`` on ``grid`` integrates to 1; ``moments[k-1]`` estimates ``tr(H^k) / n``."""

    mode: str
    num_params: int
    iterations: int
    runs: int
    trace: float
    trace_std_error: float
    moments: list[float]
    lambda_min: float
    lambda_max: float
    nodes: list[list[float]]
    weights: list[list[float]]
    grid: list[float]
    density: list[float]


def rademacher(params: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """A flat unit vector of +-1/sqrt(n), drawn per tensor as PyHessian's ``randint_like(p, high=2)``."""
    draws = [torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float64) for p in params]
    v = torch.cat([d.reshape(-1) for d in draws]) * 2 - 1
    return v / v.norm()


def quadrature(alphas: list[float], betas: list[float]) -> tuple[list[float], list[float]]:
    """Gauss quadrature of a Lanczos T: its eigenvalues (ascending) and squared first eigenvector rows."""
    theta, U = torch.linalg.eigh(tridiagonal(alphas, betas))
    return theta.tolist(), (U[0] ** 2).tolist()


def density_on_grid(nodes: list[list[float]], weights: list[list[float]], num_bins: int = 1000,
                    sigma_squared: float = 1e-5, overhead: float = 0.01) -> tuple[list[float], list[float]]:
    """PyHessian's ``density_generate``: Gaussian-broadened quadratures averaged over runs, normalized to
    integrate to 1 (rectangle rule) on ``num_bins`` points from the mean smallest to the mean largest node
    (widened by ``overhead``)."""
    check_positive_int(num_bins, "num_bins")
    if num_bins < 2:
        raise NormlabError(f"num_bins must be at least 2 to span a grid, got {num_bins}")
    if not (sigma_squared > 0 and math.isfinite(sigma_squared)):
        raise NormlabError(f"sigma_squared must be a positive finite variance, got {sigma_squared!r}")
    lo = sum(min(run) for run in nodes) / len(nodes) - overhead
    hi = sum(max(run) for run in nodes) / len(nodes) + overhead
    grid = torch.linspace(lo, hi, num_bins, dtype=torch.float64)
    var = sigma_squared * max(1.0, hi - lo)
    density = torch.zeros(num_bins, dtype=torch.float64)
    for theta, tau in zip(nodes, weights, strict=True):
        t = torch.tensor(theta, dtype=torch.float64)
        w = torch.tensor(tau, dtype=torch.float64)
        gauss = torch.exp(-((grid[:, None] - t) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
        density += gauss @ w
    density /= len(nodes)
    total = density.sum() * (grid[1] - grid[0])
    return grid.tolist(), (density / total).tolist() if total > 0 else density.tolist()


def hessian_density(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn | None = None,
    *,
    iterations: int = 100,
    runs: int = 1,
    num_moments: int = 4,
    num_bins: int = 1000,
    sigma_squared: float = 1e-5,
    mode: str = "train",
    seed: int = 0,
) -> HessianDensity:
    """SLQ eigenvalue density of the Hessian of ``loss_fn(model(x), y)`` w.r.t. all trainable parameters:
    ``runs`` Rademacher starts of ``iterations`` Lanczos steps each (PyHessian's ``iter`` and ``n_v``;
    defaults 100 and 1 as there), the first ``num_moments`` density moments and the broadened density."""
    check_mode(mode)
    for value, name in ((iterations, "iterations"), (runs, "runs"), (num_moments, "num_moments")):
        check_positive_int(value, name)
    x, y, loss_fn, params = loss_inputs(model, batch, mode, loss_fn, "hessian_density")
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(seed)
    n = sum(p.numel() for p in params)
    nodes, weights = [], []
    with preserved(model):
        set_mode(model, mode)
        op = hvp_operator(loss_fn(model(x), y), params)
        for _ in range(runs):
            v = rademacher(params, gen).to(device=device, dtype=params[0].dtype)
            theta, tau = quadrature(*lanczos_tridiagonal(op, v, iterations))
            nodes.append(theta)
            weights.append(tau)
    per_run = torch.tensor([[sum(w * t**k for t, w in zip(theta, tau, strict=True))
                             for k in range(1, num_moments + 1)]
                            for theta, tau in zip(nodes, weights, strict=True)], dtype=torch.float64)
    first = per_run[:, 0] * n
    std_error = (first.std() / math.sqrt(runs)).item() if runs > 1 else math.nan
    grid, density = density_on_grid(nodes, weights, num_bins, sigma_squared)
    return HessianDensity(
        mode=mode,
        num_params=n,
        iterations=iterations,
        runs=runs,
        trace=first.mean().item(),
        trace_std_error=std_error,
        moments=per_run.mean(0).tolist(),
        lambda_min=min(min(run) for run in nodes),
        lambda_max=max(max(run) for run in nodes),
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=density,
    )
