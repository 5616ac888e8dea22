"""Loss landscape along the gradient step, as in Santurkar et al. (2018, arXiv 1805.11604), Section 3.2.

At the current weights W with gradient g = grad L(W) on one batch, the probe evaluates (no update) the
points ``W - eta * d`` for a grid of step lengths eta, with ``d = g`` (``direction="gradient"``) or a
filter-normalized random direction (``direction="random"``, Li et al. 2018, Sec. 4)::

    losses[j]          = L(W - eta_j d)                  (loss_min / loss_max: the "loss variation" band)
    grad_change[j]     = ||g - grad L(W - eta_j d)||_2   (gradient predictiveness; small = predictive)
    beta_smoothness    = max_j grad_change[j] / ||eta_j d||_2   (effective beta-smoothness)

Default grid: ``num_points`` values evenly spaced in [1/2, 4] x lr (Santurkar's VGG grid, [0.05, 0.4] at
lr 0.1); the DLN grid is [1/100, 30] x lr (pass ``eta_range``). Filter normalization: each output filter
(row) d_i of a random Gaussian direction is rescaled to ||W_i||; 1-D parameters (biases, norm affines) get
d = 0, which is Li et al.'s ``ignore='biasbn'`` default. All passes reuse the same dropout masks (the RNG is
rewound before each), so the curve reflects the weights only.

Parameters, buffers (BN running statistics), train/eval flags, gradients and RNG state are bit-identical
afterwards; an optimizer is never stepped. Cost: k + 1 forward/backward passes for k points.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import (
    LossFn,
    check_positive_int,
    loss_inputs,
    model_device,
)
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_mode, preserved, set_mode

DIRECTIONS = ("gradient", "random")


@dataclasses.dataclass
class Landscape(ProbeResult):
    """``etas`` are absolute step lengths; ``losses`` / ``grad_change`` one entry per eta."""

    mode: str
    direction: str
    loss: float
    grad_norm: float
    etas: list[float]
    losses: list[float]
    grad_change: list[float]
    loss_min: float
    loss_max: float
    beta_smoothness: float
    lr: float | None = None


def eta_grid(lr: float, num_points: int = 8, eta_range: tuple[float, float] = (0.5, 4.0)) -> list[float]:
    """``num_points`` step lengths evenly spaced in ``[eta_range[0], eta_range[1]] * lr``."""
    check_positive_int(num_points, "num_points")
    lo, hi = eta_range
    if not (lr > 0 and 0 < lo <= hi and math.isfinite(hi) and math.isfinite(lr)):
        raise NormlabError(
            f"the eta grid needs lr > 0 and 0 < low <= high, got lr={lr!r}, eta_range={eta_range!r}"
        )
    if num_points == 1:
        return [lo * lr]
    return [lr * (lo + (hi - lo) * j / (num_points - 1)) for j in range(num_points)]


def check_etas(etas: Sequence[float]) -> list[float]:
    etas = [float(e) for e in etas]
    if not etas or any(not (e > 0 and math.isfinite(e)) for e in etas):
        raise NormlabError(f"etas must be a non-empty list of positive finite step lengths, got {etas!r}")
    return etas


def filter_normalize(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Li et al. (2018) Sec. 4: each filter d_i (slice along dim 0) rescaled to ``||W_i||``; a 1-D ``w``
    (bias, norm affine) gets 0, Li et al.'s ``ignore='biasbn'`` default."""
    if w.dim() <= 1:
        return torch.zeros_like(w)
    d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    w_norm = w.detach().flatten(1).norm(dim=1)
    return d * (w_norm / d_norm).view(-1, *([1] * (w.dim() - 1)))


def filter_normalized_direction(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction drawn from ``generator``, filter-normalized against ``params``."""
    out = []
    for w in params:
        if w.dim() <= 1:
            out.append(torch.zeros_like(w))
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype, device="cpu").to(w.device)
        out.append(filter_normalize(d, w))
    return out


def _norm(tensors: list[torch.Tensor]) -> float:
    """Global L2 norm of a list of tensors (one fused ``_foreach_norm``)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).double()).item()


def landscape(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn | None = None,
    *,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    etas: Sequence[float] | None = None,
    num_points: int = 8,
    eta_range: tuple[float, float] = (0.5, 4.0),
    direction: str = "gradient",
    mode: str = "train",
    seed: int = 0,
) -> Landscape:
    """Loss variation, gradient predictiveness and effective beta-smoothness along ``W - eta * d``.

    ``etas`` (absolute step lengths) overrides the grid ``eta_grid(lr, num_points, eta_range)``; ``lr``
    defaults to the first parameter group's lr of ``optimizer`` (a finished run's optimizer holds its
    schedule's last lr: pass the run's base lr); the result's ``lr`` is the lr behind the grid. ``seed``
    drives the random direction with
    a private generator (the global RNG is not consumed).
    """
    check_mode(mode)
    if direction not in DIRECTIONS:
        raise NormlabError(f"direction must be 'gradient' or 'random', got {direction!r}")
    if etas is None:
        if lr is None and optimizer is not None:
            lr = optimizer.param_groups[0]["lr"]
        if lr is None:
            raise NormlabError("landscape needs lr=, optimizer= or an explicit etas= grid; none was given")
        etas = eta_grid(lr, num_points, eta_range)
    else:
        lr = None  # an explicit grid: no lr behind it
    etas = check_etas(etas)
    x, y, loss_fn, params = loss_inputs(model, batch, mode, loss_fn, "landscape", " to move along")
    device = model_device(model)
    x, y = x.to(device), y.to(device)

    with preserved(model):
        set_mode(model, mode)
        rng = torch.get_rng_state()

        def loss_and_grad() -> tuple[float, list[torch.Tensor]]:
            torch.set_rng_state(rng)
            loss = loss_fn(model(x), y)
            return loss.item(), [g.detach() for g in torch.autograd.grad(loss, params)]

        loss0, g = loss_and_grad()
        if direction == "gradient":
            d = g
        else:
            d = filter_normalized_direction(params, torch.Generator().manual_seed(seed))
        start = [p.detach().clone() for p in params]
        d_norm = _norm(d)
        losses, changes, beta = [], [], 0.0
        for eta in etas:
            with torch.no_grad():
                torch._foreach_copy_(params, start)
                torch._foreach_add_(params, d, alpha=-eta)
            loss, g_eta = loss_and_grad()
            change = _norm(torch._foreach_sub(g, g_eta))
            losses.append(loss)
            changes.append(change)
            if d_norm > 0:
                beta = max(beta, change / (eta * d_norm))
    return Landscape(
        lr=lr,
        mode=mode,
        direction=direction,
        loss=loss0,
        grad_norm=_norm(g),
        etas=etas,
        losses=losses,
        grad_change=changes,
        loss_min=min(losses),
        loss_max=max(losses),
        beta_smoothness=beta,
    )
