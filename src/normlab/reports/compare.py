"""The report of ``normlab compare``: one model under several norms, batch sizes, an lr grid and seeds.

Sections: which normalization wins where (computed sentences), accuracy at each norm's best stable lr
(mean ± 95% t-interval over seeds), stability (diverged runs, largest stable lr), batch-size sensitivity,
train/eval gap, and cost (steps/s relative to the first norm), with figures. The lr reading is
:func:`normlab.sweep.summarize_compare`'s, so the report and the terminal table agree: an lr is stable when
no seed diverged or failed; the best stable lr has the highest mean final test accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab.reports.document import ReportFiles, Section, write_report
from normlab.reports.figure import Figure, save_matplotlib
from normlab.reports.stats import mean_ci
from normlab.reports.table import Table


def compare_report(
    out_dir: str | Path,
    results: Sequence[Any],
    *,
    title: str = "normlab compare",
    config: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
) -> ReportFiles:
    """Write ``<out_dir>/report.html`` + ``report.md`` for the ``RunResult`` s of a compare sweep.

    Args:
        results: the sweep's :class:`normlab.train.RunResult` s (their ``config`` dicts give norm, batch
            size and lr).
        config: the command's settings, shown in the report.
        environment: e.g. :func:`normlab.store.environment_info`; shown in the report.

    Raises:
        NormlabError: no results, or ``out_dir`` is a file.
    """
    from normlab.errors import NormlabError
    from normlab.sweep import summarize_compare

    if not results:
        raise NormlabError("compare_report needs at least one run result, got none")
    cells = summarize_compare(results)
    norms = list(dict.fromkeys(c.norm for c in cells))
    batches = sorted({c.batch_size for c in cells})
    grid = {(c.norm, c.batch_size): c for c in cells}
    out = Path(out_dir)

    accuracy = Table(
        "Final test accuracy (%) at the best stable lr, mean ± 95% CI over seeds",
        ["norm", "batch", "test acc (%)", "best lr", "largest stable lr", "diverged/failed runs", "steps/s",
         "train/eval gap (pts)"],
        notes=["Stable lr: no seed diverged or failed; best: the stable lr with the highest mean accuracy.",
               "Train/eval gap: test accuracy with batch statistics at the training batch size - eval mode."],
    )
    for norm in norms:
        for b in batches:
            cell = grid.get((norm, b))
            if cell is None:
                continue
            best = cell.best
            bad = sum(s != "finished" for o in cell.lrs for s in o.statuses)
            total = sum(len(o.statuses) for o in cell.lrs)
            accuracy.add_row(
                norm, b, _pct_ci(best.accuracies) if best else None, best.lr if best else None,
                cell.largest_stable_lr, f"{bad}/{total}",
                round(_mean(best.steps_per_s), 1) if best else None,
                round(100 * _mean(best.gaps), 2) if best else None,
            )

    sections = [
        Section("Which normalization wins where", text=wins_sentences(grid, norms, batches)),
        Section("Accuracy", tables=[accuracy], figures=[_accuracy_figure(out, grid, norms, batches)]),
        Section("Stability", text=[stability_sentence(grid, norms, batches)],
                figures=[_lr_figure(out, grid, norms, batches)]),
        Section("Batch-size sensitivity", text=[sensitivity_sentence(grid, norms, batches)]),
        Section("Train/eval gap", text=[gap_sentence(grid, norms, batches)]),
        Section("Cost", text=[cost_sentence(grid, norms, batches)]),
    ]
    if config is not None:
        sections.append(Section("Configuration", data=config))
    if environment is not None:
        sections.append(Section("Environment", data=environment))
    return write_report(out, title, sections, subtitle=f"{len(results)} runs, {len(norms)} norms, "
                        f"batch sizes {', '.join(map(str, batches))}")


def best_mean(cell: Any) -> float:
    best = cell.best if cell is not None else None
    return _mean(best.accuracies) if best else math.nan


def wins_sentences(grid: dict, norms: list[str], batches: list[int]) -> list[str]:
    """Per batch size: the norm with the highest mean accuracy at its best stable lr, its margin over the
    runner-up, and whether that margin is inside the two 95% CIs (then: "a tie within noise")."""
    sentences = []
    for b in batches:
        ranked = sorted(
            ((best_mean(grid.get((n, b))), n) for n in norms if math.isfinite(best_mean(grid.get((n, b))))),
            reverse=True,
        )
        unstable = [n for n in norms if (n, b) in grid and grid[(n, b)].best is None]
        if not ranked:
            sentences.append(f"At batch {b} no norm has a stable learning rate.")
            continue
        top_acc, top = ranked[0]
        text = f"At batch {b}, {top} wins with {100 * top_acc:.1f}%"
        if len(ranked) > 1:
            second_acc, second = ranked[1]
            overlap = _half(grid[(top, b)]) + _half(grid[(second, b)])
            margin = top_acc - second_acc
            text += f", {100 * margin:.1f} pts ahead of {second} ({100 * second_acc:.1f}%)"
            if math.isfinite(overlap) and margin <= overlap:
                text += ", a tie within the 95% CIs"
        if unstable:
            text += f"; {', '.join(unstable)} had no stable lr"
        sentences.append(text + ".")
    return sentences


def stability_sentence(grid: dict, norms: list[str], batches: list[int]) -> str:
    """Diverged (or failed) runs per norm over the grid, and the largest stable lr at the largest batch."""
    parts = []
    for n in norms:
        statuses = [s for b in batches if (n, b) in grid for o in grid[(n, b)].lrs for s in o.statuses]
        parts.append(f"{n} {sum(s != 'finished' for s in statuses)}/{len(statuses)}")
    b = batches[-1]
    largest = [f"{n} {_lr(grid[(n, b)].largest_stable_lr)}" for n in norms if (n, b) in grid]
    return (f"Diverged or failed runs: {', '.join(parts)}. Largest stable lr at batch {b}: "
            f"{', '.join(largest)}.")


def sensitivity_sentence(grid: dict, norms: list[str], batches: list[int]) -> str:
    """Accuracy change from the largest to the smallest batch size per norm; most and least sensitive."""
    if len(batches) < 2:
        return "One batch size only: no sensitivity to report."
    small, large = batches[0], batches[-1]
    change = {n: best_mean(grid.get((n, small))) - best_mean(grid.get((n, large))) for n in norms}
    known = {n: v for n, v in change.items() if math.isfinite(v)}
    if not known:
        return f"No norm has a stable lr at both batch {small} and {large}."
    most = max(known, key=lambda n: abs(known[n]))
    least = min(known, key=lambda n: abs(known[n]))
    parts = ", ".join(f"{n} {100 * v:+.1f} pts" for n, v in known.items())
    return (f"Accuracy at batch {small} minus batch {large}: {parts}. Most sensitive to the batch size: "
            f"{most}; least: {least}.")


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


def _half(cell: Any) -> float:
    return _pct_ci(cell.best.accuracies)[1] / 100 if cell is not None and cell.best else math.nan


def _lr(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _accuracy_figure(out: Path, grid: dict, norms: list[str], batches: list[int]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for n in norms:
        cis = [_pct_ci(grid[(n, b)].best.accuracies) if (n, b) in grid and grid[(n, b)].best else
               (math.nan, math.nan) for b in batches]
        ax.errorbar(batches, [c[0] for c in cis], yerr=[0 if math.isnan(c[1]) else c[1] for c in cis],
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

    fig, axes = plt.subplots(1, len(batches), figsize=(4.0 * len(batches), 3.4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], batches, strict=True):
        for n in norms:
            cell = grid.get((n, b))
            if cell is None:
                continue
            lrs = [o.lr for o in cell.lrs]
            (line,) = ax.plot(lrs, [100 * o.mean_accuracy for o in cell.lrs], marker="o", label=n)
            bad = [o.lr for o in cell.lrs if not o.stable]
            if bad:
                ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), markersize=9)
        ax.set_xscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend()
    return save_matplotlib(fig, out, "accuracy_vs_lr",
                           "Mean test accuracy over the lr grid per batch size (x at 0: diverged/failed).")
