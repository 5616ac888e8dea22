"""Where sweep runs execute: the :class:`Executor` protocol, :class:`InlineExecutor` (serial, this
process) and :class:`LocalPoolExecutor` (a process pool over this machine's cores).

An executor takes configs with :meth:`submit` and yields ``(config, RunResult)`` pairs from
:meth:`results` as runs complete. Runs are written to the store by the process that trains them (the
store is safe for concurrent writers), so the executor only carries configs and results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, Protocol, runtime_checkable

from normlab.errors import NormlabError
from normlab.sweep.worker import CallbacksFactory, failed_result, init_worker, run_config, run_group
from normlab.train import RunResult, TrainConfig
from normlab.train.threads import available_cores, fit_threads


@runtime_checkable
class Executor(Protocol):
    """Runs configs. ``submit`` returns a handle; ``results`` yields ``(config, result)`` as they finish."""

    def submit(
        self, config: TrainConfig, callbacks_factory: CallbacksFactory | None = None, *, store: Any = None
    ) -> Any: ...

    def results(self) -> Iterator[tuple[TrainConfig, RunResult]]: ...


__all__ = ["Executor", "InlineExecutor", "LocalPoolExecutor", "available_cores"]


def _store_path(store: Any) -> str | None:
    return None if store is None else str(store.path)


class InlineExecutor:
    """Runs each submitted config in this process, one after another, when :meth:`results` is iterated."""

    workers = 1

    def __init__(self) -> None:
        self._queue: list[tuple[list[TrainConfig], CallbacksFactory | None, str | None]] = []

    def submit(
        self, config: TrainConfig, callbacks_factory: CallbacksFactory | None = None, *, store: Any = None
    ) -> int:
        self._queue.append(([config], callbacks_factory, _store_path(store)))
        return len(self._queue) - 1

    def submit_group(self, configs: list[TrainConfig], *, store: Any = None) -> int:
        """Queue compatible configs to train as one stacked model (:func:`normlab.batched.train_batched`)."""
        self._queue.append((list(configs), None, _store_path(store)))
        return len(self._queue) - 1

    def results(self) -> Iterator[tuple[TrainConfig, RunResult]]:
        while self._queue:
            configs, factory, path = self._queue.pop(0)
            if len(configs) == 1:
                yield configs[0], run_config(configs[0].to_dict(), path, factory)
            else:
                yield from zip(configs, run_group([c.to_dict() for c in configs], path), strict=True)

    as_completed = results

    def shutdown(self) -> None:
        self._queue.clear()


class LocalPoolExecutor:
    """A ``concurrent.futures`` process pool: ``workers`` processes (default: all usable cores, and never
    more) with ``threads_per_worker`` torch threads each (default: ``cores // workers``, so workers x
    threads never exceed the cores; :func:`normlab.train.threads.fit_threads`).

    Workers are started with ``spawn``: forking a process whose OpenMP pool already ran can deadlock.
    ``callbacks_factory`` must be a module-level function (it is pickled to the worker).
    """

    def __init__(self, workers: int | None = None, threads_per_worker: int | None = None) -> None:
        workers = available_cores() if workers is None else workers
        for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker or 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NormlabError(f"{name} must be a positive int, got {value!r}")
        # More processes than cores only time-slice: they finish no sooner and oversubscribe the cores.
        self.workers = min(workers, available_cores())
        self.threads_per_worker = fit_threads(self.workers, threads_per_worker)
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, tuple[list[TrainConfig], str | None]] = {}

    def submit(
        self, config: TrainConfig, callbacks_factory: CallbacksFactory | None = None, *, store: Any = None
    ) -> Future:
        path = _store_path(store)
        future = self._started().submit(run_config, config.to_dict(), path, callbacks_factory)
        self._futures[future] = ([config], path)
        return future

    def submit_group(self, configs: list[TrainConfig], *, store: Any = None) -> Future:
        """Train compatible configs as one stacked model in one worker (``normlab.batched.train_batched``)."""
        path = _store_path(store)
        future = self._started().submit(run_group, [c.to_dict() for c in configs], path)
        self._futures[future] = (list(configs), path)
        return future

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=_init_pool_worker,
                initargs=(self.threads_per_worker, os.getpid()),
            )
        return self._pool

    def results(self) -> Iterator[tuple[TrainConfig, RunResult]]:
        """``(config, result)`` as runs complete, until none is pending: configs submitted while this is
        being iterated (a sweep's follow-ups) are waited for too."""
        try:
            while self._futures:
                done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
                for future in done:
                    configs, path = self._futures.pop(future)
                    try:
                        outcome = future.result()
                        results = outcome if isinstance(outcome, list) else [outcome]
                    except Exception as exc:  # the worker died (e.g. killed for memory): its runs failed
                        results = [_worker_died(c, path, f"{type(exc).__name__}: {exc}") for c in configs]
                    yield from zip(configs, results, strict=True)
        finally:
            for future in self._futures:
                future.cancel()
            self._futures.clear()

    as_completed = results

    def shutdown(self) -> None:
        """Stop the pool, cancelling runs not yet started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalPoolExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _init_pool_worker(threads: int, parent_pid: int) -> None:
    """Set the worker's threads and end it when the process that started the pool dies."""
    from normlab.sweep.watchdog import exit_with_parent

    init_worker(threads)
    exit_with_parent(parent_pid)


def _worker_died(config: TrainConfig, store_path: str | None, error: str) -> RunResult:
    from normlab.store import Store

    if store_path is None:
        return failed_result(config.to_dict(), error, None, None)
    with Store(store_path) as store:
        # The worker may have opened the run before dying: close that record rather than add another.
        running = store.runs(config_key=config.key(), status="running")
        run_id = running[-1].id if running else None
        if run_id is not None:
            store.finish_run(run_id, "failed", error=error)
        return failed_result(config.to_dict(), error, store, run_id)
