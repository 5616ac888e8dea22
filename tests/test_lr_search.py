"""LR bracketing (normlab.sweep.lr_search) on constructed outcomes: no training."""

import math

import pytest

from normlab.sweep import compare_configs, summarize_compare
from normlab.sweep.lr_search import bracket_lrs, extensions, grid_factor
from normlab.train import RunResult


def serially(train):
    """A ``run`` for bracket_lrs: ``train(configs)`` one batch at a time, follow-ups queued in order."""

    def run(configs, follow_up):
        queue, results = list(configs), []
        while queue:
            config = queue.pop(0)
            (result,) = train([config])
            results.append(result)
            queue += follow_up(config, result)
        return results

    return run


def result(lr, seed, acc, status="finished", convergence="converged", norm="bn", batch=128):
    return RunResult(
        status=status, final_test_acc=acc if status == "finished" else math.nan,
        final_val_acc=acc if status == "finished" else math.nan, convergence=convergence,
        config={"norm": norm, "batch_size": batch, "lr": lr, "seed": seed},
    )  # fmt: skip


def cell(outcomes):
    """outcomes: lr -> (accuracy, convergence) for 3 seeds each."""
    results = []
    for lr, (acc, conv) in outcomes.items():
        status = "diverged" if conv == "diverged" else "finished"
        results += [result(lr, s, acc + 0.001 * s, status, conv) for s in range(3)]
    (only,) = summarize_compare(results)
    return only


def test_grid_factor():
    assert grid_factor([0.0025, 0.01, 0.04]) == pytest.approx(4.0)
    assert grid_factor([0.1]) == 2.0


def test_interior_best_and_unstable_top_need_nothing():
    c = cell({0.01: (0.90, "converged"), 0.04: (0.95, "converged"), 0.16: (0.0, "diverged")})
    assert c.best.lr == 0.04 and c.best_edge is None and not c.top_stable
    assert extensions(c, [0.01, 0.04, 0.16], 4.0) == []


def test_best_at_top_extends_up():
    c = cell({0.01: (0.90, "converged"), 0.04: (0.95, "converged")})
    assert c.best_edge == "high" and c.largest_stable_text() == ">= 0.04 (top of grid)"
    assert extensions(c, [0.01, 0.04], 4.0) == [pytest.approx(0.16)]


def test_stable_top_extends_up_even_when_best_is_interior():
    # "largest stable lr" needs instability: a stalled top is unstable, a converged one is not.
    c = cell({0.01: (0.90, "converged"), 0.04: (0.95, "converged"), 0.16: (0.93, "converged")})
    assert extensions(c, [0.01, 0.04, 0.16], 4.0) == [pytest.approx(0.64)]
    stalled = cell({0.01: (0.90, "converged"), 0.04: (0.95, "converged"), 0.16: (0.1, "stalled")})
    assert not stalled.top_stable and stalled.largest_stable_lr == 0.04
    assert extensions(stalled, [0.01, 0.04, 0.16], 4.0) == []


def test_best_at_bottom_extends_down_and_nothing_stable_too():
    c = cell({0.01: (0.95, "converged"), 0.04: (0.90, "converged"), 0.16: (0.0, "diverged")})
    assert c.best_edge == "low" and extensions(c, [0.01, 0.04, 0.16], 4.0) == [pytest.approx(0.0025)]
    none = cell({0.04: (0.0, "diverged"), 0.16: (0.0, "diverged")})
    assert none.best is None and extensions(none, [0.04, 0.16], 4.0) == [pytest.approx(0.01)]


def test_failed_runs_do_not_move_the_grid():
    results = [result(lr, s, math.nan, "failed", "failed") for lr in (0.01, 0.04) for s in range(3)]
    (failed,) = summarize_compare(results)
    assert failed.best is None and extensions(failed, [0.01, 0.04], 4.0) == []


def test_the_cap_stops_the_search():
    c = cell({0.01: (0.90, "converged"), 0.04: (0.95, "converged"), 0.16: (0.96, "converged"),
              0.64: (0.97, "converged")})  # fmt: skip
    assert extensions(c, [0.01, 0.04], 4.0, max_extra=2) == []  # 0.16 and 0.64 already added
    assert extensions(c, [0.01, 0.04], 4.0, max_extra=3) == [pytest.approx(2.56)]


