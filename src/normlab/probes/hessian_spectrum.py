"""Hessian of the training loss: top eigenvalues and trace from Hessian-vector products.

``H v`` is computed by double backward (Pearlmutter 1994): with ``g = grad L(W)`` built with
``create_graph=True``, ``H v = grad_W <g, v>``. One forward pass is shared by every product, so every
product sees the same batch statistics (mode "train", the default: BN normalizes with the batch, and its
Hessian includes the coupling of examples through the batch mean and variance) or running statistics
(mode "eval"), and the same dropout masks.

- Top-k eigenvalues: ``method="lanczos"`` (default): Lanczos with full re-orthogonalization for
  ``max_iter`` steps, the k algebraically largest Ritz values (exact once ``max_iter`` >= #params; it keeps
  ``max_iter`` vectors of #params in memory, so prefer "power" for very large models);
  ``method="power"``: power iteration with deflation, as in PyHessian (Yao et al. 2020), which finds the k
  eigenvalues of largest *magnitude*, stopping when the relative change falls below ``tol``.
- Trace: Hutchinson's estimator ``tr(H) = E[v^T H v]`` with Rademacher v (``trace_samples`` draws; the
  standard error is reported), or ``trace_method="exact"``: the sum of ``e_j^T H e_j`` over all basis
  vectors (one product per parameter; for small nets and tests).
- ``per_layer=True`` adds the top eigenvalue and trace of each layer's diagonal block H_ii (the layer's own
  parameters, everything else held fixed).

Random vectors come from a private generator seeded by ``seed``; the global RNG, parameters, buffers and
flags are left as they were.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import (
    LossFn,
    check_positive_int,
    loss_inputs,
    model_device,
)
from normlab.probes._layers import own_parameters, require_layers, weight_layers
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_mode, preserved, set_mode

Operator = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("lanczos", "power")
TRACE_METHODS = ("hutchinson", "exact")


@dataclasses.dataclass
class Hessian(ProbeResult):
    """``eigenvalues`` in descending order (by value for Lanczos, by magnitude for power iteration)."""

    mode: str
    method: str
    num_params: int
    eigenvalues: list[float]
    trace: float
    trace_std_error: float
    layer_top_eigenvalue: dict[str, float]
    layer_trace: dict[str, float]


def hvp_operator(loss: torch.Tensor, params: list[torch.Tensor], grads=None) -> Operator:
    """Flat ``v -> H v`` for ``loss`` w.r.t. ``params`` (``grads``: a subset of a create_graph gradient)."""
    if grads is None:
        grads = torch.autograd.grad(loss, params, create_graph=True)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def apply(v: torch.Tensor) -> torch.Tensor:
        pieces = [t.view(s) for t, s in zip(v.split(sizes), shapes, strict=True)]
        hv = torch.autograd.grad(grads, params, grad_outputs=pieces, retain_graph=True, allow_unused=True)
        # A parameter the gradient does not depend on (e.g. a bias under ReLU-free paths) has H v = 0.
        hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params, strict=True)]
        return torch.cat([h.reshape(-1) for h in hv])

    return apply


def lanczos_tridiagonal(op: Operator, q: torch.Tensor, steps: int) -> tuple[list[float], list[float]]:
    """``alphas`` (diagonal) and ``betas`` (off-diagonal) of the Lanczos tridiagonal T of a symmetric
    ``op`` from the unit start vector ``q``, after at most ``steps`` steps (fewer when the Krylov space
    closes: then T's eigenvalues are exact eigenvalues of ``op``)."""
    basis, alphas, betas = [], [], []
    for _ in range(min(steps, q.numel())):
        w = op(q)
        alpha = torch.dot(w, q)
        basis.append(q)
        alphas.append(alpha.item())
        # Full re-orthogonalization (twice is enough, Parlett) keeps the Ritz values free of ghosts.
        Q = torch.stack(basis)
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        beta = w.norm()
        if len(alphas) == steps or beta <= 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta.item())
        q = w / beta
    return alphas, betas[: len(alphas) - 1]


def tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas, dtype=torch.float64)
    return T + torch.diag(off, 1) + torch.diag(off, -1)


def lanczos(op: Operator, n: int, k: int, max_iter: int, generator: torch.Generator, like: torch.Tensor):
    """The k largest Ritz values of a symmetric ``op`` on R^n after ``max_iter`` Lanczos steps."""
    q = torch.randn(n, generator=generator, dtype=torch.float64).to(like)
    alphas, betas = lanczos_tridiagonal(op, q / q.norm(), max_iter)
    return torch.linalg.eigvalsh(tridiagonal(alphas, betas)).flip(0)[:k].tolist()


