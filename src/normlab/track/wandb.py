"""Weights & Biases: one W&B run per training run, offline unless ``$WANDB_MODE`` says otherwise.

Offline runs land in ``<root>/wandb/offline-run-<time>-<id>/`` (``wandb sync`` uploads them later); nothing
needs an account or a network. A sweep's runs share the W&B group named after the session, and the
session's own record is one more run of that group (``job_type="summary"``) with the command's settings as
its config, the verdicts in its summary and as ``verdicts.md``, and the report's files copied into its
``files/report/`` (what ``wandb sync`` uploads). The config is the run's config (nested dicts kept), each
step's metrics one history row at that step, the final numbers the run's summary with ``normlab_status``
and ``normlab_convergence``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.track.base import Tracker, final_numbers, report_files


class WandbTracker(Tracker):
    """Runs of W&B project ``project`` under ``root``."""

    kind = "wandb"

    def __init__(self, root: str | Path = ".", session: str | None = None, *,
                 project: str = "normlab", mode: str | None = None) -> None:
        super().__init__(session)
        self.root = Path(root)
        self.project = project
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self._run: Any = None

    def view(self) -> str:
        if self.mode != "offline":
            return f"W&B project {self.project}"
        return f"wandb sync {self.root.resolve() / 'wandb'}/offline-run-*"

    def _init(self, name: str, config: dict[str, Any], group: str | None, job_type: str) -> Any:
        import wandb

        self.root.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off")
        return wandb.init(project=self.project, name=name, group=group, job_type=job_type, config=config,
                          dir=str(self.root), mode=self.mode, settings=settings)

    def _start(self, name: str, config: dict[str, Any], group: str | None) -> None:
        self._run = self._init(name, config, self.session or group, "train")

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def _end(self, status: str, summary: dict[str, Any]) -> None:
        self._run.summary.update({**final_numbers(summary), "normlab_status": status,
                                  "normlab_convergence": str(summary.get("convergence", ""))})
        self._run.finish(exit_code=1 if status == "failed" else 0)
        self._run = None

    def log_summary(self, name: str, settings: Mapping[str, Any], verdicts: Sequence[str],
                    report: Path | None) -> None:
        run = self._init(name, dict(settings), self.session, "summary")
        text = "\n\n".join(verdicts)
        run.summary["verdicts"] = text
        files = Path(run.dir)
        (files / "verdicts.md").write_text(text + "\n", encoding="utf-8")
        copied = report_files(report)
        if copied:
            (files / "report").mkdir(exist_ok=True)
            for file in copied:
                shutil.copy2(file, files / "report" / file.name)
        for file in ["verdicts.md", *(f"report/{f.name}" for f in copied)]:
            run.save(str(files / file), base_path=str(files), policy="end")
        run.finish()
