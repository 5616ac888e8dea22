"""Internal covariate shift as Santurkar et al. (2018, arXiv 1805.11604) define it (Definition 2.1).

For layer i at step t, on the same batch (x_t, y_t)::

    G  = grad_{W_i} L(W_1^t, ..., W_k^t)
    G' = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

where every earlier layer has taken its update with the real optimizer (SGD with momentum, Adam, weight
decay, ...: one ``optimizer.step()`` on a deep copy of model and optimizer gives W^{t+1}) and layer i and the
later ones have not. Reported per layer: ``l2 = ||G - G'||_2`` and ``cos = <G, G'> / (||G|| ||G'||)``.

A "layer" is a module with its own trainable ``weight`` (conv, linear, Scaled-WS conv); with
``include_norm=True`` normalization layers with affine parameters are reported too. W_i is all of the
layer's own parameters (weight and bias), flattened. "Earlier" is the order in which the forward pass first
enters modules with parameters of their own; parameters of unreported modules (norm affines, SkipInit
gains) also move to W^{t+1} when their module comes before layer i, because they too are "earlier layers".
The same dropout masks are used for every forward pass (the RNG is rewound), so G and G' differ only by the
weights. Cost: one forward/backward and one optimizer step, then one forward and a partial backward
(down to layer i only) per reported layer: at most L + 1 training steps.

From a trainer callback (after the optimizer step at t), pass ``ctx.next_batch()``: the probe then measures
the step t + 1 the run will really take (its batch, from the weights it starts at), as the definition has
it. ``ctx.batch``, the batch just used, would measure a second step on that batch instead.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import LossFn, check_batch, default_loss, model_device, unpack
from normlab.probes._layers import forward_order, own_parameters, require_layers, weight_layers
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_batch_for_mode, check_mode, rng_preserved, set_mode


@dataclasses.dataclass
class ICS(ProbeResult):
    """Per layer (forward order): ``l2`` = ||G - G'||_2, ``cos`` = cos(G, G'), ``grad_norm`` = ||G||_2."""

    mode: str
    l2: dict[str, float]
    cos: dict[str, float]
    grad_norm: dict[str, float]
    lr: float = math.nan


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = a.norm() * b.norm()
    return (a @ b / denom).item() if denom > 0 else math.nan


def ics(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn | None = None,
    *,
    mode: str = "train",
    include_norm: bool = False,
    grad_transform: Callable[[nn.Module], None] | None = None,
    lr: float | None = None,
) -> ICS:
    """ICS (Santurkar et al. 2018, Def. 2.1) of every layer of ``model`` for one step of ``optimizer``.

    Args:
        batch: ``(x, y)``; the loss is ``loss_fn(model(x), y)`` (default: cross-entropy for integer ``y``,
            MSE otherwise).
        mode: "train" (BN uses batch statistics, the default) or "eval".
        grad_transform: applied to the copied model between backward and ``optimizer.step()`` when the
            training loop does so too (e.g. AGC or gradient clipping), so that W^{t+1} is the real update.
        lr: the step's learning rate (every parameter group of the copied optimizer); None = the
            optimizer's own. A finished run's optimizer holds its schedule's last lr (near 0 after a cosine
            decay): give the run's base lr. The result's ``lr`` is the lr the step took.

    The model, its buffers, the optimizer (state and hyper-parameters) and the RNG are left untouched: the
    step is taken on deep copies.
    """
    check_mode(mode)
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise NormlabError(f"lr must be a finite number > 0, got {lr!r}")
    x, y = unpack(batch)
    if y is None:
        raise NormlabError("ics needs a batch (x, y) with targets to compute the loss, got x only")
    check_batch(x, y)
    check_batch_for_mode(model, x.shape[0], mode)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise NormlabError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    loss_fn = loss_fn or default_loss
    require_layers(weight_layers(model, include_norm=include_norm), model, "layer with its own weight")
    device = model_device(model)
    x, y = x.to(device), y.to(device)

    with rng_preserved():
        # One deepcopy of the pair keeps the optimizer's references pointing at the copied parameters.
        net, opt = copy.deepcopy((model, optimizer))
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        set_mode(net, mode)
        rng = torch.get_rng_state()
        modules = dict(net.named_modules())
        for p in net.parameters():
            p.grad = None

        def loss() -> torch.Tensor:
            torch.set_rng_state(rng)  # the same dropout masks in every pass
            return loss_fn(net(x), y)

        holder: list[torch.Tensor] = []
        order = forward_order(net, lambda: holder.append(loss()))
        holder.pop().backward()
        reported = sorted(
            (n for n, _ in weight_layers(net, include_norm=include_norm) if n in order), key=order.index
        )
        G = {n: _flat([p.grad for p in own_parameters(modules[n])]) for n in reported}
        w_t = {n: [p.detach().clone() for p in own_parameters(modules[n])] for n in order}
        if grad_transform is not None:
            grad_transform(net)
        opt.step()
        w_next = {n: [p.detach().clone() for p in own_parameters(modules[n])] for n in order}

        with torch.no_grad():
            for n in order:
                for p, w in zip(own_parameters(modules[n]), w_t[n], strict=True):
                    p.copy_(w)
        result = ICS(mode=mode, l2={}, cos={}, grad_norm={}, lr=float(opt.param_groups[0]["lr"]))
        moved = 0  # order[:moved] already hold W^{t+1}
        for name in reported:
            position = order.index(name)
            with torch.no_grad():
                for earlier in order[moved:position]:
                    for p, w in zip(own_parameters(modules[earlier]), w_next[earlier], strict=True):
                        p.copy_(w)
            moved = max(moved, position)
            g_shift = _flat(list(torch.autograd.grad(loss(), own_parameters(modules[name]))))
            g = G[name]
            result.l2[name] = (g - g_shift).norm().item()
            result.cos[name] = _cosine(g, g_shift)
            result.grad_norm[name] = g.norm().item()
    return result
