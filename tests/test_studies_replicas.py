"""Study ``replicas``: tiny scale writes its report; the arms map to the configs proven equivalent in
tests/test_distributed.py; the trend test (local BN's slope per log2 step of the per-replica batch,
against the margin) flips with the numbers."""

from __future__ import annotations

import html

import pytest

from normlab.studies import run_study
from normlab.studies.replicas import arm_fields, judge, slope_records, trend
from normlab.train import RunResult

P = {"global_batch": 64, "gn_groups": 4}


def test_arms_are_ghost_bn_bn_and_gn():
    assert arm_fields("local", 4, P) == {"norm": "ghost_bn", "norm_options": {"virtual_batch_size": 16}}
    assert arm_fields("local", 1, P) == {"norm": "bn"}  # one replica: local is plain BN
    assert arm_fields("sync", 4, P) == {"norm": "bn"}
    assert arm_fields("gn", 4, P) == {"norm": "gn", "norm_options": {"groups": 4}}


def _runs(accs, status="finished", gap=0.0):
    return [RunResult(status=status, final_test_acc=a, train_eval_gap=gap, config={"seed": i})
            for i, a in enumerate(accs)]


def _cells(acc_of_batch, replicas=(1, 2, 4, 8, 16, 32), g=64, noise=(0.0, 0.002, -0.002), status="converged"):
    """local BN at every R with test accuracy ``acc_of_batch(b) + noise[seed]``; sync BN the same at R = 1."""
    cells = {}
    for r in replicas:
        cells[("local", r)] = _runs([acc_of_batch(g // r) + n for n in noise], gap=-0.01)
        cells[("sync", r)] = _runs([acc_of_batch(g) + n for n in noise])
        for run in (*cells[("local", r)], *cells[("sync", r)]):
            run.convergence = status
    return cells


def test_slope_is_least_squares_per_seed_against_log2_batch():
    import math

    # Seed 0: accuracy 0.70 + 0.02 * log2(b) exactly; the other seeds add a constant: the same slope.
    cells = _cells(lambda b: 0.70 + 0.02 * math.log2(b))
    slopes = [rec["slope"] for rec in slope_records(cells, [1, 2, 4, 8, 16, 32], 64)]
    assert slopes == pytest.approx([0.02, 0.02, 0.02], abs=1e-12)
    # A hand-computed case: b = 64, 32, 16 (x = 6, 5, 4) with accuracies 0.9, 0.8, 0.8: slope = 0.05.
    three = {("local", r): _runs([a] * 3) for r, a in ((1, 0.9), (2, 0.8), (4, 0.8))}
    assert slope_records(three, [1, 2, 4], 64)[0]["slope"] == pytest.approx(0.05)


def test_trend_decides_with_the_margin_per_log2_step():
    import math

    rising = _cells(lambda b: 0.70 + 0.02 * math.log2(b))  # 2 pts per doubling
    sentence, agrees, discrepancy = judge(rising, [1, 2, 4, 8, 16, 32], 64)
    assert agrees is True and discrepancy is None
    assert ("local BN's slope beats no dependence on accuracy per doubling of the per-replica batch "
            "(batch 2 to 64) by +2.0 pts") in sentence and "margin ±1 pts" in sentence
    # The same 2 pts per doubling (no spread over seeds) inside a 3-point margin: equivalent.
    assert trend(rising, [1, 2, 4, 8, 16, 32], 64, margin=0.03).word == "equivalent"
    # 0.2 pts per doubling: inside the 1-point margin per log2 step, so equivalent: the claim disagrees.
    flat = _cells(lambda b: 0.90 + 0.002 * math.log2(b))
    sentence, agrees, discrepancy = judge(flat, [1, 2, 4, 8, 16, 32], 64)
    assert agrees is False and "is flat within the margin (±1 pts per doubling)" in discrepancy
    assert "equivalent on accuracy per doubling" in sentence
    # Seeds whose slopes spread across 0 and the margin: unresolved, inconclusive with the seeds.
    spread = _cells(lambda b: 0.90, noise=(0.0, 0.0, 0.0))
    for seed, slope in enumerate((0.03, -0.02, 0.0)):
        for r in (1, 2, 4, 8, 16, 32):
            spread[("local", r)][seed].final_test_acc = 0.8 + slope * math.log2(64 // r)
    sentence, agrees, _ = judge(spread, [1, 2, 4, 8, 16, 32], 64)
    assert agrees is None and "is unresolved" in sentence and "would resolve the slope" in sentence
    # A run that did not converge: inconclusive, with what settles it.
    sentence, agrees, _ = judge(_cells(lambda b: 0.9, status="unconverged"), [1, 2, 4, 8, 16, 32], 64)
    assert agrees is None and sentence.startswith("Inconclusive at this scale (3 run(s) of local BN's slope")
    # Two replica counts are no trend.
    assert judge(rising, [1, 32], 64)[1] is None


def test_tiny_scale_writes_its_report(tmp_path):
    outcome, files = run_study("replicas", scale="tiny", seeds=2, out=tmp_path)
    assert [t.columns[0] for t in outcome.tables] == ["arm", "replicas R"]
    rows = {(row[0], row[1]): row for row in outcome.tables[0].rows}
    # sync BN and GN are one set of runs for every R; local BN at R = 1 is that BN.
    assert rows[("sync BN", 1)][4] == rows[("sync BN", 2)][4] == rows[("local BN", 1)][4]
    assert rows[("local BN", 2)][3] == 16 and rows[("sync BN", 2)][3] == 32
    assert outcome.tables[1].rows[0][4] == "inconclusive"  # two seeds and a few steps: not a result
    page = files.html.read_text()
    assert html.escape(outcome.verdict) in page and page.count("data:image/png;base64,") == 1


def test_recipe_has_every_scale_and_quick_fits_the_budget():
    from normlab.studies import get_study

    study = get_study("replicas")
    assert set(study.scales) == {"tiny", "quick", "paper"}
    quick = study.params("quick")
    # Down to per-replica batch 2 (Table 2's sharp rise is at 4-2): R = 16 and 32 of global batch 64.
    assert quick["replicas"] == [1, 2, 4, 8, 16, 32] and quick["global_batch"] // max(quick["replicas"]) == 2


@pytest.mark.slow
def test_quick_scale_converges_and_quotes_numbers(tmp_path):
    outcome, _ = run_study("replicas", scale="quick", seeds=3, out=tmp_path)
    assert all(row[-1] == "yes" for row in outcome.tables[0].rows)  # every arm reached its plateau
    assert outcome.tables[1].rows and "train/eval gap" in outcome.verdict
