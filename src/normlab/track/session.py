"""Trackers for a command: open them by name, send a stored run, and a sweep's runs and summary.

``train`` sends its run live (the trainer calls the trackers where it logs). A sweep (``compare``,
``study``) trains in worker processes, so its runs are sent from the store as each one completes
(``on_result``, in the driver: one writer per destination, whichever executor trained the run), runs
the store already held included: ``--log`` on a finished compare sends it all without training again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.track.base import PACKAGES, Tracker, require, run_name


def open_tracker(kind: str, root: str | Path, session: str | None = None) -> Tracker:
    """The tracker ``kind`` (tensorboard, mlflow, wandb) writing under ``root``: TensorBoard events in
    ``<root>/tensorboard``, MLflow's local store in ``<root>/mlflow`` (unless ``$MLFLOW_TRACKING_URI``),
    W&B offline runs in ``<root>/wandb``. NormlabError naming the extra when its package is missing."""
    require(kind)
    root = Path(root)
    if kind == "tensorboard":
        from normlab.track.tensorboard import TensorBoardTracker

        return TensorBoardTracker(root / "tensorboard", session)
    if kind == "mlflow":
        from normlab.track.mlflow import MlflowTracker

        return MlflowTracker(root / "mlflow", session)
    from normlab.track.wandb import WandbTracker

    return WandbTracker(root, session)


def open_trackers(kinds: Sequence[str], root: str | Path, session: str | None = None) -> list[Tracker]:
    """:func:`open_tracker` for each distinct kind; every package is checked before any is opened."""
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in PACKAGES]
    if unknown:
        raise NormlabError(f"--log {unknown[0]!r} is not a tracker; valid: {', '.join(PACKAGES)}")
    for kind in kinds:
        require(kind)
    return [open_tracker(kind, root, session) for kind in kinds]


def session_name(*parts: str) -> str:
    """``<parts>-<UTC time>``: one invocation of a command, e.g. ``compare-cnn-mnist1d-20261208-034911``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return run_name({"name": "-".join([*parts, stamp])})


def log_stored_run(trackers: Iterable[Tracker], store: Any, run_id: int) -> None:
    """Send run ``run_id`` of ``store`` (config, every metric by step, status and summary) to each tracker."""
    trackers = list(trackers)
    if not trackers:
        return
    run = store.get_run(run_id)
    rows = sorted(store.metric_rows([run_id]), key=lambda row: row[1])  # by step (stable: names in order)
    for tracker in trackers:
        tracker.start_run(run_name(run.config, run.id), run.config, group=run.group)
        for _, step, name, value in rows:
            tracker.log_metric(step, name, value)
        tracker.end_run(run.status, run.summary)


class SweepLog:
    """A sweep's trackers, its runs grouped under ``session``: ``on_result`` for
    :func:`normlab.sweep.run_sweep` (each stored run sent once, however often the sweep reports it), then
    :meth:`summary` with the sweep's settings, verdicts and report."""

    def __init__(self, trackers: Sequence[Tracker], store: Any, session: str) -> None:
        self.trackers = list(trackers)
        self.store = store
        self._sent: set[int] = set()
        for tracker in self.trackers:
            tracker.begin_session(session)

    def on_result(self, config: Any, result: Any) -> None:
        if result.run_id is not None and result.run_id not in self._sent:
            self._sent.add(result.run_id)
            log_stored_run(self.trackers, self.store, result.run_id)

    def summary(self, name: str, settings: Mapping[str, Any], verdicts: Sequence[str],
                report: Path | None) -> None:
        for tracker in self.trackers:
            tracker.log_summary(name, settings, verdicts, report)
