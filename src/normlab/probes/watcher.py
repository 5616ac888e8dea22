"""Probes in your own training loop: :func:`watch` runs a :class:`ProbeSchedule` from a plain PyTorch loop.

::

    watch = normlab.probes.watch(model, optimizer, loss_fn, every=100, probes=["ics", "activation_stats"])
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        watch.step((x, y))                         # after each optimizer step
    watch.history["probe/ics/cos/features.0"]      # [(step, value), ...]

``watch.step(batch, next_batch=None)`` counts the optimizer step and, when a probe is due, hands the
schedule what normlab's trainer hands it (``StepContext``): the model, optimizer, loss, step, the batch the
step was taken on and ``next_batch``, so the numbers are those of ``normlab train --probe`` on the same
state. The probes of *a step* (``ics``, ``landscape``: Santurkar et al. measure the step the run really
takes next) use ``next_batch``: pass the batch your next step will use when you have it (the Lightning
callback does); without it they use ``batch`` again, which measures a second step on the batch just
trained on (its gradient is smaller there than on a fresh batch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes._result import ProbeResult
from normlab.probes.schedule import DEFAULT_PROBES, ProbeSchedule

DEFAULT_EVERY = 100

Probes = Sequence[str] | Mapping[str, Any]


def probe_intervals(probes: Probes | None, every: int = DEFAULT_EVERY) -> dict[str, Any]:
    """``{name: every}`` for :class:`ProbeSchedule` from names (each every ``every`` steps),
    ``"NAME:EVERY"`` strings (as ``normlab train --probe``) or a mapping (kept); None: the defaults."""
    if probes is None:
        return dict(DEFAULT_PROBES)
    if isinstance(probes, Mapping):
        return dict(probes)
    if isinstance(probes, str) or not isinstance(probes, Sequence):
        raise NormlabError(f"probes must be a list of probe names or a mapping name -> every, got {probes!r}")
    out: dict[str, Any] = {}
    for item in probes:
        name, _, interval = str(item).partition(":")
        if not interval:
            out[name.strip()] = every
            continue
        try:
            out[name.strip()] = int(interval)
        except ValueError:
            raise NormlabError(
                f"probe {item!r}: the interval after ':' must be a whole number of steps, e.g. ics:100"
            ) from None
    return out


@dataclass
class ProbeContext:
    """What a probe schedule reads at a step: the fields of the trainer's ``StepContext`` it uses."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    step: int
    batch: tuple[torch.Tensor, torch.Tensor]
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    log: Callable[[str, float], None]
    store: Any = None
    run_id: int | None = None


class Watch:
    """Probes of a model trained by your own loop; see the module docstring and :func:`watch`.

    Attributes:
        schedule: the :class:`ProbeSchedule` that runs them (``schedule.last``: each probe's latest result).
        history: metric name -> ``[(step, value), ...]`` of every scalar the probes logged.
        steps: optimizer steps counted so far.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        every: int = DEFAULT_EVERY,
        probes: Probes | None = None,
        mode: str = "train",
        log: Callable[[str, float, int], None] | None = None,
        store: Any = None,
        run_id: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise NormlabError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.schedule = ProbeSchedule(probe_intervals(probes, every), mode=mode)
        needs_optimizer = [s.name for s in self.schedule.specs if s.name in ("ics", "landscape")]
        if needs_optimizer and optimizer is None:
            raise NormlabError(f"probe {needs_optimizer[0]} measures an optimizer step: pass the optimizer")
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.steps = 0
        self._log, self.store, self.run_id = log, store, run_id

    @property
    def last(self) -> dict[str, ProbeResult]:
        """The latest result of each probe."""
        return self.schedule.last

    def step(
        self,
        batch: Sequence[torch.Tensor],
        next_batch: Sequence[torch.Tensor] | None = None,
        *,
        step: int | None = None,
    ) -> dict[str, ProbeResult]:
        """After an optimizer step: count it (or set the count to ``step``) and run the probes due now on
        ``batch`` (the step's ``(x, y)``) and ``next_batch``; returns ``{probe: result}`` of those run."""
        self.steps = self.steps + 1 if step is None else int(step)
        if self.steps % self.schedule.every_n_steps:
            return {}
        current = _pair(batch, "batch")
        upcoming = _pair(next_batch, "next_batch") if next_batch is not None else current
        ctx = ProbeContext(
            model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn, step=self.steps,
            batch=current, next_batch=lambda: upcoming, log=self._record, store=self.store,
            run_id=self.run_id,
        )  # fmt: skip
        return self.schedule(ctx)

    def _record(self, name: str, value: float) -> None:
        self.history[name].append((self.steps, float(value)))
        if self._log is not None:
            self._log(name, float(value), self.steps)


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    every: int = DEFAULT_EVERY,
    probes: Probes | None = None,
    mode: str = "train",
    log: Callable[[str, float, int], None] | None = None,
) -> Watch:
    """A :class:`Watch` over ``model`` trained by your loop: call ``.step(batch)`` after each optimizer step.

    Args:
        loss_fn: ``loss_fn(output, y)`` (None: cross-entropy, the probes' default).
        every: the interval of the probes named without one.
        probes: names (``["ics", "landscape:500"]``: ``NAME[:EVERY]``) or ``{name: every}`` /
            ``{name: (every, options)}`` as :class:`ProbeSchedule`; None: :data:`DEFAULT_PROBES`.
        mode: ``"train"`` (batch statistics) or ``"eval"`` for every probe that has a mode.
        log: ``log(name, value, step)`` for each scalar, e.g. a TensorBoard ``writer.add_scalar``; the
            values are also kept in ``watch.history``.
    """
    return Watch(model, optimizer, loss_fn, every=every, probes=probes, mode=mode, log=log)


def _pair(batch: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(
        isinstance(t, torch.Tensor) for t in batch[:2]
    ):
        return batch[0], batch[1]
    raise NormlabError(f"{what} must be (x, y) tensors, got {type(batch).__name__}")
