"""TensorBoard: one event folder per run, written by ``torch.utils.tensorboard.SummaryWriter``.

Layout under ``root``: ``<session>/<run>/`` for a sweep's runs, ``<run>/`` for a lone run, and
``<session>/summary/`` for the session's own record. Metrics are scalars named as in the store
(``train/loss``, ``val/acc``, ``probe/ics/cos/<layer>``); the config and the final numbers go to the
HParams dashboard (``hparams`` summaries in the run's own folder, so the run's scalars and its
hyperparameters are one session there), the config also as JSON text. A session's verdicts are a text
summary and its report's files are copied into ``<session>/summary/report/`` (TensorBoard has no artifact
store; the folder travels with the logs).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.track.base import Tracker, final_numbers, hyperparameters, report_files


class TensorBoardTracker(Tracker):
    """Event files under ``root`` (``tensorboard --logdir ROOT`` shows them)."""

    kind = "tensorboard"

    def __init__(self, root: str | Path, session: str | None = None) -> None:
        super().__init__(session)
        self.root = Path(root)
        self._writer: Any = None
        self._config: dict[str, Any] = {}

    def view(self) -> str:
        return f"tensorboard --logdir {self.root.resolve()}"

    def _folder(self, name: str) -> Path:
        return self.root / self.session / name if self.session else self.root / name

    def _start(self, name: str, config: dict[str, Any], group: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self._folder(name)))
        self._config = config
        self._writer.add_text("config", _code(json.dumps(config, indent=1, default=str)), 0)

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def _end(self, status: str, summary: dict[str, Any]) -> None:
        numbers = {f"final/{key}": value for key, value in final_numbers(summary).items()}
        outcome = {"status": status, "convergence": str(summary.get("convergence", ""))}
        _hparams(self._writer, {**hyperparameters(self._config), **outcome}, numbers, self.last_step)
        self._writer.close()
        self._writer = None

    def log_summary(self, name: str, settings: Mapping[str, Any], verdicts: Sequence[str],
                    report: Path | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self._folder("summary")
        with SummaryWriter(log_dir=str(folder)) as writer:
            writer.add_text("verdicts", "\n\n".join(verdicts) or "(no verdicts)", 0)
            writer.add_text("settings", _code(json.dumps(dict(settings), indent=1, default=str)), 0)
        files = report_files(report)
        if files:
            (folder / "report").mkdir(parents=True, exist_ok=True)
            for file in files:
                shutil.copy2(file, folder / "report" / file.name)


def _hparams(writer: Any, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    """Write the three HParams summaries into ``writer``'s own folder (``SummaryWriter.add_hparams`` would
    open a sub-folder, splitting the run's hyperparameters from its scalars)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    for summary in hparams_summaries(hparams, metrics):
        writer.file_writer.add_summary(summary)
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)


def _code(text: str) -> str:
    # TensorBoard renders text as Markdown: an indented block keeps JSON as it is.
    return "\n".join("    " + line for line in text.splitlines())
