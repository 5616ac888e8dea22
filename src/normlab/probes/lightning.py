"""Probes in a Lightning run: :class:`ProbeCallback`, a ``lightning.pytorch.Callback`` over :class:`Watch`.

::

    from normlab.probes.lightning import ProbeCallback
    trainer = lightning.Trainer(callbacks=[ProbeCallback(probes=["ics:200", "activation_stats:20"])])

After optimizer step t, the callback runs the probes due at t on the batch step t was taken on and, for
the probes of a step (``ics``, ``landscape``), on the batch step t + 1 will take: it waits for that batch
(``on_train_batch_start``, weights still those after step t), which is what normlab's trainer hands its
probes, so the numbers are those of ``normlab train --probe`` on the same state. The last step has no next
batch: its step probes use its own batch (as :meth:`Watch.step` without ``next_batch``). Each scalar goes
to the trainer's loggers (TensorBoard, MLflow, W&B, CSV...) at the step it was measured and to
``callback.watch.history``. Needs ``pip install 'normlab[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.probes.watcher import DEFAULT_EVERY, Probes, Watch

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the message names the extra
    raise NormlabError("normlab.probes.lightning needs Lightning: pip install 'normlab[lightning]'") from None


class ProbeCallback(Callback):
    """Run normlab probes during ``lightning.Trainer.fit``.

    Args:
        loss_fn: ``loss_fn(output, y)`` on the model's output (None: cross-entropy).
        probes, every, mode: as :func:`normlab.probes.watch`.
        model: the ``nn.Module`` to probe, or a function of the LightningModule returning it (e.g.
            ``lambda m: m.net``); None: the LightningModule itself (its ``forward(x)`` gives the output).
            The optimizer is the trainer's first.

    ``watch``: the :class:`Watch` of the current fit (``watch.history``, ``watch.last``).
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        probes: Probes | None = None,
        every: int = DEFAULT_EVERY,
        mode: str = "train",
        model: nn.Module | Callable[[Any], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.loss_fn, self.probes, self.every, self.mode, self.model = loss_fn, probes, every, mode, model
        self.watch: Watch | None = None
        self._taken: tuple[torch.Tensor, torch.Tensor] | None = None  # the batch of the latest step
        self._probed = 0  # the latest step the probes saw

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.optimizers:
            raise NormlabError("ProbeCallback needs the LightningModule to configure an optimizer")
        model = self.model(pl_module) if callable(self.model) and not isinstance(self.model, nn.Module) \
            else (self.model or pl_module)

        def log(name: str, value: float, step: int) -> None:
            for logger in trainer.loggers:
                logger.log_metrics({name: value}, step=step)

        self.watch = Watch(model, trainer.optimizers[0], self.loss_fn, every=self.every, probes=self.probes,
                           mode=self.mode, log=log)
        self._taken, self._probed = None, trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps: when it moved, the step on self._taken is done and `batch` is
        # the one the next step takes.
        if self._taken is not None and trainer.global_step > self._probed:
            self._probe(trainer.global_step, next_batch=batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._taken = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) >= 2 else batch

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._taken is not None and trainer.global_step > self._probed:
            self._probe(trainer.global_step, next_batch=None)

    def _probe(self, step: int, next_batch: Any) -> None:
        self._probed = step
        self.watch.step(self._taken, next_batch, step=step)
