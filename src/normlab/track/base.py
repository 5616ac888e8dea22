"""What every tracker does: :class:`Tracker`, the names and values it sends, and the missing-package check.

A tracker is one destination (TensorBoard, MLflow, W&B) that receives, for each training run,
``start_run`` (name, group and the config as hyperparameters), ``log_metric(step, name, value)`` for every
metric the trainer logs (training loss, held-out metrics, ``probe/<probe>/<field>``), and ``end_run`` with the
run's status and final numbers; then, for a sweep (``compare``, ``study``), ``log_summary`` with the
command's settings, its verdict sentences and its report folder. Runs of a sweep belong to a *session*
(the command's invocation): a TensorBoard folder, an MLflow parent run, a W&B group.

Metrics of one step arrive one by one (``Trainer.log``); :class:`Tracker` collects them and hands each step
whole to its backend (``_write``), as trackers want (one W&B history row, one TensorBoard step).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.store.export import flatten

#: tracker name -> (the package it needs, the normlab extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}  # fmt: skip


def require(kind: str) -> None:
    """NormlabError (one line naming the extra to install) when ``kind``'s package is not installed."""
    if kind not in PACKAGES:
        raise NormlabError(f"unknown tracker {kind!r}; valid trackers: {', '.join(PACKAGES)}")
    package, extra = PACKAGES[kind]
    if importlib.util.find_spec(package) is None:
        raise NormlabError(f"--log {kind} needs the {package} package: pip install 'normlab[{extra}]'")


def hyperparameters(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """``config`` flat (``{"norm_options": {"groups": 8}}`` -> ``norm_options.groups``), every value a
    bool, int, float or str (None -> ``"None"``, lists as JSON): what TensorBoard's HParams, MLflow params
    and a W&B config all accept."""
    flat = flatten("", config)
    return {key: value if isinstance(value, (bool, int, float, str)) else _text(value)
            for key, value in flat.items()}  # fmt: skip


def final_numbers(summary: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a run's summary (final losses and accuracies, steps, wall time)."""
    return {key: float(value) for key, value in summary.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def run_name(config: Mapping[str, Any], run_id: int | None = None) -> str:
    """``run<id>-<name>``, or ``run<id>-<model>-<norm>-bs<batch>-lr<lr>-seed<seed>`` for an unnamed run,
    with everything but letters, digits, ``.``, ``_`` and ``-`` written as ``_`` (it names a folder)."""
    if config.get("name"):
        base = str(config["name"])
    else:
        model = config.get("model")
        model = model if isinstance(model, str) else getattr(model, "__name__", "model")
        base = (f"{model}-{config.get('norm')}-bs{config.get('batch_size')}-lr{config.get('lr'):g}"
                f"-seed{config.get('seed')}") if isinstance(config.get("lr"), (int, float)) else model
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("_") or "run"
    return f"run{run_id}-{base}" if run_id is not None else base


def _text(value: Any) -> str:
    if value is None:
        return "None"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class Tracker:
    """One tracking destination; subclasses implement ``_start``, ``_write``, ``_end``, ``log_summary``.

    One run is open at a time (a sweep's runs are sent one after the other). ``session``: the name under
    which a sweep's runs are grouped (None: a lone run).
    """

    kind = ""

    def __init__(self, session: str | None = None) -> None:
        self.session = session
        self._step: int | None = None
        self._row: dict[str, float] = {}
        self._open = False
        self.last_step = 0  # the open run's latest step (where its final numbers are logged)

    def begin_session(self, name: str | None) -> None:
        """Group the runs that follow under session ``name`` (an open run ends as ``failed``)."""
        self.close()
        self.session = name

    def start_run(self, name: str, config: Mapping[str, Any], *, group: str | None = None) -> None:
        """Open run ``name`` with ``config`` as its hyperparameters."""
        if self._open:
            self.end_run("failed", {})
        self._start(name, dict(config), group)
        self._open, self.last_step = True, 0

    def log_metric(self, step: int, name: str, value: float) -> None:
        """Record ``name`` = ``value`` at ``step``; the step is sent whole when a later one begins."""
        if not self._open:
            return
        if self._step is not None and step != self._step:
            self._flush()
        self._step, self.last_step = step, max(self.last_step, step)
        self._row[name] = float(value)

    def end_run(self, status: str, summary: Mapping[str, Any]) -> None:
        """Close the open run with ``status`` and its final numbers (``summary``)."""
        if not self._open:
            return
        self._flush()
        self._open = False
        self._end(status, dict(summary))

    def log_summary(self, name: str, settings: Mapping[str, Any], verdicts: Sequence[str],
                    report: Path | None) -> None:
        """The session's own record: ``settings`` as hyperparameters, ``verdicts`` as text, the files of
        the ``report`` folder as artifacts."""
        raise NotImplementedError

    def view(self) -> str:
        """The command that shows what this tracker wrote."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the destination (an open run ends as ``failed``)."""
        if self._open:
            self.end_run("failed", {})

    def _flush(self) -> None:
        if self._row:
            self._write(self._step, self._row)
        self._step, self._row = None, {}

    def _start(self, name: str, config: dict[str, Any], group: str | None) -> None:
        raise NotImplementedError

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def _end(self, status: str, summary: dict[str, Any]) -> None:
        raise NotImplementedError

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


REPORT_SUFFIXES = (".html", ".md", ".png", ".svg", ".json")


def report_files(report: Path | None) -> list[Path]:
    """The report's files in folder ``report`` (report.html and .md, figures, outcome.json; not a results
    store kept beside them), sorted; [] for None."""
    if report is None or not Path(report).is_dir():
        return []
    return sorted(p for p in Path(report).iterdir()
                  if p.suffix in REPORT_SUFFIXES and p.is_file() and not p.is_symlink())