def test_bracket_lrs_runs_rounds_until_bracketed():
    # Accuracy peaks at lr 0.04 (base) and runs diverge from lr 0.64: the base grid [0.0025, 0.01] must grow
    # up to 0.04 (best), 0.16 (interior), then 0.64 (unstable): three rounds with max_extra=3.
    def accuracy(lr):
        return 0.95 - 0.05 * abs(math.log(lr / 0.04, 4))

    def fake_run(configs):
        return [result(c.lr, c.seed, accuracy(c.lr), "diverged" if c.lr > 0.5 else "finished",
                       "diverged" if c.lr > 0.5 else "converged") for c in configs]

    configs = compare_configs(model="cnn", norms=["bn"], batch_sizes=[128], seeds=[0, 1, 2],
                              base_lrs=[0.0025, 0.01], steps=10)
    rounds = []
    results, all_configs = bracket_lrs(configs, serially(fake_run), max_extra=3,
                                       on_round=lambda n, new: rounds.append(sorted({c.lr for c in new})))
    assert [[pytest.approx(x) for x in r] for r in rounds] == [[0.04], [0.16], [0.64]]
    assert len(results) == len(all_configs) == 15
    (final,) = summarize_compare(results)
    assert final.best.lr == pytest.approx(0.04) and final.best_edge is None and not final.top_stable
    assert final.largest_stable_lr == pytest.approx(0.16)
    assert {c.seed for c in all_configs if c.lr > 0.1} == {0, 1, 2}  # the base grid's seeds
    assert all(c.name == f"cnn/bn/bs128/lr{c.lr:.4g}/s{c.seed}" for c in all_configs)


def test_probes_above_the_best_lr_stop_below_a_bar():
    # Best lr 0.04 (validation 0.95 + 0.001 * seed, mean 0.951): the probe above it gets the bar
    # 0.951 - 0.03; the probe below a grid whose best is at the bottom never gets one.
    seen = []

    def fake_run(configs):
        seen.extend(configs)
        return [result(c.lr, c.seed, (0.95 if c.lr == 0.04 else 0.9) + 0.001 * c.seed) for c in configs]

    configs = compare_configs(model="cnn", norms=["bn"], batch_sizes=[128], seeds=[0, 1, 2],
                              base_lrs=[0.01, 0.04], budget="auto", epochs=None, steps=1000, val_fraction=0.1)
    bracket_lrs(configs, serially(fake_run), max_extra=1)
    probes = [c for c in seen if c.lr > 0.05]
    assert len(probes) == 3 and [c.stop_below for c in probes] == [pytest.approx(0.951 - 0.03)] * 3
    assert all(c.stop_below is None for c in seen if c.lr <= 0.04)
    seen.clear()
    bracket_lrs(configs, serially(fake_run), max_extra=1, stop_margin=None)
    assert all(c.stop_below is None for c in seen)
    # The best at the bottom: the probe below trains to its plateau.
    seen.clear()
    low = compare_configs(model="cnn", norms=["bn"], batch_sizes=[128], seeds=[0, 1, 2],
                          base_lrs=[0.04, 0.16], budget="auto", epochs=None, steps=1000, val_fraction=0.1)
    bracket_lrs(low, serially(fake_run), max_extra=1)
    below = [c for c in seen if c.lr < 0.04]
    assert len(below) == 3 and all(c.stop_below is None for c in below)


def test_a_probe_stopped_below_its_bar_is_marked_and_never_best():
    stopped = "stopped below the bar at step 1200: best held-out accuracy 0.8000 < 0.9210 (...)"
    results = [result(0.04, s, 0.95) for s in range(3)] + [
        RunResult(status="finished", final_test_acc=0.8, final_val_acc=0.8, convergence="unconverged",
                  convergence_reason=stopped, config={"norm": "bn", "batch_size": 128, "lr": 0.16, "seed": s})
        for s in range(3)
    ] + [result(0.01, s, 0.9) for s in range(3)]
    (summary,) = summarize_compare(results)
    assert [o.stopped_below for o in summary.lrs] == [False, False, True]
    assert summary.best.lr == 0.04 and summary.best_edge is None and summary.top_stable
    assert summary.to_dict()["grid"][2]["stopped_below_bar"] is True
