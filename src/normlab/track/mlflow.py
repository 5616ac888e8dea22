"""MLflow: one MLflow run per training run, through ``MlflowClient`` (no global active run).

Where: ``tracking_uri`` when given, else ``$MLFLOW_TRACKING_URI``, else a local store in ``root``:
``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` (``mlflow ui --backend-store-uri
sqlite:///<root>/mlflow.db`` shows it). NOTE: the plain-folder store (``./mlruns``) is in maintenance mode
since MLflow 3 and refuses to open unless ``MLFLOW_ALLOW_FILE_STORE=true``; the SQLite file is the local
store MLflow recommends, and a ``file:`` URI still works where that variable is set.

A sweep's runs are nested under a parent run named after the session (tag ``mlflow.parentRunId``), which
gets the command's settings as params, the verdicts as ``verdicts.md`` and the report's files under
``report/``. The config goes in as params (flattened, ``norm_options.groups``), metrics keep the store's
names, the final numbers are metrics ``final/<name>`` at the run's last step, and normlab's status and
convergence are the tags ``normlab.status`` and ``normlab.convergence`` (a diverged run is FINISHED in
MLflow: it trained to its outcome; a failed one is FAILED).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.track.base import Tracker, final_numbers, hyperparameters, report_files

_BATCH = 1000  # MLflow's log_batch limit on metrics (and on entities) per call
_PARAMS_PER_BATCH = 100
_MAX_KEY, _MAX_VALUE = 250, 6000


class MlflowTracker(Tracker):
    """Runs in experiment ``experiment`` of the store at ``tracking_uri`` (see the module docstring)."""

    kind = "mlflow"

    def __init__(self, root: str | Path = "mlflow", session: str | None = None, *,
                 tracking_uri: str | None = None, experiment: str = "normlab") -> None:
        super().__init__(session)
        from mlflow.tracking import MlflowClient

        root = Path(root)
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if uri is None:
            root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
            # Without it, a new experiment's artifacts would go to ./mlruns of the working directory.
            artifacts = (root / "mlartifacts").resolve().as_uri()
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (found.experiment_id if found is not None
                              else self.client.create_experiment(experiment, artifact_location=artifacts))
        self._parent: str | None = None
        self._run: str | None = None
        self._metrics: list[Any] = []
        self._summarized = False

    def view(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def _parent_id(self) -> str | None:
        if self.session is not None and self._parent is None:
            run = self.client.create_run(self.experiment_id, run_name=self.session,
                                         tags={"normlab.session": self.session})
            self._parent = run.info.run_id
        return self._parent

    def _start(self, name: str, config: dict[str, Any], group: str | None) -> None:
        tags = {"normlab.group": group or ""}
        parent = self._parent_id()
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        self._run = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self._params(self._run, hyperparameters(config))

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._metrics += [Metric(_key(name), value, stamp, step) for name, value in metrics.items()]
        if len(self._metrics) >= _BATCH:
            self._send()

    def _send(self) -> None:
        while self._metrics:
            chunk, self._metrics = self._metrics[:_BATCH], self._metrics[_BATCH:]
            self.client.log_batch(self._run, metrics=chunk)

    def _end(self, status: str, summary: dict[str, Any]) -> None:
        self._write(self.last_step, {f"final/{k}": v for k, v in final_numbers(summary).items()})
        self._send()
        self.client.set_tag(self._run, "normlab.status", status)
        self.client.set_tag(self._run, "normlab.convergence", str(summary.get("convergence", "")))
        self.client.set_terminated(self._run, "FAILED" if status == "failed" else "FINISHED")
        self._run = None

    def log_summary(self, name: str, settings: Mapping[str, Any], verdicts: Sequence[str],
                    report: Path | None) -> None:
        run = self._parent_id()
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=name).info.run_id
        self._params(run, hyperparameters(settings))
        self.client.log_text(run, "\n\n".join(verdicts) + "\n", "verdicts.md")
        for file in report_files(report):
            self.client.log_artifact(run, str(file), "report")
        self.client.set_terminated(run, "FINISHED")
        self._summarized = True

    def begin_session(self, name: str | None) -> None:
        super().begin_session(name)
        self._parent, self._summarized = None, False

    def close(self) -> None:
        super().close()
        if self._parent is not None and not self._summarized:  # the sweep stopped before its summary
            self.client.set_terminated(self._parent, "KILLED")
            self._summarized = True

    def _params(self, run: str, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(_key(k), str(v)[:_MAX_VALUE]) for k, v in values.items()]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            self.client.log_batch(run, params=params[i : i + _PARAMS_PER_BATCH])


def _key(name: str) -> str:
    """``name`` in MLflow's key alphabet (letters, digits, ``_ - . / : `` and space), at most 250 long."""
    return re.sub(r"[^\w\-./: ]", "_", name)[:_MAX_KEY]
