"""Distributional stability of activations (Santurkar et al. 2018, arXiv 1805.11604, Fig. 1, 2 and 8).

For a fixed random sample of units (channels) of each chosen layer, the distribution of the unit's value
over the batch (and the spatial positions, which count as batch for convolutions): the percentiles
{1, 15, 50, 85, 99} (Ioffe & Szegedy plot {15, 50, 85}, Group Norm {1, 20, 80, 99}), the mean and the
variance (biased). :class:`ActivationTracker` keeps the same units across training steps and reports the
moment changes ``|mu_{t+1} - mu_t|``, ``|var_{t+1} - var_t|`` and the drift from the first measured step
``|mu_t - mu_0|``, ``|var_t - var_0|`` (each averaged over the sampled units of a layer).

Units are drawn per layer by ``torch.randperm(C)`` from a private generator seeded by ``seed`` and the
layer's position, so the same seed picks the same units on every call. Default layers: every module with
its own weight (conv/linear outputs, before the norm that follows); pass ``layers=`` (module names) to
watch e.g. the norm or activation outputs instead. Percentiles interpolate linearly between order
statistics (the default of numpy and ``torch.quantile``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._data import check_batch, check_positive_int, model_device
from normlab.probes._hooks import captured
from normlab.probes._layers import require_layers, select_modules, weight_layers
from normlab.probes._result import ProbeResult
from normlab.probes._state import check_batch_for_mode, check_mode, preserved, set_mode

PERCENTILES = (1.0, 15.0, 50.0, 85.0, 99.0)


@dataclasses.dataclass
class ActivationStats(ProbeResult):
    """Per layer: ``units`` (sampled channel indices), ``mean`` / ``var`` (one per unit) and
    ``percentiles`` (one list of ``len(percentile_levels)`` values per unit)."""

    mode: str
    percentile_levels: list[float]
    units: dict[str, list[int]]
    mean: dict[str, list[float]]
    var: dict[str, list[float]]
    percentiles: dict[str, list[list[float]]]


@dataclasses.dataclass
class ActivationTrajectory(ProbeResult):
    """Per layer, one entry per recorded step (``steps``): the mean over sampled units of the unit means /
    variances, their step-to-step changes (0 at the first step) and drift from the first step."""

    mode: str
    steps: list[int]
    mean: dict[str, list[float]]
    var: dict[str, list[float]]
    mean_change: dict[str, list[float]]
    var_change: dict[str, list[float]]
    mean_drift: dict[str, list[float]]
    var_drift: dict[str, list[float]]


def sample_units(num_channels: int, count: int, seed: int, position: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + position)
    return sorted(torch.randperm(num_channels, generator=gen)[:count].tolist())


def unit_values(t: torch.Tensor, units: list[int]) -> torch.Tensor:
    """(len(units), N * spatial): each unit's values over batch and spatial positions."""
    if t.dim() < 2:
        raise NormlabError(f"expected an activation of shape (N, C, ...), got {tuple(t.shape)}")
    return t.transpose(0, 1)[units].reshape(len(units), -1).double()


def percentiles_of(values: torch.Tensor, levels: list[float]) -> list[list[float]]:
    """(U, P) row-wise percentiles of (U, M) ``values`` with linear interpolation between order statistics
    (numpy's and ``torch.quantile``'s default). Sorted with numpy on the CPU: on small rows ``np.sort`` is
    an order of magnitude faster than ``torch.sort`` / ``torch.quantile`` on one CPU thread."""
    ordered = np.sort(values.detach().cpu().double().numpy(), axis=1)
    position = np.asarray(levels, dtype=np.float64) / 100.0 * (ordered.shape[1] - 1)
    low, high = np.floor(position).astype(np.int64), np.ceil(position).astype(np.int64)
    out = ordered[:, low] + (ordered[:, high] - ordered[:, low]) * (position - low)
    return out.tolist()


def _check_percentiles(levels: Sequence[float]) -> list[float]:
    levels = [float(p) for p in levels]
    if not levels or any(not 0.0 <= p <= 100.0 for p in levels):
        raise NormlabError(f"percentiles must be a non-empty list of values in [0, 100], got {levels!r}")
    return levels


