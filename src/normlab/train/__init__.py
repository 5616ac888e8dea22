"""The training engine: ``TrainConfig`` -> :func:`train` -> :class:`RunResult` (see ``trainer.py``)."""

from normlab.train.checkpoint import load_checkpoint, save_checkpoint
from normlab.train.config import OPTIMIZERS, SCHEDULES, TrainConfig, field_names
from normlab.train.context import StepContext
from normlab.train.result import RunResult
from normlab.train.schedule import learning_rate
from normlab.train.trainer import Trainer, TrainOutput, train, train_model

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "RunResult",
    "StepContext",
    "TrainConfig",
    "TrainOutput",
    "Trainer",
    "field_names",
    "learning_rate",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "train_model",
]
