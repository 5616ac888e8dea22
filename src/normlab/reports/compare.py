"""The report of ``normlab compare``: one model under several norms, batch sizes, an lr grid and seeds.

Summary first: the table of accuracy at each norm's best stable lr (mean ± 95% t-interval over seeds) with
each cell's verdict word, steps and convergence; then the figures (accuracy against batch size and over the
lr grid, intervals cut at 0 and 100%), the learning curves (one figure per norm and batch size: training
loss and held-out accuracy against steps, each seed a thin line); then the sentences: the verdicts (every
sentence that ranks norms or batch sizes goes through the one rule, :mod:`normlab.sweep.compare_verdicts`
over :func:`normlab.stats.compare_arms`, and the rule is stated), stability (largest stable lr, or ">= top
of grid"), batch-size sensitivity, train/eval gap, and cost. The lr reading is
:func:`normlab.sweep.summarize_compare`'s, so the report and the terminal table agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab.reports.bars import clipped_yerr
from normlab.reports.document import ReportFiles, Section, write_report
from normlab.reports.figure import Figure, save_matplotlib
from normlab.reports.stats import mean_ci
from normlab.reports.table import Table
from normlab.reports.ticks import plain_log_axis, set_log_ticks


def compare_report(
    out_dir: str | Path,
    results: Sequence[Any],
    *,
    title: str = "normlab compare",
    config: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
    histories: dict[int, dict[str, list]] | None = None,
    settle: Any = None,
    margin: float = 0.01,
) -> ReportFiles:
    """Write ``<out_dir>/report.html`` + ``report.md`` for the ``RunResult`` s of a compare sweep.

    Args:
        results: the sweep's :class:`normlab.train.RunResult` s (their ``config`` dicts give norm, batch
            size and lr).
        config: the command's settings, shown in the report.
        environment: e.g. :func:`normlab.store.environment_info`; shown in the report.
        histories: run id -> ``{"train/loss": [(step, value)], "val/acc": [...], "test/acc": [...]}`` for
            the learning curves (no curves without it).
        settle: a :class:`normlab.sweep.compare_verdicts.Settle` naming the flags that settle inconclusive
            verdicts for the way compare was run.
        margin: the equivalence margin of every verdict (accuracy, 0.01 = 1 point).

    Raises:
        NormlabError: no results, or ``out_dir`` is a file.
    """
    from normlab.errors import NormlabError
    from normlab.stats import rule_text
    from normlab.sweep import summarize_compare
    from normlab.sweep.compare_verdicts import Settle, cell_words, rank_batch

    if not results:
        raise NormlabError("compare_report needs at least one run result, got none")
    settle = settle or Settle()
    cells = summarize_compare(results, histories)
    norms = list(dict.fromkeys(c.norm for c in cells))
    batches = sorted({c.batch_size for c in cells})
    grid = {(c.norm, c.batch_size): c for c in cells}
    words = cell_words(grid, norms, batches, settle, margin)
    out = Path(out_dir)
    on_validation = all(c.best.selects_on_validation for c in cells if c.best is not None)

    accuracy = Table(
        "Final test accuracy (%) at the best stable lr, mean ± 95% CI over seeds",
        ["norm", "batch", "test acc (%)", "val acc (%)", "verdict", "steps", "converged", "best lr",
         "largest stable lr", "unstable runs", "steps/s", "train/eval gap (pts)"],
        notes=["Stable lr: no seed diverged, failed or stalled at chance level (unstable runs: those that "
               "did, over every lr of the cell); best: the stable lr with the "
               "highest mean " + ("validation" if on_validation else "test") + " accuracy.",
               "Verdict: against the best conclusive norm at the same batch size (win / loss / equivalent /"
               " unresolved / inconclusive), by the rule below.",
               "Steps: optimizer steps each seed took (min-max); converged: seeds that met the plateau rule "
               "(with the others' state); best lr (top) / (bottom): at the edge of the lr grid, so the "
               "optimum may lie beyond it; largest stable lr >= x: x, the top of the grid, was still stable.",
               "Train/eval gap: test accuracy with batch statistics at the training batch size - eval mode."],
    )
    for norm in norms:
        for b in batches:
            cell = grid.get((norm, b))
            if cell is None:
                continue
            best = cell.best
            bad = sum(_unstable_runs(o) for o in cell.lrs)
            total = sum(len(o.statuses) for o in cell.lrs)
            accuracy.add_row(
                norm, b, _pct_ci(best.accuracies) if best else None,
                _pct_ci(best.val_accuracies) if best and best.selects_on_validation else None,
                words.get((norm, b), "-"), _steps_text(best.steps) if best else None,
                _convergence_text(best) if best else None,
                _lr_text(cell) if best else None, _largest_stable_text(cell), f"{bad}/{total}",
                round(_mean(best.steps_per_s), 1) if best else None,
                round(100 * _mean(best.gaps), 2) if best else None,
            )

    selection_note = (
        "The lr of each cell was chosen on the validation split held out of the training data; test "
        "accuracy is reported, never selected on." if on_validation else
        "No validation split was held out: the lr was chosen on test accuracy, so the reported accuracies "
        "are optimistic (selected on test)."
    )
    groups = (config or {}).get("gn_groups")
    if groups and "gn" in norms:
        selection_note += (f" gn is Group Norm with {', '.join(map(str, groups))} groups in its norm layers "
                           "(the largest divisor of C up to 32 that leaves at least 2 channels per group).")

    # Summary first: the verdict table, then the figures, then the sentences behind them.
    sections = [
        Section("Summary", text=[selection_note], tables=[accuracy]),
        Section("Figures", figures=[_accuracy_figure(out, grid, norms, batches),
                                    _lr_figure(out, grid, norms, batches)]),
    ]
    curves = _learning_curve_figures(out, grid, norms, batches)
    if curves:
        sections.append(Section("Learning curves", text=[
            "Training loss and held-out accuracy against steps at each cell's best lr, one thin line per "
            "seed: a converged run's curves are flat before its end (an auto budget then cools the lr "
            "down)."],
            figures=curves))
    ranking = [line for b in batches for line in rank_batch(grid, norms, b, settle, margin).sentences()]
    sections += [
        Section("Verdicts", text=ranking, callout=f"Rule: {rule_text(margin)}.", callout_kind="info"),
        Section("Stability", text=[stability_sentence(grid, norms, batches)]),
        Section("Batch-size sensitivity", text=sensitivity_sentences(grid, norms, batches, settle, margin)),
        Section("Train/eval gap", text=[gap_sentence(grid, norms, batches)]),
        Section("Cost", text=[cost_sentence(grid, norms, batches)]),
    ]
    if config is not None:
        sections.append(Section("Configuration", data=config))
    if environment is not None:
        sections.append(Section("Environment", data=environment))
    return write_report(out, title, sections, subtitle=f"{len(results)} runs, {len(norms)} norms, "
                        f"batch sizes {', '.join(map(str, batches))}")


def verdict_sentences(grid: dict, norms: list[str], batches: list[int], settle: Any = None,
                      margin: float = 0.01) -> list[str]:
    """Per batch size, the leading norm against each other norm (win / equivalent / unresolved /
    inconclusive sentences, each stating the margin), then the batch-size sensitivity sentences."""
    from normlab.sweep.compare_verdicts import Settle, rank_batch

    settle = settle or Settle()
    lines = []
    for b in batches:
        lines += rank_batch(grid, norms, b, settle, margin).sentences()
    return lines + sensitivity_sentences(grid, norms, batches, settle, margin)


def stability_sentence(grid: dict, norms: list[str], batches: list[int]) -> str:
    """Unstable (diverged, failed or stalled) runs per norm over the grid, and the largest stable lr at the
    largest batch (">= top of grid" when the search never reached instability)."""
    parts = []
    for n in norms:
        outcomes = [o for b in batches if (n, b) in grid for o in grid[(n, b)].lrs]
        parts.append(f"{n} {sum(map(_unstable_runs, outcomes))}/{sum(len(o.statuses) for o in outcomes)}")
    b = batches[-1]
    largest = [f"{n} {grid[(n, b)].largest_stable_text()}" for n in norms if (n, b) in grid]
    return (f"Unstable runs (diverged, failed or stalled at chance level): {', '.join(parts)}. Largest "
            f"stable lr at batch {b}: {', '.join(largest)}.")


def sensitivity_sentences(grid: dict, norms: list[str], batches: list[int], settle: Any = None,
                          margin: float = 0.01) -> list[str]:
    """Accuracy at the smallest minus the largest batch size per norm, through the verdict rule (paired over
    seeds); the most sensitive norm only among changes whose interval excludes 0."""
    from normlab.sweep.compare_verdicts import Settle, batch_sensitivity

    return batch_sensitivity(grid, norms, batches, settle or Settle(), margin)[1]


def gap_sentence(grid: dict, norms: list[str], batches: list[int]) -> str:
    """The train/eval gap per norm at the smallest batch, and the largest one overall."""
    gaps = {(n, b): _mean(grid[(n, b)].best.gaps) for (n, b) in grid if grid[(n, b)].best is not None}
    gaps = {k: v for k, v in gaps.items() if math.isfinite(v)}
    if not gaps:
        return "No finished run measured a train/eval gap."
    (n, b), worst = max(gaps.items(), key=lambda kv: abs(kv[1]))
    small = batches[0]
    at_small = ", ".join(f"{m} {100 * gaps[(m, small)]:+.2f}" for m in norms if (m, small) in gaps)
    return (f"Train/eval gap at batch {small} (pts): {at_small}. Largest gap: {n} at batch {b}, "
            f"{100 * worst:+.2f} pts.")


def cost_sentence(grid: dict, norms: list[str], batches: list[int]) -> str:
    """Training speed (steps/s at the best lr) relative to the first norm, at the largest batch."""
    b = batches[-1]
    speed = {n: _mean(grid[(n, b)].best.steps_per_s) for n in norms
             if (n, b) in grid and grid[(n, b)].best is not None}
    base = norms[0]
    if base not in speed or not speed[base] > 0:
        return f"No speed reference: {base} has no stable lr at batch {b}."
    ratios = ", ".join(f"{n} {speed[n] / speed[base]:.2f}x" for n in speed)
    fastest = max(speed, key=speed.get)
    return (f"Training steps/s at batch {b} relative to {base}: {ratios}; fastest: {fastest} "
            f"({speed[fastest]:.1f} steps/s).")


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def _pct_ci(values: Sequence[float]) -> tuple[float, float]:
    mean, half = mean_ci(values)
    return round(100 * mean, 2), round(100 * half, 2)


def _accuracy_figure(out: Path, grid: dict, norms: list[str], batches: list[int]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 3.8))
    for n in norms:
        cis = [_pct_ci(grid[(n, b)].best.accuracies) if (n, b) in grid and grid[(n, b)].best else
               (math.nan, math.nan) for b in batches]
        means = [c[0] for c in cis]
        ax.errorbar(batches, means, yerr=clipped_yerr(means, [c[1] for c in cis], 0.0, 100.0),
                    marker="o", capsize=3, label=n)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_matplotlib(fig, out, "accuracy_vs_batch",
                           "Test accuracy at each norm's best stable lr vs batch size (mean ± 95% CI).")


def _lr_figure(out: Path, grid: dict, norms: list[str], batches: list[int]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(9.0, 4.5 * len(batches))
    fig, axes = plt.subplots(1, len(batches), figsize=(width, 3.8), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], batches, strict=True):
        lrs_shown = []
        for n in norms:
            cell = grid.get((n, b))
            if cell is None:
                continue
            lrs = [o.lr for o in cell.lrs]
            lrs_shown += lrs
            cis = [_pct_ci(o.accuracies) for o in cell.lrs]
            (line,) = ax.plot([], [])
            means = [c[0] for c in cis]
            ax.errorbar(lrs, means, yerr=clipped_yerr(means, [c[1] for c in cis], 0.0, 100.0),
                        marker="o", capsize=3, label=n, color=line.get_color())
            stopped = [(o.lr, c[0]) for o, c in zip(cell.lrs, cis, strict=True) if o.stopped_below]
            if stopped:
                ax.plot([lr for lr, _ in stopped], [m for _, m in stopped], "o", color=line.get_color(),
                        markerfacecolor="white", markersize=7, zorder=3)
            bad = [o.lr for o in cell.lrs if not o.stable]
            if bad:
                ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), markersize=9)
        set_log_ticks(ax, lrs_shown)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].set_ylim(-3, 103)  # an accuracy's interval is clipped to what an accuracy can be
    axes[0][0].legend()
    return save_matplotlib(fig, out, "accuracy_vs_lr",
                           "Test accuracy over the lr grid per batch size, mean ± 95% CI over seeds "
                           "(x at 0: an lr where a seed diverged, failed or stalled; hollow: a probe above "
                           "the best lr stopped below its bar, its accuracy where it stopped).")


def _learning_curve_figures(out: Path, grid: dict, norms: list[str], batches: list[int]) -> list[Figure]:
    """One figure per batch size: training loss (log scale) and held-out accuracy against steps at each
    norm's best lr, the norms in their colours on the same axes, one thin line per seed (dashed: the seed
    did not converge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    figures = []
    for b in batches:
        drawn = [(n, grid[(n, b)].best) for n in norms if (n, b) in grid and grid[(n, b)].best is not None
                 and grid[(n, b)].best.histories]
        if not drawn:
            continue
        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10.0, 3.8))
        handles, which, any_loss = [], "validation", False
        for k, (n, best) in enumerate(drawn):
            color = f"C{k % 10}"
            which = "validation" if best.selects_on_validation else "test"
            for history, status in zip(best.histories, best.convergences, strict=False):
                loss = history.get("train/loss") or []
                heldout = history.get("val/acc") or history.get("test/acc") or []
                style = dict(color=color, linewidth=0.9, alpha=0.8,
                             linestyle="-" if status == "converged" else "--")
                if loss:
                    loss_ax.plot(*zip(*loss, strict=True), **style)
                    any_loss = True
                if heldout:
                    acc_ax.plot(*zip(*[(s, 100 * v) for s, v in heldout], strict=True), **style)
            handles.append(Line2D([], [], color=color, label=f"{n} (lr {best.lr:.3g})"))
        if any_loss:
            plain_log_axis(loss_ax)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("training loss (batch)")
        loss_ax.grid(alpha=0.3)
        acc_ax.set_xlabel("step")
        acc_ax.set_ylabel(f"{which} accuracy (%)")
        acc_ax.grid(alpha=0.3)
        handles.append(Line2D([], [], color="gray", linestyle="--", label="did not converge"))
        acc_ax.legend(handles=handles, fontsize=8, loc="lower right")
        fig.suptitle(f"batch {b}: each norm at its best lr", fontsize=10)
        figures.append(save_matplotlib(
            fig, out, f"curves_bs{b}",
            f"Batch {b}: training loss and {which} accuracy per seed at each norm's best lr (dashed: did "
            "not converge).",
        ))
    return figures


def _unstable_runs(outcome: Any) -> int:
    """Runs of an lr that diverged, failed or stalled at chance level."""
    return sum(status != "finished" or conv in ("stalled", "diverged", "failed")
               for status, conv in zip(outcome.statuses, outcome.convergences, strict=True))


def _steps_text(steps: Sequence[int]) -> str:
    if not steps:
        return "-"
    low, high = min(steps), max(steps)
    return str(low) if low == high else f"{low}-{high}"


# The summary table's cells are short (its notes say what they mean), so the table fits a laptop's width.
def _convergence_text(outcome: Any) -> str:
    converged = sum(c == "converged" for c in outcome.convergences)
    text = f"{converged}/{len(outcome.convergences)}"
    return text if converged == len(outcome.convergences) else f"{text} ({outcome.convergence})"


def _lr_text(cell: Any) -> str:
    edge = cell.best_edge
    text = f"{cell.best.lr:.3g}"
    return f"{text} ({'top' if edge == 'high' else 'bottom'})" if edge else text


def _largest_stable_text(cell: Any) -> str:
    return cell.largest_stable_text().replace(" (top of grid)", "")
