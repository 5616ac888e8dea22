"""Learning rates that bracket: extend each cell's lr grid until its best lr is interior and its largest
stable lr is followed by an unstable one (science.md section 8).

The search, per (norm, batch size) cell, in rounds (:func:`extensions` decides one round from the outcomes;
a cell's next round starts as soon as its own runs are done, beside the other cells' runs):

- **up**: while the grid's top lr is stable (no seed diverged, failed or stalled), add ``top * factor``:
  this both brackets a best lr sitting at the top and looks for instability, so "largest stable lr" is a
  measured boundary, not the grid's end;
- **down**: while the best lr is the grid's smallest (or no lr is stable), add ``bottom / factor``;
- each direction adds at most ``max_extra`` lrs beyond the base grid (the cap); a cell still unbracketed
  at the cap is reported as "best at edge" / ">= top of grid";
- a cell with a failed run (an exception, a killed worker) is not extended: a failure says nothing about
  the lr, and the rerun of the command retries it.

**Probes above the best lr stop below a bar.** With an auto budget and ``stop_margin`` set, a probe added
*above* a cell whose best lr is known trains with ``stop_below`` = that best lr's mean validation accuracy
minus ``stop_margin`` (:mod:`normlab.train.budget`): at its first held-out evaluation after the tenth of
its cap where it is still that far behind, it ends (unconverged, "stopped below the bar"). Such a probe
only has to show that it is not the best lr and whether it trains; training it to its plateau (up to the
cap, for the high-lr runs that converge slowly to a worse accuracy) cost more than the whole base grid's
cells at batch 128 on the default compare. Probes below the grid (the best lr at the bottom) always train
to their plateau: a small lr starts slowly and may yet become the best.

``factor`` is the base grid's own ratio (a log grid continued with its spacing; 2 for a one-value grid),
the seeds are the base grid's seeds, and finished runs are reused from the store
(:func:`normlab.sweep.run_sweep`), so a repeated compare costs nothing and a wider search only trains what
is new.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from normlab.sweep.compare import CompareCell, run_name, summarize_compare
from normlab.sweep.sweep import FollowUp
from normlab.train import RunResult, TrainConfig

MAX_EXTRA = 2  # lrs each direction may add beyond the base grid
STOP_MARGIN = 0.03  # a probe above the best lr stops when this far below it (validation accuracy)


def grid_factor(lrs: Sequence[float]) -> float:
    """The geometric step of a log grid: ``(max / min) ** (1 / (n - 1))``; 2 for one value."""
    values = sorted(set(lrs))
    if len(values) < 2:
        return 2.0
    return (values[-1] / values[0]) ** (1.0 / (len(values) - 1))


def probe_bar(cell: CompareCell, margin: float | None) -> float | None:
    """``stop_below`` for a probe above ``cell``'s grid: its best lr's mean validation accuracy minus
    ``margin`` (None without a margin, a best lr or a validation split)."""
    best = cell.best
    if margin is None or margin <= 0 or best is None or not best.selects_on_validation:
        return None
    return max(0.0, best.selection_score - margin)


def extensions(cell: CompareCell, base_lrs: Sequence[float], factor: float, max_extra: int = MAX_EXTRA
               ) -> list[float]:
    """The lrs to add to ``cell`` in the next round (module docstring); empty when bracketed or capped.

    ``base_lrs``: the cell's lrs before any extension (to count extensions against ``max_extra``).
    """
    if not cell.lrs or any(status == "failed" for o in cell.lrs for status in o.statuses):
        return []
    low, high = min(base_lrs), max(base_lrs)
    lrs = [o.lr for o in cell.lrs]
    added_up = sum(lr > high * (1 + 1e-9) for lr in lrs)
    added_down = sum(lr < low * (1 - 1e-9) for lr in lrs)
    new = []
    if cell.top_stable and added_up < max_extra:
        new.append(lrs[-1] * factor)
    best = cell.best
    if (best is None or best.lr == lrs[0]) and added_down < max_extra:
        new.append(lrs[0] / factor)
    return new


def bracket_lrs(
    configs: Sequence[TrainConfig],
    run: Callable[[list[TrainConfig], FollowUp], list[RunResult]],
    *,
    max_extra: int = MAX_EXTRA,
    stop_margin: float | None = STOP_MARGIN,
    on_round: Callable[[int, list[TrainConfig]], None] | None = None,
) -> tuple[list[RunResult], list[TrainConfig]]:
    """Run ``configs`` (a compare grid) and extend each cell's lr grid round by round (module docstring).

    Each cell searches on its own: the moment the last run of a cell's round completes, its next lrs
    join the sweep (``follow_up``), so they train beside other cells' base runs instead of waiting for
    the whole grid.

    Args:
        run: ``run(configs, follow_up)`` trains ``configs`` and, as each run completes, the configs
            ``follow_up(config, result)`` returns; it returns every result, ``configs``' first, then the
            follow-ups' in the order they were returned (``run_sweep(..., follow_up=...)`` over a store).
        stop_margin: the bar of probes above a cell's best lr (module docstring); None or 0: none.
        on_round: called with ``(round of that cell, new configs)`` when a cell's next round starts.

    Returns: all results and all configs (base grid first, then the additions as they were made).
    """
    configs = list(configs)
    by_cell: dict[tuple[str, int], list[TrainConfig]] = {}
    for config in configs:
        by_cell.setdefault((config.norm, config.batch_size), []).append(config)
    base = {key: sorted({c.lr for c in members}) for key, members in by_cell.items()}
    factors = {key: grid_factor(lrs) for key, lrs in base.items()}
    outstanding = {key: len(members) for key, members in by_cell.items()}  # runs of the current round
    cell_results: dict[tuple[str, int], list[RunResult]] = {key: [] for key in by_cell}
    rounds = dict.fromkeys(by_cell, 0)
    added: list[TrainConfig] = []
    queued = {c.key() for c in configs}  # a config is queued once: a repeated key would never end a round

    def follow_up(config: TrainConfig, result: RunResult) -> list[TrainConfig]:
        key = (config.norm, config.batch_size)
        cell_results[key].append(result)
        outstanding[key] -= 1
        if outstanding[key] > 0:
            return []
        new = _next_round(key, summarize_compare(cell_results[key])[0])
        if new:
            rounds[key] += 1
            if on_round is not None:
                on_round(rounds[key], new)
            outstanding[key] = len(new)
            by_cell[key] += new
            added.extend(new)
        return new

    def _next_round(key: tuple[str, int], cell: CompareCell) -> list[TrainConfig]:
        template_lr = by_cell[key][0].lr
        templates = [c for c in by_cell[key] if c.lr == template_lr]
        top = max(o.lr for o in cell.lrs)
        new = []
        for lr in extensions(cell, base[key], factors[key], max_extra):
            changes = {}
            bar = probe_bar(cell, stop_margin) if lr > top else None
            if bar is not None and all(c.budget == "auto" for c in templates):
                changes["stop_below"] = round(bar, 6)  # rounded: the same bar (and key) on a rerun
            for c in templates:
                name = run_name(c.model, c.norm, c.batch_size, lr, c.seed)
                candidate = c.replace(lr=lr, name=name, **changes)
                if candidate.key() not in queued:
                    queued.add(candidate.key())
                    new.append(candidate)
        return new

    results = list(run(configs, follow_up))
    return results, configs + added
