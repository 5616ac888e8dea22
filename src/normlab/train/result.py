"""``RunResult``: what one training run produced, as plain values (picklable, JSON-ready)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

NAN = math.nan


@dataclass
class RunResult:
    """The outcome of :func:`normlab.train.train`.

    ``status``: ``finished``, ``diverged`` (non-finite loss or loss above ``divergence_bound``; metrics are
    NaN) or ``failed`` (an exception, message in ``error``). Losses and accuracies are of the final model:
    ``train_*`` in evaluation mode on up to ``eval_train_samples`` training examples, ``test_*`` in
    evaluation mode on the test split. ``test_acc_train_mode`` is the test accuracy with batch statistics
    over consecutive batches of the training batch size, ``train_eval_gap`` = ``test_acc_train_mode -
    test_acc_eval_mode`` (:func:`normlab.probes.train_eval_gap`, on the first ``floor(N / batch) * batch``
    test examples, so ``test_acc_eval_mode`` can differ slightly from ``final_test_acc`` over all N);
    accuracies are NaN for regression tasks. ``val_*``: on the validation split held out of the training data
    (``config.val_fraction``; NaN without one).
    ``convergence`` is the run's status under normlab's convergence rules (:mod:`normlab.train.convergence`):
    ``converged``, ``unconverged``, ``stalled``, ``diverged`` or ``failed``; ``convergence_reason`` says why.
    Only ``converged`` runs are results a comparison may rank.
    ``steps_per_s`` counts optimizer steps over the time spent in the training loop (evaluation excluded).
    """

    status: str
    steps: int = 0
    final_train_loss: float = NAN
    final_train_acc: float = NAN
    final_test_loss: float = NAN
    final_test_acc: float = NAN
    final_val_loss: float = NAN
    final_val_acc: float = NAN
    test_acc_train_mode: float = NAN
    test_acc_eval_mode: float = NAN
    train_eval_gap: float = NAN
    wall_time: float = NAN
    steps_per_s: float = NAN
    convergence: str = ""
    convergence_reason: str = ""
    run_id: int | None = None
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_key: str | None = None

    def summary(self) -> dict[str, Any]:
        """The fields kept as the run's summary in the store (everything but config and run id)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("config", "run_id")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunResult:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # JSON exports write NaN as null: read it back as NaN in the float fields.
        return cls(
            **{
                k: NAN if v is None and isinstance(fields[k].default, float) else v
                for k, v in values.items()
                if k in fields
            }
        )

    @classmethod
    def from_run(cls, run: Any) -> RunResult:
        """Rebuild from a stored :class:`normlab.store.Run` (its summary, status, id and config)."""
        values = {**run.summary, "status": run.status, "run_id": run.id, "config": run.config}
        values.setdefault("error", run.error)
        values.setdefault("config_key", run.config_key)
        if "wall_time" not in run.summary and run.wall_time is not None:
            values["wall_time"] = run.wall_time
        return cls.from_dict(values)
