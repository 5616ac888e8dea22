"""Per-member gradient norms and Adaptive Gradient Clipping over stacked parameters.

Each member is treated exactly as :func:`normlab.optim.adaptive_clip_grad_` treats one model (Brock et
al. 2021b, Sec. 4.1, Eq. 3): unit i of a parameter is a row / output filter (index 1 of the stacked
tensor, index 0 of the member's own) for >= 2-D parameters, the whole tensor for 0-D and 1-D ones, and
``G_i <- G_i * min(1, clip * max(||W_i||, eps) / ||G_i||)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.optim.agc import _clip_scale


def member_grad_norms(params: dict[str, Tensor]) -> Tensor:
    """(K,) global L2 norms ``sqrt(sum_p ||g_p[k]||^2)``, one per member (the Trainer's grad_norm)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return torch.zeros(next(iter(params.values())).shape[0])
    squares = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads])
    return squares.sum(dim=0).sqrt()


@torch.no_grad()
def stacked_agc_(params: dict[str, Tensor], names: list[str], clip: float, eps: float) -> None:
    """Clip the gradients of ``params[name]`` for ``name`` in ``names`` in place, member by member."""
    for name in names:
        p = params[name]
        if p.grad is None:
            continue
        units = (p.shape[0], p.shape[1], -1) if p.dim() > 2 else (p.shape[0], -1)
        axis = 2 if p.dim() > 2 else 1
        w_norm = torch.linalg.vector_norm(p.reshape(units), dim=axis).float()
        g_norm = torch.linalg.vector_norm(p.grad.reshape(units), dim=axis).float()
        scale = _clip_scale(w_norm, g_norm, clip, eps).to(p.grad.dtype)
        # (K, units) for >= 2-D members, (K,) for 0-D and 1-D ones: broadcast over the rest of the gradient.
        shape = scale.shape if axis == 2 else (p.shape[0],)
        p.grad.mul_(scale.reshape(*shape, *([1] * (p.dim() - len(shape)))))
