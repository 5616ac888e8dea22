"""How much one example's output depends on the other examples of its batch.

In training mode BN normalizes with batch statistics, so f(x_i) depends on every x_j of the batch; GN, LN
and un-normalized networks process examples independently, and so does BN in evaluation mode. With
``J_ij = d f(x_i) / d x_j`` (a (K, D) block of the Jacobian of the outputs w.r.t. the inputs) and Frobenius
norms, for each measured example i::

    coupling_i = mean_{j != i} ||J_ij|| / ||J_ii||

and ``coupling`` is its mean over the measured examples (``max_coupling`` the largest). Exactly 0 (autograd
gives exact zeros) when examples are independent; > 0 with batch statistics. Cost: one forward pass and
``num_examples`` vectorized backward passes over the K outputs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import check_batch, check_positive_int, model_device
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_batch_for_mode, check_mode, preserved, set_mode


@dataclasses.dataclass
class BatchDependence(ProbeResult):
    """``per_example[i]`` = mean_{j != i} ||J_ij||_F / ||J_ii||_F for the first ``num_examples`` examples."""

    mode: str
    coupling: float
    max_coupling: float
    per_example: list[float]


def _jacobian_block_norms(out: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
    """||d out[i] / d x_j||_F for every j, from one backward pass vectorized over out[i]'s K entries."""
    k = out[i].numel()
    seeds = torch.zeros((k, *out.shape), dtype=out.dtype, device=out.device)
    seeds[(torch.arange(k), i, *torch.unravel_index(torch.arange(k), out.shape[1:]))] = 1.0
    (jac,) = torch.autograd.grad(out, x, grad_outputs=seeds, retain_graph=True, is_grads_batched=True)
    return jac.transpose(0, 1).reshape(x.shape[0], -1).double().norm(dim=1)


def batch_dependence(
    model: nn.Module, x: torch.Tensor, *, mode: str = "train", num_examples: int = 4
) -> BatchDependence:
    """Cross-example Jacobian ratio of ``model`` on the batch ``x`` (N >= 2), for the first ``num_examples``
    examples (at most N)."""
    check_mode(mode)
    check_batch(x)
    check_positive_int(num_examples, "num_examples")
    check_batch_for_mode(model, x.shape[0], mode)
    if x.shape[0] < 2:
        raise NormlabError(f"batch_dependence needs a batch of at least 2 examples, got {x.shape[0]}")
    if not x.is_floating_point():
        raise NormlabError(f"batch_dependence differentiates w.r.t. x: x must be floating, got {x.dtype}")
    x = x.to(model_device(model)).detach().clone().requires_grad_(True)
    per_example = []
    with preserved(model, parameters=False):
        set_mode(model, mode)
        out = model(x)
        for i in range(min(num_examples, x.shape[0])):
            norms = _jacobian_block_norms(out, x, i)
            own = norms[i].item()
            others = torch.cat([norms[:i], norms[i + 1 :]]).mean().item()
            per_example.append(others / own if own > 0 else math.nan)
    finite = [v for v in per_example if not math.isnan(v)]
    mean = sum(finite) / len(finite) if finite else math.nan
    return BatchDependence(mode=mode, coupling=mean, max_coupling=max(finite, default=math.nan),
                           per_example=per_example)
