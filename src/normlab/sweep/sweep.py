"""``run_sweep``: train many configs, resumably, and keep going when one fails."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from normlab.errors import NormlabError
from normlab.sweep.claims import run_claimed
from normlab.sweep.executors import Executor, InlineExecutor
from normlab.sweep.worker import CallbacksFactory
from normlab.train import RunResult, TrainConfig

# A deterministic run that diverged would diverge again: both outcomes are final.
DONE_STATUSES = ("finished", "diverged")


FollowUp = Callable[[TrainConfig, RunResult], Sequence[TrainConfig]]


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
    follow_up: FollowUp | None = None,
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
        follow_up: called with ``(config, result)`` as each run completes (after ``on_result``); the
            configs it returns join the sweep at once (trained while the rest still trains, e.g. the next
            lr of a search whose cell just finished) and are followed up in turn. Their results come after
            those of ``configs``, in the order they were returned.

    A run that fails (exception) or diverges is recorded with that status and the sweep goes on.
    """
    configs = [c if isinstance(c, TrainConfig) else TrainConfig.from_dict(c) for c in configs]
    executor = InlineExecutor() if executor is None else executor
    if not isinstance(executor, Executor):
        raise NormlabError(f"executor must have submit() and results(), got {type(executor).__name__}")
    results: list[RunResult | None] = []
    positions: dict[str, list[int]] = {}
    incoming: list[TrainConfig] = []  # follow-ups to train, taken by run_claimed after each result
    done_statuses = DONE_STATUSES if skip_finished else ()

    def completed(config: TrainConfig, result: RunResult) -> None:
        if on_result is not None:
            on_result(config, result)
        if follow_up is not None:
            fresh = add(list(follow_up(config, result)))
            bar.grow(len(fresh))
            incoming.extend(fresh)

    def add(new: list[TrainConfig]) -> list[TrainConfig]:
        """Give ``new`` positions (all of them before any follow-up gets its own); complete the ones the
        store holds; return the ones to train."""
        fresh, stored = [], []
        for config in new:
            i = len(results)
            results.append(None)
            key = config.key()
            if key in positions:  # the same config twice: one run, both positions
                positions[key].append(i)
                continue
            done = store.find_completed(key, DONE_STATUSES) if store is not None and skip_finished else None
            if done is not None:
                results[i] = RunResult.from_run(done)
                stored.append((config, results[i]))
                continue
            positions[key] = [i]
            fresh.append(config)
        for config, result in stored:
            completed(config, result)
        return fresh

    submitted = []

    def submit(batch_of: list[TrainConfig]) -> None:
        # The first submission is spread over every worker; follow-ups join busy workers whole.
        _submit(batch_of, executor, store, callbacks_factory, batch, spread=not submitted)
        submitted.append(len(batch_of))

    with _RunProgress(progress) as bar:
        first = add(configs)
        first += incoming  # follow-ups of runs the store already held
        incoming.clear()
        bar.grow(len(first))
        # Claimed in the store: a config another live sweep trains is read back, not trained twice.
        claimed = run_claimed(
            first, store, executor, callbacks_factory, done_statuses=done_statuses, incoming=incoming,
            submit=submit,
        )
        for config, result in claimed:
            for i in positions.pop(config.key()):
                results[i] = result
            bar.advance(result.status)
            completed(config, result)
    return [r for r in results if r is not None]


def _submit(
    configs: list[TrainConfig],
    executor: Executor,
    store: Any,
    callbacks_factory: CallbacksFactory | None,
    batch: bool,
    spread: bool = True,
) -> None:
    """Submit each config alone, or compatible ones as stacked groups (callbacks need a model each).
    ``spread``: split groups so every worker has one (the sweep's first
    submission; follow-ups join workers that are busy and are kept whole)."""
    if not batch or callbacks_factory is not None or not hasattr(executor, "submit_group"):
        for config in configs:
            executor.submit(config, callbacks_factory, store=store)
        return
    from normlab.batched import group_configs

    workers = getattr(executor, "workers", 1) if spread else 1
    groups = group_configs(configs, min_groups=workers)
    for group in groups:
        if len(group) == 1:
            executor.submit(configs[group[0]], None, store=store)
        else:
            executor.submit_group([configs[i] for i in group], store=store)


class _RunProgress:
    """A rich bar over runs with counts of finished / diverged / failed (off when not a terminal)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = 0
        self.counts = {"finished": 0, "diverged": 0, "failed": 0}
        self._task = None

    def grow(self, runs: int) -> None:
        """``runs`` more runs to train (the bar appears with the first)."""
        self.total += runs
        if self.enabled and runs:
            if self._task is None:
                self._start()
            self._progress.update(self._task, total=self.total)

    def __enter__(self) -> _RunProgress:
        return self

    def _start(self) -> None:
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

    def advance(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.enabled and self._task is not None:
            text = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
            self._progress.update(self._task, advance=1, counts=text)

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self._task is not None:
            self._progress.__exit__(*exc)
