"""A rich progress bar for a run (steps, steps/s, last loss), or nothing when it would only be noise."""

from __future__ import annotations

import sys
from typing import Any


class StepProgress:
    """``with StepProgress(total, enabled, label) as bar: bar.update(step, loss)``.

    Disabled (every call a no-op) when ``enabled`` is False, or when None and stderr is not a terminal
    (pipes, CI logs, process-pool workers).
    """

    def __init__(self, total: int, enabled: bool | None, label: str = "train") -> None:
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.label = label
        self._progress: Any = None

    def __enter__(self) -> StepProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} steps/s"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, rate="-", loss="-")
        return self

    def update(self, step: int, loss: float, steps_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{loss:.4g}", rate=f"{steps_per_s:.1f}"
            )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
