"""``run_sweep``: train many configs, resumably, and keep going when one fails."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from normlab.errors import NormlabError
from normlab.sweep.claims import run_claimed
from normlab.sweep.executors import Executor, InlineExecutor
from normlab.sweep.worker import CallbacksFactory
from normlab.train import RunResult, TrainConfig

# A deterministic run that diverged would diverge again: both outcomes are final.
DONE_STATUSES = ("finished", "diverged")


def run_sweep(
    configs: Iterable[TrainConfig | dict[str, Any]],
    store: Any,
    executor: Executor | None = None,
    skip_finished: bool = True,
    on_result: Callable[[TrainConfig, RunResult], None] | None = None,
    *,
    callbacks_factory: CallbacksFactory | None = None,
    progress: bool | None = None,
    batch: bool = True,
) -> list[RunResult]:
    """Train every config and return the results in the order of ``configs``.

    Args:
        configs: TrainConfigs (or their dicts).
        store: the :class:`normlab.store.Store` every run is recorded in (None: nothing recorded, nothing
            skipped).
        executor: where runs execute; default :class:`InlineExecutor` (serial, this process).
        skip_finished: a config whose key already has a ``finished`` or ``diverged`` run in the store is not
            trained again; its stored result is returned (so an interrupted sweep resumes). ``failed`` and
            ``running`` (interrupted) runs are trained again.
        on_result: called with ``(config, result)`` as each run completes (stored ones first).
        callbacks_factory: module-level ``factory(config) -> callbacks`` called where the run executes.
        progress: a progress bar over runs: True, False, or None = only when stderr is a terminal.
        batch: train configs that differ only in seed and lr as one stacked model
            (:func:`normlab.batched.group_configs`, at most ``MAX_GROUP`` per group, split so every worker
            has a group), when the executor offers ``submit_group`` and there is no ``callbacks_factory``;
            results and the store are those of runs trained one by one. False: one run at a time.

    A run that fails (exception) or diverges is recorded with that status and the sweep goes on.
    """
    configs = [c if isinstance(c, TrainConfig) else TrainConfig.from_dict(c) for c in configs]
    executor = InlineExecutor() if executor is None else executor
    if not isinstance(executor, Executor):
        raise NormlabError(f"executor must have submit() and results(), got {type(executor).__name__}")
    results: list[RunResult | None] = [None] * len(configs)
    positions: dict[str, list[int]] = {}
    todo: dict[str, TrainConfig] = {}
    for i, config in enumerate(configs):
        done = None
        if store is not None and skip_finished:
            done = store.find_completed(config.key(), DONE_STATUSES)
        if done is not None:
            results[i] = RunResult.from_run(done)
            if on_result is not None:
                on_result(config, results[i])
            continue
        key = config.key()
        todo.setdefault(key, config)
        positions.setdefault(key, []).append(i)

    with _RunProgress(len(positions), progress) as bar:
        # Claimed in the store: a config another live sweep trains is read back, not trained twice.
        done = DONE_STATUSES if skip_finished else ()
        claimed = run_claimed(
            todo.values(), store, executor, callbacks_factory, done_statuses=done,
            submit=lambda batch_of: _submit(batch_of, executor, store, callbacks_factory, batch),
        )  # fmt: skip
        for config, result in claimed:
            for i in positions.pop(config.key()):
                results[i] = result
            if on_result is not None:
                on_result(config, result)
            bar.advance(result.status)
    return [r for r in results if r is not None]


def _submit(
    configs: list[TrainConfig],
    executor: Executor,
    store: Any,
    callbacks_factory: CallbacksFactory | None,
    batch: bool,
) -> None:
    """Submit each config alone, or compatible ones as stacked groups (callbacks need a model each)."""
    if not batch or callbacks_factory is not None or not hasattr(executor, "submit_group"):
        for config in configs:
            executor.submit(config, callbacks_factory, store=store)
        return
    from normlab.batched import group_configs

    for group in group_configs(configs, min_groups=getattr(executor, "workers", 1)):
        if len(group) == 1:
            executor.submit(configs[group[0]], None, store=store)
        else:
            executor.submit_group([configs[i] for i in group], store=store)


class _RunProgress:
    """A rich bar over runs with counts of finished / diverged / failed (off when not a terminal)."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.enabled = (sys.stderr.isatty() if enabled is None else enabled) and total > 0
        self.total = total
        self.counts = {"finished": 0, "diverged": 0, "failed": 0}

    def __enter__(self) -> _RunProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("runs"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("runs", total=self.total, counts="")
        return self

    def advance(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.enabled:
            text = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
            self._progress.update(self._task, advance=1, counts=text)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.__exit__(*exc)
