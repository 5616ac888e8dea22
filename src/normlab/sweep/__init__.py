"""Sweeps: many training runs through an :class:`Executor`, recorded in the store, resumable
(:func:`run_sweep`)."""

from normlab.sweep.compare import CompareCell, LrOutcome, compare_configs, scaled_lr, summarize_compare
from normlab.sweep.executors import Executor, InlineExecutor, LocalPoolExecutor, available_cores
from normlab.sweep.sweep import DONE_STATUSES, run_sweep
from normlab.sweep.worker import run_config

__all__ = [
    "DONE_STATUSES",
    "CompareCell",
    "LrOutcome",
    "compare_configs",
    "scaled_lr",
    "summarize_compare",
    "Executor",
    "InlineExecutor",
    "LocalPoolExecutor",
    "available_cores",
    "run_config",
    "run_sweep",
]
