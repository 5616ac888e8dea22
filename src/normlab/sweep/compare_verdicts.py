"""The sentences of ``normlab compare`` that rank norms and batch sizes, from per-seed results, through the
one verdict rule (:func:`normlab.stats.compare_arms`, science.md section 8).

A cell (norm, batch size) is compared at its best stable lr on final test accuracy, one value per seed.
Before the rule is asked, a cell is *not a result* when no lr is stable, or its best lr sits at the grid's
edge (the optimum is not bracketed): the comparison is then inconclusive with that reason and the flag that
would settle it. Otherwise :func:`~normlab.stats.compare_arms` decides, paired over seeds when both cells ran
the same seeds (every compare cell does: same seeds, same data order, same validation split): runs that did
not converge (unconverged, stalled, diverged, failed) make it inconclusive; else the 95% interval of the
difference is read against the margin (default 1 point, ``--margin``): win, equivalent or unresolved.

Per batch size the *leader* is the conclusive cell with the highest mean accuracy; every other cell is
compared with it. A cell's verdict word: another cell's is ``loss`` (the leader wins), ``equivalent``,
``unresolved`` or ``inconclusive``; the leader's is ``win`` when it beats every other
ranked cell, ``unresolved`` when some comparison is, ``equivalent`` when the rest are equivalent, and
``inconclusive`` when no other cell could be ranked against it (never a word that claims a comparison no
rule made).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from normlab.stats import DEFAULT_MARGIN, EQUIVALENT, INCONCLUSIVE, UNRESOLVED, WIN, Verdict, compare_arms
from normlab.sweep.compare import CompareCell

LOSS = "loss"


@dataclass(frozen=True)
class Settle:
    """The flags that settle each kind of inconclusive outcome (they depend on how compare was run)."""

    unconverged: str = "--budget auto (or a larger --max-steps)"
    edge: str = "a wider --lrs grid (or a larger --lr-extensions)"
    unstable: str = "smaller learning rates in --lrs"
    seeds: str = "--seeds 3"

    def as_dict(self) -> dict[str, str]:
        return {"unconverged": self.unconverged, "stalled": self.unstable, "diverged": self.unstable,
                "failed": "a rerun (see `normlab runs show` for the error)", "unknown": "a rerun",
                "seeds": self.seeds}


def cell_problem(cell: CompareCell | None, label: str, settle: Settle) -> tuple[str, str] | None:
    """Why ``cell`` cannot be ranked before looking at its runs' statuses (no stable lr, best lr at the
    grid's edge), with the flag that settles it; None when it can."""
    if cell is None:
        return f"{label} was not run", "--norms / --batch-sizes including it"
    if cell.best is None:
        return f"{label} has no stable learning rate", settle.unstable
    if cell.best_edge is not None:
        where = "top" if cell.best_edge == "high" else "bottom"
        return f"the best lr of {label}, {cell.best.lr:.3g}, is at the {where} of its grid", settle.edge
    return None


def compare_cells(a: CompareCell | None, label_a: str, b: CompareCell | None, label_b: str,
                  settle: Settle = Settle(),  # noqa: B008 (a frozen dataclass)
                  margin: float = DEFAULT_MARGIN) -> Verdict:
    """The verdict of cell ``a`` against cell ``b`` at their best stable lrs (module docstring)."""
    for cell, label in ((a, label_a), (b, label_b)):
        problem = cell_problem(cell, label, settle)
        if problem is not None:
            nan = math.nan
            return Verdict(INCONCLUSIVE, label_a, label_b, nan, nan, nan, "", reason=problem[0],
                           settle=problem[1], margin=margin)
    best_a, best_b = a.best, b.best
    paired = best_a.seeds == best_b.seeds
    return compare_arms(
        label_a, best_a.accuracies, label_b, best_b.accuracies,
        statuses_a=best_a.convergences, statuses_b=best_b.convergences, paired=paired,
        margin=margin, settle=settle.as_dict(),
    )  # fmt: skip


def _conclusive(cell: CompareCell | None) -> bool:
    return (cell is not None and cell.best is not None and cell.best_edge is None and cell.best.converged
            and sum(math.isfinite(v) for v in cell.best.accuracies) >= 3)


@dataclass
class BatchRanking:
    """The norms at one batch size: the leader, each other norm's verdict against it, and each cell's word."""

    batch_size: int
    leader: str | None
    verdicts: dict[str, Verdict]
    words: dict[str, str]

    def sentences(self) -> list[str]:
        if self.leader is None:
            lines = [f"At batch {self.batch_size} no norm is a conclusive result (converged, bracketed lr, "
                     ">= 3 seeds)."]
        else:
            lines = [f"At batch {self.batch_size}, {self.leader} has the highest mean test accuracy "
                     f"among the conclusive cells; against each other norm:"]
        return lines + [_sentence(v) for v in self.verdicts.values()]


