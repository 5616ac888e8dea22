"""What a callback sees: :class:`StepContext`, and how ``callbacks=`` items become ``(fn, every)`` pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normlab.errors import NormlabError


@dataclass
class StepContext:
    """Handed to every callback after the optimizer step ``step`` (1-based count of updates done).

    ``batch`` is the ``(x, y)`` the step was taken on; ``next_batch()`` the ``(x, y)`` the next step will be
    taken on, without advancing the data (a probe of *a step* -- Santurkar et al.'s ICS and loss landscape
    -- measures at the current weights on this one: the batch and the update the run will really take, not a
    second step on the batch just used). ``log(name, value)`` records a scalar metric at this step (into the
    store when there is one, and into ``Trainer.history``). Callbacks may read anything; probes must not
    change model, optimizer or RNG state (normlab.probes guarantees it).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    step: int
    batch: tuple[torch.Tensor, torch.Tensor]
    config: Any
    log: Callable[[str, float], None]
    store: Any
    run_id: int | None
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    # Whether this is the run's last step (its budget ends here): an auto budget's end is known only once
    # its cooldown has started, so a callback "at the end" of a run checks this instead of a step count.
    last: bool = False


Callback = Callable[[StepContext], Any]


def normalize_callbacks(callbacks: Iterable[Any]) -> list[tuple[Callback, int]]:
    """Each item is ``fn``, ``(fn, every_n_steps)``, or an object with ``every_n_steps`` that is callable
    (e.g. a probe schedule); a bare function runs every step."""
    pairs = []
    for item in callbacks:
        if isinstance(item, tuple) and len(item) == 2:
            fn, every = item
        else:
            fn, every = item, getattr(item, "every_n_steps", 1)
        if not callable(fn):
            raise NormlabError(f"callback {fn!r} is not callable")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise NormlabError(f"every_n_steps of callback {fn!r} must be a positive int, got {every!r}")
        pairs.append((fn, every))
    return pairs
