"""Sharing one store between sweeps: train a config only after claiming it, wait for the ones that
another live process holds, and take over the ones whose process died.

:func:`run_claimed` is what :func:`normlab.sweep.run_sweep` calls instead of submitting every config: it
claims each config in the store (:meth:`normlab.store.Store.claim_config`, one atomic transaction), submits
the claimed ones to the executor, and keeps the claims alive with a heartbeat thread while they train.
Configs held by another live process are not trained here; their result is read from the store once
that process releases them. A claim whose owner died (kill -9, a lost machine) is taken over, its
``running`` rows closed as ``failed``, and the config is trained here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from normlab.sweep.executors import Executor
from normlab.sweep.worker import CallbacksFactory
from normlab.train import RunResult, TrainConfig

POLL_S = 1.0  # how often a waiting sweep looks at the configs another process trains


def run_claimed(
    configs: Iterable[TrainConfig],
    store: Any,
    executor: Executor,
    callbacks_factory: CallbacksFactory | None = None,
    *,
    done_statuses: tuple[str, ...] = ("finished", "diverged"),
    poll_s: float = POLL_S,
    submit: Callable[[list[TrainConfig]], None] | None = None,
    incoming: list[TrainConfig] | None = None,
) -> Iterator[tuple[TrainConfig, RunResult]]:
    """Yield ``(config, result)`` for every one of ``configs`` (distinct keys), each trained once across
    all processes sharing ``store``: by this one when it holds the claim, else read back from the store.
    A config whose run reached one of ``done_statuses`` after it was claimed (another process finished it
    in between) is read back too.

    ``submit(configs)`` hands claimed configs to the executor (default: one ``executor.submit`` each; the
    sweep passes one that stacks compatible configs into batched groups). With ``store=None`` every config
    is simply submitted. ``incoming``: a list the consumer may append configs to (distinct keys, new to
    this call) while it handles a yielded result; they are taken after each yield and trained in the same
    way, so follow-up runs start while earlier ones are still training.
    """
    configs = list(configs)
    pending = incoming if incoming is not None else []
    if submit is None:

        def submit(batch: list[TrainConfig]) -> None:
            for config in batch:
                executor.submit(config, callbacks_factory, store=store)

    if store is None:
        submit(configs)
        for item in executor.results():
            yield item
            if pending:
                batch = pending[:]
                pending.clear()
                submit(batch)
        return
    from normlab.store import Owner

    owner = Owner.this_process()
    waiting: dict[str, TrainConfig] = {}
    ready: list[tuple[TrainConfig, RunResult]] = []  # read back from the store, to yield

    def admit(batch: list[TrainConfig]) -> None:
        claimed = []
        for config in batch:
            if not store.claim_config(config.key(), owner):
                waiting[config.key()] = config
            elif (done := _done(store, config.key(), done_statuses)) is not None:
                store.release_config(config.key(), owner)
                ready.append((config, done))
            else:
                claimed.append(config)
        if claimed:
            submit(claimed)

    def take_incoming() -> None:
        if pending:
            batch = pending[:]
            pending.clear()
            admit(batch)

    with _Heartbeat(store, owner):
        try:
            admit(configs)
            while True:
                while ready:
                    yield ready.pop(0)
                    take_incoming()
                for config, result in executor.results():
                    store.release_config(config.key(), owner)
                    yield config, result
                    take_incoming()
                    while ready:
                        yield ready.pop(0)
                        take_incoming()
                if ready:
                    continue
                if not waiting:
                    return
                submitted = False
                for key, config in list(waiting.items()):
                    if store.claim_holder(key) is None:
                        last = store.latest_run(config_key=key)
                        if last is not None and last.status != "running":  # the other process's result
                            del waiting[key]
                            ready.append((config, RunResult.from_run(last)))
                            continue
                    if store.claim_config(key, owner):  # released without a result, or its owner died
                        del waiting[key]
                        if (done := _done(store, key, done_statuses)) is not None:
                            store.release_config(key, owner)
                            ready.append((config, done))
                            continue
                        submit([config])
                        submitted = True
                if waiting and not submitted and not ready:
                    time.sleep(poll_s)
        finally:
            store.release_claims(owner)


def _done(store: Any, key: str, statuses: tuple[str, ...]) -> RunResult | None:
    run = store.find_completed(key, statuses) if statuses else None
    return RunResult.from_run(run) if run is not None else None


class _Heartbeat:
    """A daemon thread refreshing ``owner``'s claims every ``HEARTBEAT_EVERY_S`` seconds, over its own
    connection (SQLite connections belong to one thread)."""

    def __init__(self, store: Any, owner: Any) -> None:
        self.path, self.owner = store.path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="normlab-claims-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        from normlab.store import Store
        from normlab.store.store import HEARTBEAT_EVERY_S

        store = Store(self.path)
        try:
            while not self._stop.wait(HEARTBEAT_EVERY_S):
                store.heartbeat(self.owner)
        finally:
            store.close()
