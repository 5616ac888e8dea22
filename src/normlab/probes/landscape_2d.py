"""2-D loss landscape: the loss on a plane through the current weights, as Li et al. (2018, arXiv
1712.09913, Sec. 4 and 6) draw it.

For two directions d1, d2 in weight space and coordinates alpha_i, beta_j::

    losses[i][j] = L(W + alpha_i * d1 + beta_j * d2)          (evaluation only: no update)

Directions (one of):
- random (default): two Gaussian directions, each filter-normalized (every filter d_i rescaled to
  ``||W_i||``; 1-D parameters, i.e. biases and norm affines, get 0: Li et al.'s ``ignore='biasbn'``), from
  one private generator seeded by ``seed``; coordinates in ``span`` = [-1, 1] as Li et al.'s figures;
- ``through=(A, B)``: the plane through W and two other weight settings (checkpoints of the same model),
  d1 = A - W, d2 = B - W over every trainable parameter, so (0, 0) is W, (1, 0) is A and (0, 1) is B
  (loss-landscapes' ``planar_interpolation``); default ``span`` [-0.25, 1.25];
- ``directions=(d1, d2)``: any two directions, one tensor per trainable parameter.

``num_points`` coordinates evenly spaced in ``span`` on each axis (or explicit ``alphas`` / ``betas``).
Li et al. evaluate in eval mode over the whole training set; this probe evaluates one batch, by default in
mode "train" (BN normalizes with the batch at every point, so BN's rescaling of the weights is seen as in
training); ``mode="eval"`` is their setting. Every forward pass rewinds the RNG, so dropout masks are the
same at every point. Parameters, buffers, flags and RNG are restored afterwards. Cost: ``len(alphas) *
len(betas)`` forward passes without gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

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
from normlab.probes.loss_landscape import _norm, filter_normalized_direction

Weights = Mapping[str, torch.Tensor] | nn.Module


@dataclasses.dataclass
class Landscape2D(ProbeResult):
    """``losses[i][j]`` is the loss at ``alphas[i] * d1 + betas[j] * d2``; ``loss`` the one at W."""

    mode: str
    directions: str
    loss: float
    alphas: list[float]
    betas: list[float]
    losses: list[list[float]]
    loss_min: float
    loss_max: float
    direction_norms: list[float]
    direction_cosine: float


def coordinates(span: tuple[float, float], num_points: int) -> list[float]:
    """``num_points`` values evenly spaced from ``span[0]`` to ``span[1]``."""
    check_positive_int(num_points, "num_points")
    lo, hi = (float(v) for v in span)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise NormlabError(f"span must be two finite numbers low < high, got {span!r}")
    if num_points == 1:
        return [(lo + hi) / 2]
    return [lo + (hi - lo) * j / (num_points - 1) for j in range(num_points)]


def _check_axis(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        raise NormlabError(f"{name} must be a non-empty list of finite coordinates, got {values!r}")
    return values


def _toward(model: nn.Module, other: Weights, which: str) -> list[torch.Tensor]:
    """``other - W`` for every trainable parameter of ``model``, matched by name."""
    state = dict(other.named_parameters()) if isinstance(other, nn.Module) else dict(other)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = state.get(name)
        if not isinstance(target, torch.Tensor) or target.shape != p.shape:
            got = "missing" if target is None else tuple(getattr(target, "shape", ()))
            raise NormlabError(
                f"through[{which}] does not match the model: parameter {name!r} of shape {tuple(p.shape)} "
                f"is {got} there; give weights (a state dict or model) of the same architecture"
            )
        out.append(target.detach().to(p) - p.detach())
    return out


def _given(model_params: list[torch.Tensor], directions: Sequence) -> list[list[torch.Tensor]]:
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
        raise NormlabError(f"directions must be a pair (d1, d2), got {type(directions).__name__}")
    out = []
    for k, d in enumerate(directions):
        d = list(d)
        shapes = [tuple(t.shape) for t in d] if all(isinstance(t, torch.Tensor) for t in d) else None
        if shapes != [tuple(p.shape) for p in model_params]:
            raise NormlabError(
                f"directions[{k}] must hold one tensor per trainable parameter with its shape "
                f"({len(model_params)} tensors), got {shapes if shapes is not None else 'non-tensors'}"
            )
        out.append([t.detach().to(p) for t, p in zip(d, model_params, strict=True)])
    return out


def landscape_2d(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn | None = None,
    *,
    through: tuple[Weights, Weights] | None = None,
    directions: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    span: tuple[float, float] | None = None,
    num_points: int = 11,
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    mode: str = "train",
    seed: int = 0,
) -> Landscape2D:
    """The loss on the plane ``W + alpha d1 + beta d2`` (see the module docstring for the directions)."""
    check_mode(mode)
    if through is not None and directions is not None:
        raise NormlabError("give through= (two checkpoints) or directions=, not both")
    kind = "checkpoints" if through is not None else "given" if directions is not None else "random"
    grid = coordinates(span or ((-0.25, 1.25) if through is not None else (-1.0, 1.0)), num_points)
    alphas = _check_axis(grid if alphas is None else alphas, "alphas")
    betas = _check_axis(grid if betas is None else betas, "betas")
    x, y, loss_fn, params = loss_inputs(model, batch, mode, loss_fn, "landscape_2d", " to move along")
    if through is not None:
        if not isinstance(through, (tuple, list)) or len(through) != 2:
            raise NormlabError(f"through must be a pair of weights (A, B), got {type(through).__name__}")
        d1, d2 = _toward(model, through[0], "0"), _toward(model, through[1], "1")
    elif directions is not None:
        d1, d2 = _given(params, directions)
    else:
        gen = torch.Generator().manual_seed(seed)
        d1, d2 = filter_normalized_direction(params, gen), filter_normalized_direction(params, gen)
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    norms = [_norm(d1), _norm(d2)]
    dot = sum(torch.sum(a.double() * b.double()).item() for a, b in zip(d1, d2, strict=True))
    cosine = dot / (norms[0] * norms[1]) if norms[0] > 0 and norms[1] > 0 else math.nan

    with preserved(model), torch.no_grad():
        set_mode(model, mode)
        rng = torch.get_rng_state()
        start = [p.detach().clone() for p in params]

        def loss_at(a: float, b: float) -> float:
            torch._foreach_copy_(params, start)
            torch._foreach_add_(params, d1, alpha=a)
            torch._foreach_add_(params, d2, alpha=b)
            torch.set_rng_state(rng)
            return loss_fn(model(x), y).item()

        losses = [[loss_at(a, b) for b in betas] for a in alphas]
        center = loss_at(0.0, 0.0)
    flat = [v for row in losses for v in row]
    return Landscape2D(
        mode=mode,
        directions=kind,
        loss=center,
        alphas=alphas,
        betas=betas,
        losses=losses,
        loss_min=min(flat),
        loss_max=max(flat),
        direction_norms=norms,
        direction_cosine=cosine,
    )