def activation_stats(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: list[str] | None = None,
    units_per_layer: int = 8,
    percentiles: Sequence[float] = PERCENTILES,
    mode: str = "train",
    seed: int = 0,
    units: dict[str, list[int]] | None = None,
) -> ActivationStats:
    """Percentiles, mean and variance of sampled units of each chosen layer on the batch ``x`` (one forward
    pass, no gradient). ``units`` fixes the unit indices per layer (as :class:`ActivationTracker` does)."""
    check_mode(mode)
    check_batch(x)
    check_positive_int(units_per_layer, "units_per_layer")
    levels = _check_percentiles(percentiles)
    default = weight_layers(model) if layers is None else []
    if layers is None:
        require_layers(default, model, "layer with its own weight")
    chosen = select_modules(model, layers, default)
    check_batch_for_mode(model, x.shape[0], mode)
    with torch.no_grad(), preserved(model, parameters=False), captured(chosen) as out:
        set_mode(model, mode)
        model(x.to(model_device(model)))
    result = ActivationStats(mode=mode, percentile_levels=levels, units={}, mean={}, var={}, percentiles={})
    for position, (name, _) in enumerate(chosen):
        if name not in out:
            raise NormlabError(f"layer {name!r} was not called by the forward pass")
        t = out[name]
        picked = (units or {}).get(name) or sample_units(t.shape[1], units_per_layer, seed, position)
        values = unit_values(t, picked)
        result.units[name] = picked
        result.mean[name] = values.mean(dim=1).tolist()
        result.var[name] = values.var(dim=1, unbiased=False).tolist()
        result.percentiles[name] = percentiles_of(values, levels)
    return result


@dataclasses.dataclass
class ActivationSnapshot(ProbeResult):
    """The latest step of an :class:`ActivationTracker`: per layer, scalars averaged over the sampled units
    (``mean``, ``var``, their ``*_change`` since the previous recorded step and ``*_drift`` since the first)
    and the sampled units' ``percentiles`` at this step."""

    mode: str
    step: int
    mean: dict[str, float]
    var: dict[str, float]
    mean_change: dict[str, float]
    var_change: dict[str, float]
    mean_drift: dict[str, float]
    var_drift: dict[str, float]
    percentile_levels: list[float]
    percentiles: dict[str, list[list[float]]]


class ActivationTracker:
    """Accumulates :func:`activation_stats` over training steps on the same units.

    ``tracker.update(model, x, step)`` measures and stores one step; ``tracker.result()`` gives the
    :class:`ActivationTrajectory` (moment changes and drift from the first step)."""

    def __init__(
        self,
        *,
        layers: list[str] | None = None,
        units_per_layer: int = 8,
        percentiles: Sequence[float] = PERCENTILES,
        mode: str = "train",
        seed: int = 0,
    ) -> None:
        self.layers = layers
        self.units_per_layer = check_positive_int(units_per_layer, "units_per_layer")
        self.percentiles = _check_percentiles(percentiles)
        self.mode = check_mode(mode)
        self.seed = seed
        self.units: dict[str, list[int]] | None = None
        self.history: list[tuple[int, ActivationStats]] = []

    def update(self, model: nn.Module, x: torch.Tensor, step: int) -> ActivationStats:
        stats = activation_stats(
            model,
            x,
            layers=self.layers,
            units_per_layer=self.units_per_layer,
            percentiles=self.percentiles,
            mode=self.mode,
            seed=self.seed,
            units=self.units,
        )
        self.units = stats.units
        self.history.append((step, stats))
        return stats

    def result(self) -> ActivationTrajectory:
        if not self.history:
            raise NormlabError("ActivationTracker has no recorded steps; call update() first")
        names = list(self.history[0][1].units)
        mu = {n: torch.tensor([s.mean[n] for _, s in self.history], dtype=torch.float64) for n in names}
        var = {n: torch.tensor([s.var[n] for _, s in self.history], dtype=torch.float64) for n in names}

        def change(t: torch.Tensor) -> list[float]:
            return [0.0] + (t[1:] - t[:-1]).abs().mean(dim=1).tolist()

        def drift(t: torch.Tensor) -> list[float]:
            return (t - t[0]).abs().mean(dim=1).tolist()

        return ActivationTrajectory(
            mode=self.mode,
            steps=[step for step, _ in self.history],
            mean={n: mu[n].mean(dim=1).tolist() for n in names},
            var={n: var[n].mean(dim=1).tolist() for n in names},
            mean_change={n: change(mu[n]) for n in names},
            var_change={n: change(var[n]) for n in names},
            mean_drift={n: drift(mu[n]) for n in names},
            var_drift={n: drift(var[n]) for n in names},
        )

    def latest(self) -> ActivationSnapshot:
        """The last recorded step with its changes and drift (what a probe schedule logs)."""
        traj = self.result()
        step, stats = self.history[-1]

        def last(field: dict[str, list[float]]) -> dict[str, float]:
            return {name: values[-1] for name, values in field.items()}

        return ActivationSnapshot(
            mode=self.mode,
            step=step,
            mean=last(traj.mean),
            var=last(traj.var),
            mean_change=last(traj.mean_change),
            var_change=last(traj.var_change),
            mean_drift=last(traj.mean_drift),
            var_drift=last(traj.var_drift),
            percentile_levels=stats.percentile_levels,
            percentiles=stats.percentiles,
        )
