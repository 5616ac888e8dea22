"""normlab.sweep: resumable sweeps that record failures and divergence, executors, and compare's reading."""

from __future__ import annotations

import contextlib
import math

import pytest

from normlab.errors import NormlabError
from normlab.store import Store
from normlab.sweep import (
    InlineExecutor,
    LocalPoolExecutor,
    compare_configs,
    run_sweep,
    scaled_lr,
    summarize_compare,
)
from normlab.train import RunResult, TrainConfig

TINY = dict(subset=256, batch_size=32, steps=8, width=4, log_every=4, eval_train_samples=64)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "results.sqlite") as db:
        yield db


def probe_factory(config):
    """Module-level (picklable) callbacks factory: logs the config's seed every 4 steps."""

    def log_seed(ctx):
        ctx.log("probe/seed", float(ctx.config.seed))

    return [(log_seed, 4)]


def test_sweep_records_every_outcome_keeps_order_and_resumes(store):
    configs = [
        TrainConfig(**TINY, seed=0),
        TrainConfig(**TINY, lr=1e4),  # diverges
        TrainConfig(**{**TINY, "model": "no_such_model"}),  # fails while building
        TrainConfig(**TINY, seed=1),
    ]
    seen = []
    results = run_sweep(configs, store, on_result=lambda c, r: seen.append(r.status))
    assert [r.status for r in results] == ["finished", "diverged", "failed", "finished"]
    assert sorted(seen) == ["diverged", "failed", "finished", "finished"]
    assert "unknown model 'no_such_model'" in results[2].error
    assert [r.config["seed"] for r in results] == [0, 0, 0, 1]
    stored = {run.id: run.status for run in store.runs()}
    assert [stored[r.run_id] for r in results] == ["finished", "diverged", "failed", "finished"]

    again = run_sweep(configs, store)
    assert len(store.runs()) == 5  # only the failed config ran again
    assert [r.run_id for r in again[:2]] == [r.run_id for r in results[:2]]
    assert again[0].final_test_acc == results[0].final_test_acc
    assert again[3].run_id == results[3].run_id and again[2].run_id != results[2].run_id
    run_sweep(configs[:1], store, skip_finished=False)
    assert len(store.runs()) == 6


def test_inline_callbacks_factory(store):
    (result,) = run_sweep([TrainConfig(**TINY, seed=3)], store, callbacks_factory=probe_factory)
    assert store.metrics(result.run_id, "probe/seed") == [(4, 3.0), (8, 3.0)]


def test_pool_executor_runs_in_workers_with_callbacks(store):
    configs = [TrainConfig(**TINY, seed=s) for s in (0, 1)]
    with LocalPoolExecutor(workers=2) as pool:
        results = run_sweep(configs, store, pool, callbacks_factory=probe_factory)
    assert [r.status for r in results] == ["finished", "finished"]
    inline = run_sweep(configs, None, InlineExecutor())
    # The same numbers in a worker as in this process.
    assert [r.final_test_acc for r in results] == [r.final_test_acc for r in inline]
    assert [store.metrics(r.run_id, "probe/seed")[-1][1] for r in results] == [0.0, 1.0]
    assert store.integrity_check() == "ok"
    assert {r.environment["threads"] for r in store.runs()} == {1}
    with pytest.raises(NormlabError, match="workers must be a positive int, got 0"):
        LocalPoolExecutor(workers=0)


@pytest.mark.parametrize("pool", [False, True])
def test_follow_ups_join_the_sweep_in_order_and_resume(store, pool):
    # Each seed-0 run is followed by the same config at seed 2, each seed-2 run by nothing: the follow-ups
    # train in the same sweep (in a pool: while the others still train) and come after the configs.
    configs = [TrainConfig(**TINY, seed=0), TrainConfig(**TINY, seed=1, lr=0.2)]
    followed = []

    def follow_up(config, result):
        followed.append((config.seed, config.lr, result.status))
        return [config.replace(seed=2)] if config.seed == 0 else []

    executor = LocalPoolExecutor(workers=2) if pool else InlineExecutor()
    with executor if pool else contextlib.nullcontext():
        results = run_sweep(configs, store, executor, follow_up=follow_up)
    assert [(r.config["seed"], r.config["lr"]) for r in results] == [(0, 0.1), (1, 0.2), (2, 0.1)]
    assert sorted(followed) == [(0, 0.1, "finished"), (1, 0.2, "finished"), (2, 0.1, "finished")]
    assert len(store.runs()) == 3
    # Resumed: every run, the follow-up included, is read back (and followed up) without training.
    followed.clear()
    again = run_sweep(configs, store, follow_up=follow_up)
    assert [r.run_id for r in again] == [r.run_id for r in results] and len(store.runs()) == 3
    assert len(followed) == 3


def test_compare_configs_scale_lr_and_use_agc_for_nf():
    configs = compare_configs(
        model="cnn", norms=["bn", "nf"], batch_sizes=[16, 128], seeds=[0, 1], base_lrs=[0.1], agc_clip=0.04,
        epochs=2,
    )
    assert len(configs) == 8
    assert {(c.norm, c.batch_size, c.lr, c.agc_clip) for c in configs} == {
        ("bn", 16, 0.0125, None), ("bn", 128, 0.1, None), ("nf", 16, 0.0125, 0.04), ("nf", 128, 0.1, 0.04),
    }  # fmt: skip
    assert all(c.epochs == 2 and c.steps is None for c in configs)
    assert scaled_lr(0.2, 512, 128) == 0.8
    assert scaled_lr(0.2, 512, 128, "sqrt") == pytest.approx(0.4)
    with pytest.raises(NormlabError, match="lr scaling must be one of linear, sqrt, got 'cube'"):
        scaled_lr(0.2, 512, 128, "cube")
    with pytest.raises(NormlabError, match="compare needs at least one value in seeds, got none"):
        compare_configs(model="cnn", norms=["bn"], batch_sizes=[16], seeds=[], base_lrs=[0.1])
    with pytest.raises(NormlabError, match="norms repeat: bn, bn"):
        compare_configs(model="cnn", norms=["bn", "bn"], batch_sizes=[16], seeds=[0], base_lrs=[0.1])


def _result(norm, lr, status, acc, seed=0):
    return RunResult(
        status=status, final_test_acc=acc, steps_per_s=100.0, train_eval_gap=0.01,
        config={"norm": norm, "batch_size": 16, "lr": lr, "seed": seed},
    )  # fmt: skip


def test_best_and_largest_stable_lr():
    results = [
        _result("bn", 0.1, "finished", 0.80), _result("bn", 0.1, "finished", 0.90, 1),
        _result("bn", 0.4, "finished", 0.95), _result("bn", 0.4, "diverged", math.nan, 1),
        _result("bn", 0.2, "finished", 0.86), _result("bn", 0.2, "finished", 0.84, 1),
        _result("none", 0.4, "diverged", math.nan), _result("none", 0.4, "finished", 0.5, 1),
    ]  # fmt: skip
    bn, none = summarize_compare(results)
    assert [o.lr for o in bn.lrs] == [0.1, 0.2, 0.4] and [o.stable for o in bn.lrs] == [True, True, False]
    assert bn.best.lr == 0.1 and bn.best.mean_accuracy == pytest.approx(0.85)  # tie 0.85: the smaller lr
    assert bn.largest_stable_lr == 0.2
    row = bn.to_dict()
    assert row["accuracies"] == [0.80, 0.90] and row["steps_per_s"] == 100.0
    assert none.best is None and none.largest_stable_lr is None and none.to_dict()["best_lr"] is None