def power_iteration(op: Operator, n: int, k: int, max_iter: int, tol: float, generator: torch.Generator,
                    like: torch.Tensor) -> list[float]:
    """The k eigenvalues of largest magnitude by power iteration with deflation (PyHessian's scheme)."""
    values: list[float] = []
    vectors: list[torch.Tensor] = []

    def deflate(v: torch.Tensor) -> torch.Tensor:
        for u in vectors:
            v = v - torch.dot(v, u) * u
        return v

    for _ in range(min(k, n)):
        v = deflate(torch.randn(n, generator=generator, dtype=torch.float64).to(like))
        v = v / v.norm()
        value = None
        for _ in range(max_iter):
            hv = deflate(op(v))
            new = torch.dot(hv, v).item()
            norm = hv.norm()
            if norm == 0:
                value = 0.0
                break
            v = hv / norm
            if value is not None and abs(new - value) <= tol * (abs(value) + 1e-12):
                value = new
                break
            value = new
        values.append(float(value))
        vectors.append(v)
    return values


def hutchinson(op: Operator, n: int, samples: int, generator: torch.Generator, like: torch.Tensor):
    """Mean and standard error of v^T H v over Rademacher v (Hutchinson 1989)."""
    draws = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(like)
        draws.append(torch.dot(v, op(v)).item())
    t = torch.tensor(draws, dtype=torch.float64)
    std_error = (t.std() / math.sqrt(samples)).item() if samples > 1 else math.nan
    return t.mean().item(), std_error


def exact_trace(op: Operator, n: int, like: torch.Tensor) -> float:
    eye = torch.zeros(n, dtype=like.dtype, device=like.device)
    total = 0.0
    for j in range(n):
        eye.zero_()
        eye[j] = 1.0
        total += op(eye)[j].item()
    return total


def hessian(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn | None = None,
    *,
    top_k: int = 1,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-4,
    trace_method: str = "hutchinson",
    trace_samples: int = 100,
    per_layer: bool = False,
    mode: str = "train",
    seed: int = 0,
) -> Hessian:
    """Top-``top_k`` eigenvalues and trace of the Hessian of ``loss_fn(model(x), y)`` w.r.t. all trainable
    parameters (and per layer on request). Cost: one forward/backward with graph, then one double-backward
    per product: ``max_iter`` (Lanczos) or up to ``top_k * max_iter`` (power) plus ``trace_samples``."""
    check_mode(mode)
    if method not in METHODS:
        raise NormlabError(f"method must be 'lanczos' or 'power', got {method!r}")
    if trace_method not in TRACE_METHODS:
        raise NormlabError(f"trace_method must be 'hutchinson' or 'exact', got {trace_method!r}")
    for value, name in ((top_k, "top_k"), (max_iter, "max_iter"), (trace_samples, "trace_samples")):
        check_positive_int(value, name)
    x, y, loss_fn, params = loss_inputs(model, batch, mode, loss_fn, "hessian")
    layers = weight_layers(model) if per_layer else []
    if per_layer:
        require_layers(layers, model, "layer with its own weight")
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(seed)
    like = torch.zeros((), dtype=params[0].dtype, device=device)

    def spectrum(op: Operator, n: int) -> tuple[list[float], float, float]:
        if method == "lanczos":
            top = lanczos(op, n, top_k, max_iter, gen, like)
        else:
            top = power_iteration(op, n, top_k, max_iter, tol, gen, like)
        if trace_method == "exact":
            return top, exact_trace(op, n, like), 0.0
        return (top, *hutchinson(op, n, trace_samples, gen, like))

    with preserved(model):
        set_mode(model, mode)
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        eig, trace, std_error = spectrum(hvp_operator(loss, params, grads), sum(p.numel() for p in params))
        result = Hessian(mode, method, sum(p.numel() for p in params), eig, trace, std_error, {}, {})
        index = {id(p): i for i, p in enumerate(params)}
        for name, module in layers:
            own = own_parameters(module)
            sub = [grads[index[id(p)]] for p in own]
            top, layer_trace, _ = spectrum(hvp_operator(loss, own, sub), sum(p.numel() for p in own))
            result.layer_top_eigenvalue[name] = top[0]
            result.layer_trace[name] = layer_trace
    return result