def _sentence(verdict: Verdict) -> str:
    if verdict.a == verdict.b:  # a cell judged on its own (nothing conclusive to compare it with)
        settle = f" To settle it: {verdict.settle}." if verdict.settle else ""
        return f"{verdict.a} is inconclusive: {verdict.reason}.{settle}"
    return verdict.sentence()


def rank_batch(grid: dict[tuple[str, int], CompareCell], norms: Sequence[str], batch_size: int,
               settle: Settle = Settle(), margin: float = DEFAULT_MARGIN) -> BatchRanking:  # noqa: B008
    """Rank ``norms`` at ``batch_size`` (module docstring)."""
    present = [n for n in norms if (n, batch_size) in grid]
    conclusive = [n for n in present if _conclusive(grid[(n, batch_size)])]
    leader = max(conclusive, key=lambda n: grid[(n, batch_size)].best.mean_accuracy, default=None)
    verdicts, words = {}, {}
    for norm in present:
        if norm == leader:
            continue
        if leader is None:
            cell = grid[(norm, batch_size)]
            label = f"{norm} at batch {batch_size}"
            verdict = compare_cells(cell, label, cell, label, settle, margin)
            if verdict.word != INCONCLUSIVE:  # itself a result; nothing conclusive to compare with
                continue
            verdicts[norm] = verdict
            words[norm] = INCONCLUSIVE
            continue
        verdict = compare_cells(grid[(leader, batch_size)], leader, grid[(norm, batch_size)], norm, settle,
                                margin)
        verdicts[norm] = verdict
        words[norm] = LOSS if verdict.word == WIN and verdict.winner == leader else verdict.word
    if leader is not None:
        words[leader] = leader_word([v.word for v in verdicts.values()])
    return BatchRanking(batch_size, leader, verdicts, words)


def leader_word(words: Sequence[str]) -> str:
    """The leader's word from its verdicts against the other cells (module docstring)."""
    ranked = [w for w in words if w != INCONCLUSIVE]
    if not ranked:
        return INCONCLUSIVE
    if all(w == WIN for w in ranked):
        return WIN
    return UNRESOLVED if UNRESOLVED in ranked else EQUIVALENT


def batch_sensitivity(grid: dict[tuple[str, int], CompareCell], norms: Sequence[str], batches: Sequence[int],
                      settle: Settle = Settle(),  # noqa: B008
                      margin: float = DEFAULT_MARGIN) -> tuple[dict[str, Verdict], list[str]]:
    """Per norm, accuracy at the smallest batch size against the largest (paired over seeds), and the
    sentences: each norm's verdict, then the most sensitive norm among those whose change is a win (its
    interval excludes 0), or that none is."""
    if len(batches) < 2:
        return {}, ["One batch size only: no sensitivity to report."]
    small, large = batches[0], batches[-1]
    verdicts = {
        n: compare_cells(grid.get((n, small)), f"{n} at batch {small}", grid.get((n, large)),
                         f"{n} at batch {large}", settle, margin)
        for n in norms
    }
    lines = [v.sentence() for v in verdicts.values()]
    significant = {n: v for n, v in verdicts.items() if v.word == WIN}
    unsettled = [n for n, v in verdicts.items() if v.word == INCONCLUSIVE]
    if significant:
        most = max(significant, key=lambda n: abs(significant[n].diff))
        diff = significant[most].diff
        lines.append(f"Most sensitive to the batch size: {most} ({100 * diff:+.1f} pts from batch {large} to "
                     f"{small}), the largest change whose 95% interval excludes 0 and is not inside the "
                     "margin"
                     + (f"; {', '.join(unsettled)} inconclusive." if unsettled else "."))
    else:
        lines.append("No norm's accuracy changes with the batch size by more than the margin, beyond the "
                     "seeds' spread"
                     + (f" (inconclusive: {', '.join(unsettled)})." if unsettled else "."))
    return verdicts, lines


def cell_words(grid: dict[tuple[str, int], CompareCell], norms: Sequence[str], batches: Sequence[int],
               settle: Settle = Settle(),  # noqa: B008
               margin: float = DEFAULT_MARGIN) -> dict[tuple[str, int], str]:
    """Each cell's verdict word at its batch size (win / loss / equivalent / unresolved / inconclusive)."""
    words = {}
    for b in batches:
        for norm, word in rank_batch(grid, norms, b, settle, margin).words.items():
            words[(norm, b)] = word
    return words
