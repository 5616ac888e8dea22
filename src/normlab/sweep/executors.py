"""Where sweep runs execute: the :class:`Executor` protocol, :class:`InlineExecutor` (serial, this
process) and :class:`LocalPoolExecutor` (a process pool over this machine's cores).

An executor takes configs with :meth:`submit` and yields ``(config, RunResult)`` pairs from
:meth:`results` as runs complete. Runs are written to the store by the process that trains them (the
store is safe for concurrent writers), so the executor only carries configs and results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, Protocol, runtime_checkable

from normlab.errors import NormlabError
from normlab.sweep.worker import CallbacksFactory, failed_result, init_worker, run_config
from normlab.train import RunResult, TrainConfig


@runtime_checkable
class Executor(Protocol):
    """Runs configs. ``submit`` returns a handle; ``results`` yields ``(config, result)`` as they finish."""

    def submit(
        self, config: TrainConfig, callbacks_factory: CallbacksFactory | None = None, *, store: Any = None
    ) -> Any: ...

    def results(self) -> Iterator[tuple[TrainConfig, RunResult]]: ...


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _store_path(store: Any) -> str | None:
    return None if store is None else str(store.path)


class InlineExecutor:
    """Runs each submitted config in this process, one after another, when :meth:`results` is iterated."""

    def __init__(self) -> None:
        self._queue: list[tuple[TrainConfig, CallbacksFactory | None, str | None]] = []

    def submit(
        self, config: TrainConfig, callbacks_factory: CallbacksFactory | None = None, *, store: Any = None
    ) -> int:
        self._queue.append((config, callbacks_factory, _store_path(store)))
        return len(self._queue) - 1

    def results(self) -> Iterator[tuple[TrainConfig, RunResult]]:
        while self._queue:
            config, factory, path = self._queue.pop(0)
            yield config, run_config(config.to_dict(), path, factory)

    as_completed = results

    def shutdown(self) -> None:
        self._queue.clear()


class LocalPoolExecutor:
    """A ``concurrent.futures`` process pool: ``workers`` processes (default: all cores) with
    ``threads_per_worker`` torch threads each (default 1, so workers do not fight over cores).

    Workers are started with ``spawn``: forking a process whose OpenMP pool already ran can deadlock.
    ``callbacks_factory`` must be a module-level function (it is pickled to the worker).
    """

    def __init__(self, workers: int | None = None, threads_per_worker: int = 1) -> None:
        workers = available_cores() if workers is None else workers
        for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NormlabError(f"{name} must be a positive int, got {value!r}")
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, tuple[TrainConfig, str | None]] = {}

    def submit(
        self, config: TrainConfig, callbacks_factory: CallbacksFactory | None = None, *, store: Any = None
    ) -> Future:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=_init_pool_worker,
                initargs=(self.threads_per_worker, os.getpid()),
            )
        path = _store_path(store)
        future = self._pool.submit(run_config, config.to_dict(), path, callbacks_factory)
        self._futures[future] = (config, path)
        return future

    def results(self) -> Iterator[tuple[TrainConfig, RunResult]]:
        futures, self._futures = self._futures, {}
        try:
            for future in as_completed(futures):
                config, path = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # the worker died (e.g. killed for memory): the run failed
                    result = _worker_died(config, path, f"{type(exc).__name__}: {exc}")
                yield config, result
        finally:
            for future in futures:
                future.cancel()

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
