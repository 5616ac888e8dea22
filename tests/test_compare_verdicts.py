"""The sentences compare writes from per-seed results (normlab.sweep.compare_verdicts, through
normlab.stats.compare_arms): win / equivalent / unresolved / inconclusive against the margin on
constructed results, no training."""

import math

import pytest
from scipy import stats

from normlab.sweep import summarize_compare
from normlab.sweep.compare_verdicts import Settle, batch_sensitivity, cell_words, rank_batch
from normlab.train import RunResult


def runs(norm, batch, accs, convergence="converged", best_lr=0.04, edge=False):
    """A cell bracketed around ``best_lr`` (a worse lr below, a diverged one above) with ``accs`` per seed
    at the best lr; ``edge=True`` leaves the best lr at the top of the grid (no diverged lr above)."""
    out = []
    for seed, acc in enumerate(accs):
        conv = convergence[seed] if isinstance(convergence, list) else convergence
        for lr, a, status in ((best_lr / 4, acc - 0.1, "finished"), (best_lr, acc, "finished"),
                              (best_lr * 4, math.nan, "diverged")):
            if edge and status == "diverged":
                continue
            out.append(RunResult(
                status=status, final_test_acc=a, final_val_acc=a, steps=1000,
                convergence=conv if status == "finished" else "diverged",
                config={"norm": norm, "batch_size": batch, "lr": lr, "seed": seed},
            ))  # fmt: skip
    return out


def grid_of(results):
    cells = summarize_compare(results)
    return {(c.norm, c.batch_size): c for c in cells}, list(dict.fromkeys(c.norm for c in cells))


def test_win_is_a_paired_interval_excluding_zero():
    grid, norms = grid_of(runs("bn", 16, [0.950, 0.955, 0.960]) + runs("gn", 16, [0.900, 0.903, 0.912]))
    ranking = rank_batch(grid, norms, 16)
    assert ranking.leader == "bn" and ranking.words == {"bn": "win", "gn": "loss"}
    diffs = [0.050, 0.052, 0.048]
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / math.sqrt(3)
    (sentence,) = [v.sentence() for v in ranking.verdicts.values()]
    assert sentence == (f"bn beats gn on test accuracy by +5.0 pts (95% CI {100 * (0.05 - half):+.1f} to "
                        f"{100 * (0.05 + half):+.1f} pts, paired t over 3 seeds; margin ±1 pts).")


def test_unresolved_when_the_interval_includes_zero_and_reaches_past_the_margin():
    grid, norms = grid_of(runs("bn", 16, [0.95, 0.90, 0.93]) + runs("gn", 16, [0.92, 0.94, 0.91]))
    ranking = rank_batch(grid, norms, 16)
    # Nothing was decided: the leader is not called a tie (or a win), but unresolved like its rival.
    assert ranking.words == {"bn": "unresolved", "gn": "unresolved"}
    (verdict,) = ranking.verdicts.values()
    assert verdict.word == "unresolved"
    sentence = verdict.sentence()
    assert sentence.startswith("bn vs gn on test accuracy is unresolved: difference +0.3 pts (95% CI ")
    assert ", paired t over 3 seeds; margin ±1 pts), which includes 0 and reaches past the margin" in sentence


def test_equivalent_cells_and_the_leader_word():
    # Paired differences +0.3, +0.4, +0.5 pts: the interval excludes 0 but lies inside +-1 pt.
    grid, norms = grid_of(runs("bn", 128, [0.963, 0.955, 0.963]) + runs("gn", 128, [0.960, 0.951, 0.958])
                          + runs("none", 128, [0.90, 0.91, 0.905]))
    ranking = rank_batch(grid, norms, 128)
    assert ranking.words == {"bn": "equivalent", "gn": "equivalent", "none": "loss"}
    assert ranking.verdicts["gn"].sentence().startswith(
        "bn and gn are equivalent on test accuracy within ±1 pts: difference +0.4 pts (95% CI +0.2 to +0.6")
    # A 0.1-pt margin makes the same difference a win for bn, so bn wins the batch size outright.
    narrow = rank_batch(grid, norms, 128, margin=0.001)
    assert narrow.words == {"bn": "win", "gn": "loss", "none": "loss"}


