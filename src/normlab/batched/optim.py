"""SGD (momentum, Nesterov) and AdamW over stacked parameters, each member with its own learning rate.

The arithmetic is ``torch.optim.SGD`` / ``torch.optim.AdamW`` (``foreach=True``) applied to every member
at once: a stacked tensor (K, ...) holds the K members' copies of one parameter, ``lr`` is a (K,) tensor
broadcast over the rest, and weight decay follows :func:`normlab.train.optimizer.param_groups` (no decay
on < 2-D tensors when ``wd_exclude_norm_bias``), decided on the members' own (unstacked) shapes. Where
the stacked parameters are views of one flat buffer (:mod:`normlab.batched.flat`), the same arithmetic
runs on the whole buffer at once, with the per-member lr spread over its positions.

SGD, with ``d = g + wd * w``: ``b <- d`` at the first step, else ``b <- momentum * b + d``; the step is
``w <- w - lr * (d + momentum * b)`` (Nesterov) or ``w <- w - lr * b``.
AdamW (betas 0.9, 0.999, eps 1e-8, Loshchilov & Hutter 2019): ``w <- w (1 - lr wd)``,
``m <- lerp(m, g, 0.1)``, ``v <- 0.999 v + 0.001 g^2``,
``w <- w - lr / (1 - 0.9^t) * m / (sqrt(v) / sqrt(1 - 0.999^t) + eps)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.batched.flat import FlatParameters
from normlab.train import TrainConfig

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


class StackedOptimizer:
    """The optimizer of ``config`` over ``params`` (name -> stacked tensor); ``decayed`` names those with
    weight decay. With ``flat`` (the parameters as views of one buffer, :mod:`normlab.batched.flat`) the
    state is one buffer per kind too, and a step where every parameter received a gradient is a few
    whole-buffer kernels; otherwise (or without ``flat``) the per-tensor ``foreach`` arithmetic, over the
    parameters that received one. Both compute the same numbers."""

    def __init__(
        self, params: dict[str, Tensor], decayed: set[str], config: TrainConfig,
        flat: FlatParameters | None = None,
    ) -> None:
        self.config = config
        self.decayed = decayed
        self.state: dict[str, dict[str, Tensor]] = {}
        self.steps = 0  # members in one stack start together and step together
        self.params = params
        self.started: set[str] = set()  # parameters whose SGD momentum buffer holds a first step
        self._use(flat)

    def _use(self, flat: FlatParameters | None) -> None:
        self.flat = flat
        self.flat_state: dict[str, Tensor] = {}
        if flat is not None:
            self.decay_mask = flat.mask(self.decayed) if self.config.weight_decay else None
            for kind in {kind for state in self.state.values() for kind in state}:
                self.flat_state[kind] = buffer = torch.zeros_like(flat.data)
                for name, view in flat.views(buffer).items():
                    if kind in self.state.get(name, {}):
                        view.copy_(self.state[name][kind])
                    self.state.setdefault(name, {})[kind] = view

    def _buffer(self, kind: str) -> Tensor:
        """The flat state buffer ``kind`` (zeros when new; the per-parameter states are its views)."""
        if kind not in self.flat_state:
            self.flat_state[kind] = buffer = torch.zeros_like(self.flat.data)
            for name, view in self.flat.views(buffer).items():
                self.state.setdefault(name, {})[kind] = view
        return self.flat_state[kind]

    def step(self, params: dict[str, Tensor], lr: Tensor) -> None:
        """One update of every member; ``lr`` (K,) holds each member's rate for this step."""
        self.params = params
        flat = self.flat is not None and self.flat.complete
        with torch.no_grad():
            if self.config.optimizer == "sgd":
                # The flat path needs every momentum buffer at the same stage (none started, or all).
                uniform = len(self.started) in (0, len(params))
                self._sgd_flat(lr) if flat and uniform else self._sgd(lr)
            else:
                self._adamw_flat(lr) if flat else self._adamw(lr)

    def _live(self) -> list[tuple[str, Tensor]]:
        if self.flat is not None:
            return [(name, p) for name, p in self.params.items() if name in self.flat.received]
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
            if self.flat is not None:
                self._buffer("momentum")  # the per-parameter buffers are its views
            fresh, old = [], []
            for (name, _), di in zip(live, d, strict=True):
                if name in self.started:
                    old.append((self.state[name]["momentum"], di))
                    continue
                fresh.append(name)  # its first step: b <- d
                if self.flat is not None:
                    self.state[name]["momentum"].copy_(di)
                else:
                    self.state.setdefault(name, {})["momentum"] = di.detach().clone()
            if old:
                bufs = [b for b, _ in old]
                torch._foreach_mul_(bufs, cfg.momentum)
                torch._foreach_add_(bufs, [di for _, di in old])
            self.started.update(fresh)
            bufs = [self.state[name]["momentum"] for name, _ in live]
            d = torch._foreach_add(d, bufs, alpha=cfg.momentum) if cfg.nesterov else bufs
        torch._foreach_sub_(params, torch._foreach_mul(d, self._rates(lr, params)))

    def _sgd_flat(self, lr: Tensor) -> None:
        cfg, flat = self.config, self.flat
        d = flat.grad if self.decay_mask is None else torch.addcmul(flat.grad, flat.data, self.decay_mask,
                                                                       value=cfg.weight_decay)
        if cfg.momentum:
            buffer = self._buffer("momentum")
            if not self.started:  # the first step: b <- d
                buffer.copy_(d)
                self.started.update(self.params)
            else:
                buffer.mul_(cfg.momentum).add_(d)
            d = d.add(buffer, alpha=cfg.momentum) if cfg.nesterov else buffer
        flat.data.sub_(d * flat.per_position(lr))

    def _adamw(self, lr: Tensor) -> None:
        self.steps += 1
        t = self.steps
        correction1 = 1 - _BETA1**t
        correction2_sqrt = (1 - _BETA2**t) ** 0.5
        live = self._live()
        if not live:
            return
        if self.flat is not None:  # the per-parameter states are views of the flat buffers
            for kind in ("exp_avg", "exp_avg_sq"):
                self._buffer(kind)
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

    def _adamw_flat(self, lr: Tensor) -> None:
        self.steps += 1
        t = self.steps
        flat = self.flat
        m, v = self._buffer("exp_avg"), self._buffer("exp_avg_sq")
        rate = flat.per_position(lr)
        if self.decay_mask is not None:  # w <- w (1 - lr wd), 1 exactly where there is no decay
            flat.data.mul_(torch.addcmul(torch.ones_like(rate), rate, self.decay_mask,
                                         value=-self.config.weight_decay))
        m.lerp_(flat.grad, 1 - _BETA1)
        v.mul_(_BETA2).addcmul_(flat.grad, flat.grad, value=1 - _BETA2)
        denom = v.sqrt().div_((1 - _BETA2**t) ** 0.5).add_(_ADAM_EPS)
        flat.data.sub_(torch.div(m, denom).mul_(rate.div_(1 - _BETA1**t)))

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

    def keep(self, members: list[int], params: dict[str, Tensor], flat: FlatParameters | None = None) -> None:
        """Keep the state of ``members`` only (as ``StackedModel.keep``); ``params`` are the new leaves and
        ``flat`` their flat buffer, if they have one."""
        index = torch.tensor(members, dtype=torch.long, device=next(iter(params.values())).device)
        self.state = {
            name: {k: v.index_select(0, index) for k, v in state.items()}
            for name, state in self.state.items()
        }
        self.params = params
        self._use(flat)
