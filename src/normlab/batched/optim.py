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

    def _live(self) -> list[tuple[str, Tensor]]:
        return [(name, p) for name, p in self.params.items() if p.grad is not None]

    def _sgd(self, lr: Tensor) -> None:
        cfg = self.config
        live = self._live()
        if not live:
            return
        params = [p for _, p in live]
        # d = g + wd * w on the decayed tensors (a new tensor: the grads are left as they were).
        d = [
            p.grad.add(p, alpha=cfg.weight_decay) if cfg.weight_decay and name in self.decayed else p.grad
            for name, p in live
        ]
        if cfg.momentum:
            missing = [name for name, _ in live if "momentum" not in self.state.get(name, {})]
            if missing:  # the first step: b <- d (members start and step together, so all or none)
                for (name, _), di in zip(live, d, strict=True):
                    self.state.setdefault(name, {})["momentum"] = di.detach().clone()
            else:
                bufs = [self.state[name]["momentum"] for name, _ in live]
                torch._foreach_mul_(bufs, cfg.momentum)
                torch._foreach_add_(bufs, d)
            bufs = [self.state[name]["momentum"] for name, _ in live]
            d = torch._foreach_add(d, bufs, alpha=cfg.momentum) if cfg.nesterov else bufs
        torch._foreach_sub_(params, torch._foreach_mul(d, self._rates(lr, params)))

    def _adamw(self, lr: Tensor) -> None:
        self.steps += 1
        t = self.steps
        correction1 = 1 - _BETA1**t
        correction2_sqrt = (1 - _BETA2**t) ** 0.5
        live = self._live()
        if not live:
            return
        for name, p in live:
            state = self.state.setdefault(name, {})
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        params = [p for _, p in live]
        grads = [p.grad for _, p in live]
        m = [self.state[name]["exp_avg"] for name, _ in live]
        v = [self.state[name]["exp_avg_sq"] for name, _ in live]
        rates = self._rates(lr, params)
        wd = self.config.weight_decay
        decayed = [(p, r) for (name, p), r in zip(live, rates, strict=True) if wd and name in self.decayed]
        if decayed:  # w <- w (1 - lr wd)
            torch._foreach_mul_([p for p, _ in decayed], [1 - r * wd for _, r in decayed])
        torch._foreach_lerp_(m, grads, 1 - _BETA1)
        torch._foreach_mul_(v, _BETA2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - _BETA2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, correction2_sqrt)
        torch._foreach_add_(denom, _ADAM_EPS)
        steps = torch._foreach_div(m, denom)
        torch._foreach_mul_(steps, [r / correction1 for r in rates])
        torch._foreach_sub_(params, steps)

    def _rates(self, lr: Tensor, params: list[Tensor]) -> list[Tensor]:
        """Each member's lr as a (K, 1, ..., 1) tensor per parameter (one conversion per dtype/device)."""
        converted: dict[tuple, Tensor] = {}
        rates = []
        for p in params:
            key = (p.device, p.dtype)
            if key not in converted:
                converted[key] = lr.to(device=p.device, dtype=p.dtype)
            rates.append(converted[key].view(-1, *([1] * (p.dim() - 1))))
        return rates

    def keep(self, members: list[int], params: dict[str, Tensor]) -> None:
        """Keep the state of ``members`` only (as ``StackedModel.keep``); ``params`` are the new leaves."""
        index = torch.tensor(members, dtype=torch.long, device=next(iter(params.values())).device)
        self.state = {
            name: {k: v.index_select(0, index) for k, v in state.items()}
            for name, state in self.state.items()
        }
        self.params = params