def test_unconverged_cell_is_inconclusive_with_the_flag_that_settles_it():
    settle = Settle(unconverged="--max-steps 6000")
    grid, norms = grid_of(runs("bn", 16, [0.95, 0.955, 0.96])
                          + runs("gn", 16, [0.99, 0.99, 0.99], ["converged", "unconverged", "converged"]))
    ranking = rank_batch(grid, norms, 16, settle)
    # gn has the higher mean but is not a result: bn leads among the conclusive cells.
    # Nothing else could be ranked against the leader: its word says so, not "tie".
    assert ranking.leader == "bn" and ranking.words == {"bn": "inconclusive", "gn": "inconclusive"}
    assert ranking.verdicts["gn"].sentence() == (
        "bn vs gn on test accuracy is inconclusive: 1 run(s) of gn had not converged when the budget ended. "
        "To settle it: --max-steps 6000.")


def test_best_lr_at_the_grid_edge_is_inconclusive():
    grid, norms = grid_of(runs("bn", 16, [0.95, 0.955, 0.96]) + runs("gn", 16, [0.90, 0.91, 0.92], edge=True))
    verdict = rank_batch(grid, norms, 16, Settle(edge="--lr-extensions 4")).verdicts["gn"]
    assert verdict.word == "inconclusive"
    assert verdict.sentence() == ("bn vs gn on test accuracy is inconclusive: the best lr of gn, 0.04, is at "
                                  "the top of its grid. To settle it: --lr-extensions 4.")


def test_no_conclusive_cell():
    grid, norms = grid_of(runs("bn", 16, [0.95, 0.955, 0.96], "unconverged"))
    ranking = rank_batch(grid, norms, 16)
    assert ranking.leader is None and ranking.words == {"bn": "inconclusive"}
    assert ranking.sentences()[1] == ("bn at batch 16 is inconclusive: 3 run(s) of bn at batch 16 had not "
                                      "converged when the budget ended. To settle it: --budget auto (or a "
                                      "larger --max-steps).")


def test_batch_sensitivity_names_only_a_significant_change():
    results = (runs("bn", 16, [0.90, 0.905, 0.91]) + runs("bn", 128, [0.95, 0.956, 0.96])
               + runs("gn", 16, [0.94, 0.93, 0.95]) + runs("gn", 128, [0.95, 0.92, 0.94]))
    grid, norms = grid_of(results)
    verdicts, lines = batch_sensitivity(grid, norms, [16, 128])
    assert verdicts["bn"].word == "win" and verdicts["gn"].word == "unresolved"
    assert lines[0].startswith("bn at batch 128 beats bn at batch 16 on test accuracy by +5.0 pts")
    assert lines[-1] == ("Most sensitive to the batch size: bn (-5.0 pts from batch 128 to 16), the largest "
                         "change whose 95% interval excludes 0 and is not inside the margin.")
    # gn's 1-pt change is not named, even though it is a change: its interval includes 0.
    results = runs("gn", 16, [0.94, 0.93, 0.95]) + runs("gn", 128, [0.95, 0.92, 0.94])
    grid, norms = grid_of(results)
    assert batch_sensitivity(grid, norms, [16, 128])[1][-1] == (
        "No norm's accuracy changes with the batch size by more than the margin, beyond the seeds' spread.")


def test_cell_words_per_batch():
    results = (runs("bn", 16, [0.90, 0.905, 0.91]) + runs("gn", 16, [0.95, 0.951, 0.958])
               + runs("bn", 128, [0.95, 0.956, 0.96]) + runs("gn", 128, [0.95, 0.92, 0.94]))
    grid, norms = grid_of(results)
    assert cell_words(grid, norms, [16, 128]) == {
        ("gn", 16): "win", ("bn", 16): "loss", ("bn", 128): "unresolved", ("gn", 128): "unresolved",
    }
    assert pytest.approx(grid[("gn", 16)].best.mean_accuracy) == 0.953
