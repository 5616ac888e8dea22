"""Report layout: summary first, figures sized for a laptop screen, intervals inside the metric's range, and
learning curves with enough points for short runs."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from normlab.reports import save_matplotlib  # noqa: E402
from normlab.reports.bars import clipped_yerr  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_reports import _compare_results, _curves  # noqa: E402


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    return struct.unpack(">II", head[16:24])  # the IHDR chunk: width, height


def test_clipped_yerr_cuts_at_the_bounds_only():
    below, above = clipped_yerr([99.5, 50.0, 0.4, 70.0], [1.2, 3.0, 2.0, float("nan")], 0.0, 100.0)
    assert below == pytest.approx([1.2, 3.0, 0.4, 0.0])
    assert above == pytest.approx([0.5, 3.0, 2.0, 0.0])
    assert clipped_yerr([0.5], [2.0]) == [[2.0], [2.0]]  # unbounded: the interval as it is
    assert clipped_yerr([0.9], [0.3], -1.0, 1.0) == [[pytest.approx(0.3)], [pytest.approx(0.1)]]


def test_small_figures_are_scaled_to_the_report_width(tmp_path):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    save_matplotlib(fig, tmp_path, "small", "c")
    width, height = _png_size(tmp_path / "small.png")
    assert 800 <= width <= 1000 and height == pytest.approx(width * 2 * 3**0.5 / 9, rel=0.1)
    from normlab.reports.figure import fit_width

    fig = plt.figure(figsize=(12, 3))
    fit_width(fig)
    assert list(fig.get_size_inches()) == [12, 3]  # wider figures are left as drawn
    plt.close(fig)


def test_compare_report_puts_the_summary_first_and_draws_wide_figures(tmp_path):
    from normlab.reports import compare_report

    files = compare_report(tmp_path, _compare_results(), histories=_curves())
    md = files.markdown_text
    order = [md.index(f"## {name}") for name in ("Summary", "Figures", "Learning curves", "Verdicts",
                                                 "Stability", "Batch-size sensitivity", "Cost")]
    assert order == sorted(order)
    summary = md[md.index("## Summary"):md.index("## Figures")]
    assert "| norm | batch | test acc (%) |" in summary  # the verdict table, before any sentence
    verdicts = md[md.index("## Verdicts"):md.index("## Stability")]
    assert "Most sensitive to the batch size" not in verdicts  # said once, under its own heading
    assert md.count("Most sensitive to the batch size") == 1
    for name in ("accuracy_vs_batch", "accuracy_vs_lr", "curves_bs16"):
        assert _png_size(tmp_path / f"{name}.png")[0] >= 800, name


def test_accuracy_error_bars_stop_at_100(tmp_path, monkeypatch):
    from normlab.reports import compare, compare_report

    drawn = []
    real = compare.clipped_yerr

    def spy(means, halves, low=None, high=None):
        out = real(means, halves, low, high)
        drawn.append([(m - b, m + a) for m, b, a in zip(means, *out, strict=True)])
        return out

    monkeypatch.setattr(compare, "clipped_yerr", spy)
    results = _compare_results()
    for r in results:  # accuracies near 100 with a wide spread over seeds
        r.final_test_acc = min(1.0, r.final_test_acc + 0.19 + 0.01 * r.config["seed"])
    compare_report(tmp_path, results)
    ends = [end for figure in drawn for _, end in figure]
    assert max(ends) == pytest.approx(100.0) and min(start for figure in drawn for start, _ in figure) >= 0


def test_log_every_zero_follows_the_run_length():
    from normlab.train import TrainConfig
    from normlab.train.budget import RunBudget, log_every

    def interval(**fields):
        config = TrainConfig(log_every=0, **fields)
        return log_every(config, RunBudget.from_config(config, steps_per_epoch=10))

    assert interval(steps=20) == 1  # 20 points, not the 2 of log_every=10
    assert interval(steps=250) == 5  # ~50 points
    assert interval(steps=12000) == 10  # long runs: as the default
    assert interval(epochs=3) == 1  # 30 steps
    config = TrainConfig(log_every=7, steps=20)
    assert log_every(config, RunBudget.from_config(config, steps_per_epoch=10)) == 7


def test_short_run_logs_every_step_with_log_every_zero():
    from normlab.train import TrainConfig, Trainer

    config = TrainConfig(model="mlp", dataset="synthetic", steps=12, batch_size=16, log_every=0,
                         eval_train_samples=32)
    trainer = Trainer(config, progress=False)
    trainer.fit()
    assert [step for step, _ in trainer.history["train/loss"]] == list(range(1, 13))


def test_study_report_puts_verdict_tables_and_figures_before_the_words(tmp_path):
    from normlab.reports import Table
    from normlab.studies.base import StudyOutcome
    from normlab.studies.runner import write_study_report

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1, 2], [3, 4])
    figure = save_matplotlib(fig, tmp_path, "curve", "a curve")
    outcome = StudyOutcome([Table("Accuracy", ["norm", "acc"], [["bn", 0.9]])], [figure],
                           verdict="BN wins by 2 pts.", agrees_with_paper=False, discrepancy="smaller data",
                           key_figures="bn 90, gn 88")
    meta = {"paper": "Ioffe 2015", "claim": "BN helps", "scale": "tiny", "seeds": [0, 1, 2], "device": "cpu",
            "store": "s", "wall_time_s": 1.0, "params": {}, "name": "x", "environment": {}, "title": "T"}
    md = write_study_report(tmp_path, meta, outcome).markdown_text
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## Summary", "## Figures", "## The claim", "## Configuration", "## Environment"]
    summary = md[md.index("## Summary"):md.index("## Figures")]
    assert summary.index("> Disagrees with the paper. BN wins by 2 pts.") < summary.index("**Accuracy**")
    claim = md[md.index("## The claim"):md.index("## Configuration")]
    assert "Paper's claim (Ioffe 2015): BN helps" in claim and "Discrepancy: smaller data" in claim
    assert "Key figures: bn 90, gn 88" in claim
