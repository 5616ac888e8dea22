"""SGD (momentum, Nesterov) and AdamW over stacked parameters, each member with its own learning rate.

The arithmetic is ``torch.optim.SGD`` / ``torch.optim.AdamW`` (``foreach=True``) applied to every member
at once: a stacked tensor (K, ...) holds the K members' copies of one parameter, ``lr`` is a (K,) tensor
broadcast over the rest, and weight decay follows :func:`normlab.train.optimizer.param_groups` (no decay
on < 2-D tensors when ``wd_exclude_norm_bias``), decided on the members' own (unstacked) shapes.

SGD, with ``d = g + wd * w``: ``b <- d`` at the first step, else ``b <- momentum * b + d``; the step is
``w <- w - lr * (d + momentum * b)`` (Nesterov) or ``w <- w - lr * b``.
AdamW (betas 0.9, 0.999, eps 1e-8, Loshchilov & Hutter 2019): ``w <- w (1 - lr wd)``,
``m <- lerp(m, g, 0.1)``, ``v <- 0.999 v + 0.001 g^2``,
``w <- w - lr / (1 - 0.9^t) * m / (sqrt(v) / sqrt(1 - 0.999^t) + eps)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.train import TrainConfig

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


class StackedOptimizer:
    """The optimizer of ``config`` over ``params`` (name -> stacked tensor); ``decayed`` names those with
    weight decay."""

    def __init__(self, params: dict[str, Tensor], decayed: set[str], config: TrainConfig) -> None:
        self.config = config
        self.decayed = decayed
        self.state: dict[str, dict[str, Tensor]] = {}
        self.steps = 0  # members in one stack start together and step together
        self.params = params

    def step(self, params: dict[str, Tensor], lr: Tensor) -> None:
        """One update of every member; ``lr`` (K,) holds each member's rate for this step."""
        self.params = params
        with torch.no_grad():
            if self.config.optimizer == "sgd":
                self._sgd(lr)
            else:
                self._adamw(lr)

    def _sgd(self, lr: Tensor) -> None:
        cfg = self.config
        for name, p in self.params.items():
            if p.grad is None:
                continue
            rate = _member_view(lr, p)
            d = p.grad
            wd = cfg.weight_decay if name in self.decayed else 0.0
            if wd:
                d = d.add(p, alpha=wd)
            if cfg.momentum:
                state = self.state.setdefault(name, {})
                if "momentum" not in state:
                    state["momentum"] = d.detach().clone()
                else:
                    state["momentum"].mul_(cfg.momentum).add_(d)
                buf = state["momentum"]
                d = d.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
            p.sub_(rate * d)

    def _adamw(self, lr: Tensor) -> None:
        self.steps += 1
        t = self.steps
        correction1 = 1 - _BETA1**t
        correction2_sqrt = (1 - _BETA2**t) ** 0.5
        for name, p in self.params.items():
            if p.grad is None:
                continue
            g = p.grad
            rate = _member_view(lr, p)
            state = self.state.setdefault(name, {})
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            wd = self.config.weight_decay if name in self.decayed else 0.0
            if wd:
                p.mul_(1 - rate * wd)
            m.lerp_(g, 1 - _BETA1)
            v.mul_(_BETA2).addcmul_(g, g, value=1 - _BETA2)
            denom = (v.sqrt() / correction2_sqrt).add_(_ADAM_EPS)
            p.sub_((rate / correction1) * m / denom)

    def keep(self, members: list[int], params: dict[str, Tensor]) -> None:
        """Keep the state of ``members`` only (as ``StackedModel.keep``); ``params`` are the new leaves."""
        index = torch.tensor(members, dtype=torch.long, device=next(iter(params.values())).device)
        self.state = {
            name: {k: v.index_select(0, index) for k, v in state.items()}
            for name, state in self.state.items()
        }
        self.params = params


def _member_view(values: Tensor, like: Tensor) -> Tensor:
    """(K,) -> (K, 1, ..., 1) broadcasting against ``like`` (K, ...)."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))
