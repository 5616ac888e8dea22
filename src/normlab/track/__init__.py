"""Experiment trackers: normlab's runs, probes, verdicts and reports in TensorBoard, MLflow or W&B.

``normlab train|compare|study --log tensorboard --log mlflow --log wandb`` (``--log-dir``, default
``normlab-results/logs``), or from Python::

    from normlab.track import open_tracker
    tracker = open_tracker("tensorboard", "logs")      # or "mlflow", "wandb" (offline)
    train(config, trackers=[tracker]); tracker.close()

A tracker gets each run's config as hyperparameters, every metric the trainer logs at its step (training
loss, held-out metrics, the probes' ``probe/<probe>/<field>``), the final numbers and status, and for a
sweep the settings, verdict sentences and report files of the command (:meth:`Tracker.log_summary`).
The packages are optional extras: ``pip install 'normlab[tensorboard]'`` (``mlflow``, ``wandb``; all
three: ``normlab[track]``).
"""

from normlab.track.base import Tracker, hyperparameters, run_name
from normlab.track.session import SweepLog, log_stored_run, open_tracker, open_trackers, session_name

__all__ = [
    "SweepLog",
    "Tracker",
    "hyperparameters",
    "log_stored_run",
    "open_tracker",
    "open_trackers",
    "run_name",
    "session_name",
]
