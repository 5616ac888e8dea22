"""Signal propagation plots (Brock, De & Smith 2021a, arXiv 2101.08692, Sec. 3; science.md section 3).

On a batch (by default unit Gaussian input, as the paper and timm's ``extract_spp_stats``), at the stem output
and every residual block output, with x of shape (N, C, *spatial)::

    avg_sq_mean = mean_C( mean_{N,spatial}(x)^2 )     (the mean shift)
    avg_var     = mean_C( var_{N,spatial}(x) )

and at the end of every residual branch (``block.branch`` output: after its last conv, before any skip
gain, SkipInit scalar or alpha) ``res_avg_var = mean_C(var_{N,spatial}(branch))``.

Variance: biased (``jnp.var``, the DeepMind nfnets code) by default; timm's hooks use ``torch.var``
(unbiased): pass ``unbiased=True`` to reproduce timm's numbers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from normlab.probes._blocks import graph_first
from normlab.probes._hooks import captured, channel_moments, probe_input, residual_points
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_batch_for_mode, check_mode, preserved, set_mode


@dataclasses.dataclass
class SignalPropagation(ProbeResult):
    """``avg_sq_mean`` / ``avg_var``: "stem" then each block (forward order); ``res_avg_var``: each block."""

    mode: str
    input: str
    avg_sq_mean: dict[str, float]
    avg_var: dict[str, float]
    res_avg_var: dict[str, float]


def spp_stats(t: torch.Tensor, *, unbiased: bool = False) -> tuple[float, float]:
    """``(avg_sq_mean, avg_var)`` of one activation (N, C, *spatial)."""
    mean, var = channel_moments(t, unbiased=unbiased)
    return mean.pow(2).mean().item(), var.mean().item()


def signal_propagation(
    model: nn.Module,
    x: torch.Tensor | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 8,
    mode: str = "train",
    unbiased: bool = False,
    seed: int = 0,
    blocks: list[str] | None = None,
) -> SignalPropagation:
    """SPP statistics of a residual ``model`` on ``x`` or on N(0, 1) input of ``input_shape`` (one forward
    pass, no gradient). Blocks come from ``model.blocks()`` (normlab.models.blocks), torchvision/timm
    ResNet blocks or names, the module names in ``blocks``, or else the residual joins of the model's
    traced graph (:mod:`normlab.probes._blocks`), so any block names and ``nn.Sequential`` models work; a
    model without residual joins is measured at every activation output (``res_avg_var`` empty)."""
    check_mode(mode)
    points = graph_first(model, blocks)
    if points is not None:
        return _from_graph(points, model, x, input_shape, batch_size, mode, unbiased, seed)
    stem, blocks = residual_points(model, blocks)
    x, source = probe_input(model, x, input_shape, batch_size, seed)
    check_batch_for_mode(model, x.shape[0], mode)
    points = [stem] + [(n, b) for n, b, _ in blocks] + [(f"{n}/branch", end) for n, _, end in blocks]
    with torch.no_grad(), preserved(model, parameters=False), captured(points) as out:
        set_mode(model, mode)
        model(x)
    result = SignalPropagation(mode=mode, input=source, avg_sq_mean={}, avg_var={}, res_avg_var={})
    for name, _ in [stem] + [(n, b) for n, b, _ in blocks]:
        result.avg_sq_mean[name], result.avg_var[name] = spp_stats(out[name], unbiased=unbiased)
    for name, _, _ in blocks:
        result.res_avg_var[name] = spp_stats(out[f"{name}/branch"], unbiased=unbiased)[1]
    return result


def _from_graph(points, model, x, input_shape, batch_size, mode, unbiased, seed) -> SignalPropagation:
    x, source = probe_input(model, x, input_shape, batch_size, seed)
    check_batch_for_mode(model, x.shape[0], mode)
    with torch.no_grad(), preserved(model, parameters=False):
        set_mode(model, mode)
        values = points.capture(x)
    result = SignalPropagation(mode=mode, input=source, avg_sq_mean={}, avg_var={}, res_avg_var={})
    for name, value in [*values.get("stem", {}).items(), *values["output"].items()]:
        result.avg_sq_mean[name], result.avg_var[name] = spp_stats(value, unbiased=unbiased)
    for name, value in values["branch"].items():
        result.res_avg_var[name] = spp_stats(value, unbiased=unbiased)[1]
    return result
