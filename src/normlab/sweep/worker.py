"""What runs one config, in this process or in a pool worker: :func:`run_config` never raises for a bad
run; a failure comes back as a ``failed`` :class:`RunResult` and is recorded in the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from normlab.train import RunResult, TrainConfig, Trainer
from normlab.train.threads import set_threads

CallbacksFactory = Callable[[TrainConfig], list[Any]]


def run_config(
    config: dict[str, Any],
    store_path: str | None,
    callbacks_factory: CallbacksFactory | None = None,
) -> RunResult:
    """Train ``config`` (a :meth:`TrainConfig.to_dict`) into the store at ``store_path`` without a progress
    bar; ``callbacks_factory(config)`` builds the run's callbacks here, where the run lives."""
    from normlab.store import Store

    store = Store(store_path) if store_path is not None else None
    trainer = None
    try:
        cfg = TrainConfig.from_dict(config)
        callbacks = callbacks_factory(cfg) if callbacks_factory is not None else ()
        trainer = Trainer(cfg, store=store, callbacks=callbacks, progress=False)
        return trainer.fit()
    except Exception as exc:
        run_id = trainer.run_id if trainer is not None else None
        return failed_result(config, f"{type(exc).__name__}: {exc}", store, run_id)
    finally:
        if store is not None:
            store.close()


def run_group(configs: list[dict[str, Any]], store_path: str | None) -> list[RunResult]:
    """Train compatible ``configs`` as one stacked model (:func:`normlab.batched.train_batched`); when the
    group cannot be built (a bad config, a model that does not stack), each is trained alone instead."""
    from normlab.batched import train_batched
    from normlab.store import Store

    store = Store(store_path) if store_path is not None else None
    try:
        cfgs = [TrainConfig.from_dict(c) for c in configs]
        return train_batched(cfgs, store=store)
    except Exception:  # noqa: BLE001 - nothing was stored yet: the runs go one by one, as without batching
        pass
    finally:
        if store is not None:
            store.close()
    return [run_config(c, store_path) for c in configs]


def failed_result(config: dict[str, Any], error: str, store: Any, run_id: int | None) -> RunResult:
    """A ``failed`` result; when the run never reached the store (it failed while being built), a run
    record with status ``failed`` is written so the sweep's outcome is complete."""
    key = _key(config)
    if store is not None and run_id is None:
        run_id = store.start_run(config, key=key, name=config.get("name"), group=config.get("group"))
        store.finish_run(run_id, "failed", error=error, summary={"status": "failed", "error": error})
    return RunResult(
        status="failed", error=error, run_id=run_id, config=dict(config), config_key=key,
        convergence="failed", convergence_reason=f"the run failed: {error}",
    )  # fmt: skip


def init_worker(threads: int) -> None:
    """Pool initializer: ``threads`` intra-op torch threads per worker (workers x threads <= cores)."""
    # Nested BLAS/OpenMP pools would oversubscribe the cores the other workers use.
    set_threads(threads)


def _key(config: dict[str, Any]) -> str | None:
    try:
        return TrainConfig.from_dict(config).key()
    except Exception:
        from normlab.store import config_key

        try:
            return config_key(config)
        except Exception:
            return None
