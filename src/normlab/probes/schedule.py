"""Run probes during training: which probes, every how many steps, results into the store.

A :class:`ProbeSchedule` is a callable with ``every_n_steps``, so it plugs into the trainer's one callback
point (``Trainer.add_callback(schedule, schedule.every_n_steps)``, ``train(config, callbacks=[schedule])``,
or ``schedule.attach(trainer)``). At step t it runs every probe whose interval divides t on the model, the
optimizer, the loss and a batch, and records (the probes of a step, ``ics`` and ``landscape``, use the batch
the next step will be taken on, ``ctx.next_batch()``: the step the run really takes from these weights, as
Santurkar et al. define both; the others use the batch the step was just taken on, ``ctx.batch``):

- every scalar field as the metric ``probe/<probe>/<field>`` and every per-layer value as
  ``probe/<probe>/<field>/<layer>`` (``ctx.log``);
- the whole result (curves, grids, percentiles) as a JSON artifact ``probes/<probe>/step<t>.json`` of kind
  ``json`` when the run has a store.

Probes never change the model, buffers, optimizer or RNG, so an instrumented run trains exactly like an
uninstrumented one. ``train_eval_gap`` needs class labels and is skipped on regression runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from normlab.errors import NormlabError
from normlab.probes._result import ProbeResult, json_ready
from normlab.probes._state import check_mode
from normlab.probes.activations import ActivationTracker
from normlab.probes.batch_coupling import batch_dependence
from normlab.probes.covariate_shift import ics
from normlab.probes.eval_gap import train_eval_gap
from normlab.probes.hessian_density import hessian_density
from normlab.probes.hessian_spectrum import hessian
from normlab.probes.landscape_2d import landscape_2d
from normlab.probes.loss_landscape import landscape
from normlab.probes.residual import residual_scale
from normlab.probes.signal_prop import signal_propagation
from normlab.probes.similarity import example_similarity

Runner = Callable[[Any, str, dict[str, Any], "ProbeSchedule"], ProbeResult | None]


def _activation_stats(ctx, mode, options, schedule):
    tracker = schedule._trackers.get("activation_stats")
    if tracker is None:
        tracker = schedule._trackers["activation_stats"] = ActivationTracker(mode=mode, **options)
    tracker.update(ctx.model, ctx.batch[0], ctx.step)
    return tracker.latest()


def _train_eval_gap(ctx, mode, options, schedule):
    x, y = ctx.batch
    if y.is_floating_point():
        return None  # regression: no accuracy to compare
    return train_eval_gap(ctx.model, x, y, **{"batch_size": x.shape[0], **options})


def _ics(ctx, mode, options, schedule):
    return ics(ctx.model, ctx.optimizer, ctx.next_batch(), ctx.loss_fn, mode=mode, **options)


def _landscape(ctx, mode, options, schedule):
    return landscape(ctx.model, ctx.next_batch(), ctx.loss_fn, optimizer=ctx.optimizer, mode=mode, **options)


def _hessian(ctx, mode, options, schedule):
    defaults = {"max_iter": 20, "trace_samples": 20}
    return hessian(ctx.model, ctx.batch, ctx.loss_fn, mode=mode, **{**defaults, **options})


def _hessian_density(ctx, mode, options, schedule):
    defaults = {"iterations": 20}
    return hessian_density(ctx.model, ctx.batch, ctx.loss_fn, mode=mode, **{**defaults, **options})


def _landscape_2d(ctx, mode, options, schedule):
    return landscape_2d(ctx.model, ctx.batch, ctx.loss_fn, mode=mode, **options)


def _on_input(probe):
    def run(ctx, mode, options, schedule):
        return probe(ctx.model, ctx.batch[0], mode=mode, **options)

    return run


PROBES: dict[str, Runner] = {
    "activation_stats": _activation_stats,
    "batch_dependence": _on_input(batch_dependence),
    "example_similarity": _on_input(example_similarity),
    "hessian": _hessian,
    "hessian_density": _hessian_density,
    "ics": _ics,
    "landscape": _landscape,
    "landscape_2d": _landscape_2d,
    "residual_scale": _on_input(residual_scale),
    "signal_propagation": _on_input(signal_propagation),
    "train_eval_gap": _train_eval_gap,
}

# Chosen so the instrumented run costs at most ~1.25x an uninstrumented one (benchmarks/probes.py):
# activation stats cost about one training step, the gap under one, the landscape with k = 4 about 5 and
# ICS under L + 1.
DEFAULT_PROBES: dict[str, tuple[int, dict[str, Any]]] = {
    "activation_stats": (20, {}),
    "train_eval_gap": (50, {}),
    "landscape": (100, {"num_points": 4}),
    "ics": (200, {}),
}


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    name: str
    every: int
    options: dict[str, Any]


def _spec(name: str, value: int | tuple[int, Mapping[str, Any]]) -> ProbeSpec:
    if name not in PROBES:
        raise NormlabError(f"unknown probe {name!r}; valid probes: {', '.join(sorted(PROBES))}")
    every, options = (value, {}) if not isinstance(value, tuple) else value
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise NormlabError(f"probe {name!r}: every must be a positive number of steps, got {every!r}")
    if not isinstance(options, Mapping):
        raise NormlabError(f"probe {name!r}: options must be a mapping, got {type(options).__name__}")
    return ProbeSpec(name, every, dict(options))


class ProbeSchedule:
    """Which probes to run and how often.

    Args:
        probes: ``{name: every}`` or ``{name: (every, options)}``; ``options`` are keyword arguments of the
            probe function (e.g. ``{"landscape": (100, {"num_points": 4})}``). None: :data:`DEFAULT_PROBES`.
        mode: "train" (batch statistics, default) or "eval" for every probe that has a mode.

    ``schedule.last`` holds the latest result of each probe; ``schedule.every_n_steps`` is the gcd of the
    intervals (how often the trainer must call it).
    """

    def __init__(
        self, probes: Mapping[str, int | tuple[int, Mapping[str, Any]]] | None = None, *, mode: str = "train"
    ) -> None:
        probes = DEFAULT_PROBES if probes is None else probes
        if not isinstance(probes, Mapping) or not probes:
            raise NormlabError(f"probes must be a non-empty mapping of probe name -> every, got {probes!r}")
        self.specs = [_spec(name, value) for name, value in probes.items()]
        self.mode = check_mode(mode)
        self.every_n_steps = math.gcd(*(s.every for s in self.specs))
        self.last: dict[str, ProbeResult] = {}
        self._trackers: dict[str, ActivationTracker] = {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}={s.every}" for s in self.specs)
        return f"ProbeSchedule({inner}, mode={self.mode!r})"

    def attach(self, trainer: Any) -> ProbeSchedule:
        """``trainer.add_callback(self, self.every_n_steps)``; returns self."""
        trainer.add_callback(self, self.every_n_steps)
        return self

    def __call__(self, ctx: Any) -> dict[str, ProbeResult]:
        """Run the probes due at ``ctx.step`` and record them (see the module docstring)."""
        done = {}
        for spec in self.specs:
            if ctx.step % spec.every:
                continue
            result = PROBES[spec.name](ctx, self.mode, spec.options, self)
            if result is None:
                continue
            record(ctx, spec.name, result)
            done[spec.name] = self.last[spec.name] = result
        return done


def record(ctx: Any, name: str, result: ProbeResult) -> None:
    """Log ``result``'s scalars as ``probe/<name>/...`` metrics and store it whole as a JSON artifact."""
    for key, value in result.scalars().items():
        ctx.log(f"probe/{name}/{key}", value)
    if ctx.store is not None and ctx.run_id is not None and result.arrays():
        payload = json.dumps(json_ready({"step": ctx.step, **result.to_dict()}), allow_nan=False).encode()
        ctx.store.add_artifact(ctx.run_id, f"probes/{name}/step{ctx.step:08d}.json", "json", payload)
