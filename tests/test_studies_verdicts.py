"""Every study's verdict from constructed per-seed results: the shared rule against a margin (win /
equivalent / unresolved / inconclusive, ``normlab.stats.compare_arms``) decides, an arm that did not
converge makes the study inconclusive, and the sentence quotes the numbers. No training here: the results
are built by hand."""

from __future__ import annotations

import math

import pytest

from normlab.stats import t_quantile_975
from normlab.studies import (
    _verdict,
    large_batch,
    mean_shift,
    noisy_bn,
    normalizer_free,
    regularization,
    residual,
    small_batch,
)
from normlab.train.result import RunResult


def run(acc: float = 0.9, convergence: str = "converged", **fields) -> RunResult:
    status = "finished" if convergence in ("converged", "unconverged", "stalled") else convergence
    reason = {"converged": "plateau"}.get(convergence, f"{convergence}: training loss still falling")
    return RunResult(status=status, final_test_acc=acc, convergence=convergence, convergence_reason=reason,
                     **fields)


def runs(*accs: float, convergence: str = "converged", **fields) -> list[RunResult]:
    return [run(a, convergence, **fields) for a in accs]


# -- the shared rule on runs ------------------------------------------------------------------------


def test_decide_paired_interval_and_winner():
    a, b = runs(0.90, 0.92, 0.94), runs(0.80, 0.81, 0.85)
    verdict = _verdict.decide("bn", a, "gn", b)
    diffs = [0.10, 0.11, 0.09]
    half = t_quantile_975(2) * 0.01 / math.sqrt(3)
    assert verdict.word == "win" and verdict.winner == "bn"
    assert verdict.diff == pytest.approx(sum(diffs) / 3)
    assert verdict.high - verdict.low == pytest.approx(2 * half)
    spread = _verdict.decide("bn", runs(0.90, 0.80, 0.95), "gn", runs(0.85, 0.90, 0.88))
    assert spread.word == "unresolved" and spread.seeds is not None and spread.seeds > 3
    assert spread.settle == f"--seeds {spread.seeds}"
    # Differences +0.2, +0.4, +0.3 pts: the interval excludes 0 yet lies inside the 1-point margin.
    close = _verdict.decide("bn", runs(0.902, 0.914, 0.923), "gn", runs(0.90, 0.91, 0.92))
    assert close.word == "equivalent" and close.low > 0 and close.high < 0.01
    assert _verdict.decide("bn", runs(0.902, 0.914, 0.923), "gn", runs(0.90, 0.91, 0.92),
                           margin=0.004).word == "win"


def test_decide_refuses_an_arm_that_did_not_train():
    untrained = runs(0.3, 0.3, 0.3, convergence="unconverged")
    verdict = _verdict.decide("bn", runs(0.9, 0.9, 0.9), "none", untrained)
    assert verdict.word == "inconclusive"
    assert verdict.reason == "3 run(s) of none had not converged when the budget ended"
    assert "longer budget" in verdict.settle
    stalled = _verdict.decide("bn", runs(0.9, 0.9, 0.9), "none", runs(0.1, 0.1, 0.1, convergence="stalled"))
    assert stalled.reason == "3 run(s) of none stalled at chance level"
    two = _verdict.decide("bn", runs(0.9, 0.9), "none", runs(0.3, 0.3))
    assert two.word == "inconclusive" and "at least 3 seeds" in two.reason


def test_training_gate_names_each_arm_and_its_reason():
    assert _verdict.training_gate({"bn": runs(0.9, 0.9)}) is None
    text = _verdict.training_gate({"bn": runs(0.9), "none": [run(0.3, "unconverged"), run(0.1, "diverged")]})
    assert text == ("not every arm trained to a result: none: 1 unconverged, 1 diverged of 2 run(s) "
                    "(unconverged: training loss still falling)")


def test_agreement_word_and_ci_text():
    words = [_verdict.agreement_word(v) for v in (True, False, None)]
    assert words == ["agrees", "disagrees", "inconclusive"]
    assert _verdict.ci_text([0.9, 0.9, 0.9]) == "90.0 ± 0.0%"
    assert _verdict.ci_text([math.nan]) == "n/a"


# Santurkar et al.'s studies (noisy-bn, ics, landscape): tests/test_studies_santurkar.py.


# -- grid studies ----------------------------------------------------------------------------------


def gap_runs(test: float, spread=(0.0, 0.002, -0.002), convergence: str = "converged", train: float = 1.0):
    return [run(test + d, convergence, final_train_acc=train) for d in spread]


def test_regularization_decides_on_the_statistics_batch():
    # Gaps 4.0 pts at statistics batch 8, 6.0 at 256 (paired seeds, same spread): a 2-point win.
    chosen = {"BN/8": gap_runs(0.96), "BN/32": gap_runs(0.95), "BN/256": gap_runs(0.94), "GN": gap_runs(0.95)}
    sentence, agrees, discrepancy, key = regularization.judge(chosen, "gn")
    assert agrees is True and discrepancy is None
    assert key == ("train/test gap: BN/8 4.0 ± 0.5 pts, BN/32 5.0 ± 0.5 pts, BN/256 6.0 ± 0.5 pts, "
                   "GN 5.0 ± 0.5 pts")
    assert ("BN/256 beats BN/8 on train/test gap (the larger: less regularized; statistics batch 256 vs 8) "
            "by +2.0 pts") in sentence
    # Equal gaps within the margin: equivalent, the win claim disagrees.
    flat = {**chosen, "BN/256": gap_runs(0.958)}
    _, agrees, discrepancy, _ = regularization.judge(flat, "gn")
    assert agrees is False and "are equal within the margin (±1 pts" in discrepancy
    # The reverse (the small statistics batch generalizes worse): disagrees, named.
    reverse = {**chosen, "BN/8": gap_runs(0.92)}
    _, agrees, discrepancy, _ = regularization.judge(reverse, "gn")
    assert agrees is False and "larger at the small statistics batch" in discrepancy
    # Seeds that spread across 0 and the margin: unresolved, inconclusive with the seeds.
    spread = {**chosen, "BN/256": gap_runs(0.955, spread=(0.02, -0.02, 0.0))}
    sentence, agrees, _, _ = regularization.judge(spread, "gn")
    assert agrees is None and "is unresolved" in sentence and "to settle it: --seeds " in sentence
    # An unconverged BN arm is not a result.
    under = {**chosen, "BN/256": gap_runs(0.94, convergence="unconverged")}
    sentence, agrees, _, _ = regularization.judge(under, "gn")
    assert agrees is None and "3 run(s) of BN/256 had not converged" in sentence


def test_regularization_stalled_control_never_blocks_the_verdict():
    chosen = {"BN/8": gap_runs(0.96), "BN/256": gap_runs(0.94),
              "GN": gap_runs(0.1, convergence="stalled", train=0.1)}
    sentence, agrees, discrepancy, _ = regularization.judge(chosen, "gn")
    assert agrees is True and discrepancy is None
    assert "GN, without batch statistics, has 0.0 ± 0.5 pts (GN: 3 stalled of 3 run(s)" in sentence
    assert "a control: reported, not gating)." in sentence
    assert regularization.judge({"BN/8": gap_runs(0.96), "GN": gap_runs(0.9)})[1] is None


def test_regularization_arms_and_bad_statistics_batches():
    from normlab.errors import NormlabError

    ghost = {"norm": "ghost_bn", "norm_options": {"virtual_batch_size": 8}}
    assert regularization.stat_fields(8, 256) == ghost
    assert regularization.stat_fields(256, 256) == {"norm": "bn"}
    with pytest.raises(NormlabError, match=r"stat_batches \[8, 48\] must be two or more divisors \(>= 2\) "
                                           r"of batch_size 256; bad: \[48\]"):
        regularization.check_params({"stat_batches": [8, 48], "batch_size": 256, "lrs": [0.1]})


def test_small_batch_compares_error_rise_over_table_2_range():
    def cell(acc: float, convergence: str = "converged"):
        rs = [run(acc + d, convergence) for d in (0.0, 0.01, -0.01)]
        return rs, [(r.final_test_acc, r.final_test_acc) for r in rs]

    spec = {("bn", 2): cell(0.70), ("bn", 32): cell(0.80), ("bn", 128): cell(0.60),
            ("gn", 2): cell(0.795), ("gn", 32): cell(0.80), ("gn", 128): cell(0.50)}
    cells = {k: v[0] for k, v in spec.items()}
    metrics = {k: v[1] for k, v in spec.items()}
    sentence, agrees, _, key = small_batch.judge(cells, metrics, ["bn", "gn"], [2, 32, 128])
    # Batch 128 lies outside Group Norm's Table 2: the verdict uses 32 -> 2.
    assert agrees is True and key.startswith("test error batch 32 -> 2: BN 20.0 ± ")
    assert "BN beats GN on error rise (batch 32 -> 2) by +9.5 pts" in sentence
    spec[("gn", 2)] = cell(0.60)
    cells, metrics = {k: v[0] for k, v in spec.items()}, {k: v[1] for k, v in spec.items()}
    _, agrees, discrepancy, _ = small_batch.judge(cells, metrics, ["bn", "gn"], [2, 32, 128])
    assert agrees is False and "does not exceed GN's" in discrepancy
    # Equal rises (both +10 pts, per seed): equivalent within the margin, while Table 2's own effect over
    # 32 -> 2 is 11.1 pts: a disagreement.
    spec[("gn", 2)] = cell(0.70)
    cells, metrics = {k: v[0] for k, v in spec.items()}, {k: v[1] for k, v in spec.items()}
    sentence, agrees, discrepancy, _ = small_batch.judge(cells, metrics, ["bn", "gn"], [2, 32, 128])
    assert agrees is False and "are equivalent on error rise (batch 32 -> 2) within ±1 pts" in sentence
    # Over 32 -> 8, Table 2's effect (BN +1.2 minus GN -0.1 = 1.3 pts) is past a 1-point margin but inside
    # a 2-point one: equivalence there cannot test the claim.
    spec8 = {("bn", 8): cell(0.70), ("bn", 32): cell(0.80), ("gn", 8): cell(0.70), ("gn", 32): cell(0.80)}
    cells8, metrics8 = {k: v[0] for k, v in spec8.items()}, {k: v[1] for k, v in spec8.items()}
    assert small_batch.judge(cells8, metrics8, ["bn", "gn"], [8, 32])[1] is False
    sentence, agrees, _, _ = small_batch.judge(cells8, metrics8, ["bn", "gn"], [8, 32], margin=0.02)
    assert agrees is None and "lies inside the margin (±2 pts)" in sentence
    # Rises that spread across the margin: unresolved, inconclusive with the seeds that would resolve it.
    spread = {**spec, ("gn", 2): ([run(a) for a in (0.70, 0.74, 0.66)], [(a, a) for a in (0.70, 0.74, 0.66)])}
    cells, metrics = {k: v[0] for k, v in spread.items()}, {k: v[1] for k, v in spread.items()}
    sentence, agrees, _, _ = small_batch.judge(cells, metrics, ["bn", "gn"], [2, 32, 128])
    assert agrees is None and "is unresolved" in sentence and "to settle it: --seeds " in sentence


def lr_summary(best, largest, accs, convergence="converged", diverged=0):
    best_runs = runs(*accs, convergence=convergence) if best is not None else []
    return {"best_lr": best, "largest_stable_lr": largest, "best_runs": best_runs, "diverged": diverged,
            "runs": 6, "acc": (math.nan, math.nan), "steps_per_s": (100.0, 1.0), "failed": 0}


def test_normalizer_free_matches_bn_by_the_rule():
    good = {"bn": lr_summary(0.2, 0.8, (0.90, 0.91, 0.89)), "nf": lr_summary(0.8, 3.2, (0.902, 0.911, 0.891)),
            "none": lr_summary(0.05, 0.2, (0.85, 0.84, 0.86), diverged=6)}
    sentence, agrees, discrepancy, key = normalizer_free.judge(good)
    assert agrees is True and discrepancy is None
    assert "NF+AGC and BN are equivalent on test accuracy within ±1 pts" in sentence
    assert sentence.endswith("stable up to lr 3.2.")
    assert key.startswith("BN-ResNet 90.0 ± 2.5% at lr 0.2; NF-ResNet+AGC 90.1 ± 2.5% at lr 0.8")
    short = {**good, "nf": lr_summary(0.8, 3.2, (0.60, 0.61, 0.59))}
    _, agrees, discrepancy, _ = normalizer_free.judge(short)
    assert agrees is False and "falls short of BN's beyond the margin of ±1 pts" in discrepancy
    # Differences +0.5, -1.0, +0.5 pts: the interval crosses 0 and reaches past 1 point: unresolved, so
    # inconclusive with the seeds that would resolve it (never "matches" nor "falls short").
    spread = {**good, "nf": lr_summary(0.8, 3.2, (0.905, 0.90, 0.895))}
    sentence, agrees, _, _ = normalizer_free.judge(spread)
    assert agrees is None and "is unresolved" in sentence and "to settle it: --seeds " in sentence
    # A wider margin makes the same seeds equivalent.
    assert normalizer_free.judge(spread, margin=0.03)[1] is True
    # The issue's 120-step NF arm: not converged, so no "falls short" verdict.
    budget = {**good, "nf": lr_summary(0.8, 3.2, (0.589, 0.59, 0.58), convergence="unconverged")}
    sentence, agrees, _, _ = normalizer_free.judge(budget)
    assert agrees is None and sentence.startswith("Inconclusive at this scale (3 run(s) of NF+AGC")


def test_large_batch_decides_stability_and_accuracy_equivalence():
    def cell(best, largest, accs, top=6.4):
        return {**lr_summary(best, largest, accs), "grid_top": top}

    # NF+AGC stable to 1.6 like BN, NF without AGC only to 0.4; accuracies within +-1 pt: agrees.
    ok = {("bn", 1024): cell(1.6, 1.6, (0.90, 0.91, 0.89)),
          ("nf", 1024): cell(0.4, 1.6, (0.902, 0.911, 0.891)),
          ("nf_noagc", 1024): cell(0.4, 0.4, (0.88, 0.89, 0.87))}
    sentence, agrees, discrepancy, key = large_batch.judge(ok, 1024)
    assert agrees is True and discrepancy is None
    assert "NF+AGC and BN are equivalent on test accuracy within ±1 pts" in sentence
    assert key.startswith("batch 1024: BN largest stable lr 1.6, 90.0 ± 2.5%; NF+AGC largest stable lr 1.6")
    # AGC changes nothing: NF with and without it stable to the same lr: the stability claim disagrees.
    same = {**ok, ("nf_noagc", 1024): cell(0.4, 1.6, (0.88, 0.89, 0.87))}
    _, agrees, discrepancy, _ = large_batch.judge(same, 1024)
    assert agrees is False
    assert discrepancy == "NF+AGC is stable up to lr 1.6, NF without AGC up to 1.6 (see acc_vs_lr)."
    # NF+AGC below BN's stability, and BN's accuracy beyond the margin: both named.
    bad = {**ok, ("nf", 1024): cell(0.4, 0.4, (0.80, 0.81, 0.79)),
           ("nf_noagc", 1024): cell(0.1, 0.1, (0.8,) * 3)}
    _, agrees, discrepancy, _ = large_batch.judge(bad, 1024)
    assert agrees is False and "NF+AGC is stable up to lr 0.4, BN up to 1.6" in discrepancy
    assert "NF+AGC's best accuracy falls short of BN's beyond the margin of ±1 pts" in discrepancy
    # Both NF arms stable at the top of the grid: the grid never reached instability, no stability verdict.
    top = {**ok, ("nf", 1024): cell(0.4, 6.4, (0.902, 0.911, 0.891)),
           ("nf_noagc", 1024): cell(0.4, 6.4, (0.88, 0.89, 0.87)), ("bn", 1024): cell(1.6, 6.4, (0.9,) * 3)}
    sentence, agrees, _, _ = large_batch.judge(top, 1024)
    assert agrees is None and "both at or above the top of the grid (>= 6.4 (top of grid)" in sentence
    # Accuracies that spread across the margin: unresolved, inconclusive with the seeds.
    spread = {**ok, ("nf", 1024): cell(0.4, 1.6, (0.905, 0.90, 0.895))}
    sentence, agrees, _, _ = large_batch.judge(spread, 1024)
    assert agrees is None and "is unresolved" in sentence and "to settle it: --seeds " in sentence
    assert large_batch.judge({("bn", 1024): ok[("bn", 1024)]}, 1024)[1] is None


# -- measurement studies (no training: every value is a result) --------------------------------------


def test_mean_shift_verdict_by_seed():
    def model(sq, var, cos):
        return {"avg_sq_mean": [sq], "avg_var": [var], "final_cosine": cos, "collapse": 0.5}

    def seeds(sq, var, cos):
        return [model(sq * f, var, cos * f) for f in (1.0, 0.98, 1.01)]

    results = {"none": {8: seeds(0.5, 1.0, 0.5), 56: seeds(100.0, 1.0, 0.95)},
               "bn": {8: seeds(0.2, 1.0, 0.3), 56: seeds(0.3, 1.0, 0.3)}}
    summary = mean_shift.summarize(results)
    sentence, agrees, discrepancy, key = mean_shift.verdict(summary, results)
    assert agrees is True and discrepancy is None and key.startswith("depth 56: avg_sq_mean none 99.7 ±")
    flipped = {"none": results["bn"], "bn": results["none"]}
    _, agrees, discrepancy, _ = mean_shift.verdict(mean_shift.summarize(flipped), flipped)
    assert agrees is False
    assert "not shown that the unnormalized net's mean-shift share is above BN's" in discrepancy


def test_residual_judge_exponent_interval_and_branch_ratio():
    depths = [8, 32, 128]

    def ratios(exponent, scale=1.0):
        return {d: [[scale * f * d**exponent] for f in (1.0, 1.01, 0.99)] for d in depths}

    measured = {"bn": ratios(-0.5), "none": ratios(0.0, 2.0)}
    _, agrees, discrepancy, key = residual.judge(depths, measured, {"skipinit": runs(0.9, 0.9, 0.9)})
    assert agrees is True and discrepancy is None and key.startswith("BN exponent -0.5")
    flat = {"bn": ratios(0.0, 3.0), "none": ratios(0.0, 2.0)}
    _, agrees, discrepancy, _ = residual.judge(depths, flat, {})
    assert agrees is False and "lies outside [-0.75, -0.25]" in discrepancy
    assert "branch ratio is not above BN's" in discrepancy
    sentence, agrees, _, _ = residual.judge(depths, measured, {"skipinit": runs(0.2, 0.2, 0.2,
                                                                                convergence="stalled")})
    assert agrees is None and "SkipInit: 3 stalled of 3 run(s)" in sentence
    # Every trained arm is gated, not only SkipInit: an unconverged BN arm makes the study inconclusive.
    trained = {"bn": runs(0.98, 0.97, 0.98, convergence="unconverged"), "skipinit": runs(0.9, 0.9, 0.9)}
    sentence, agrees, _, _ = residual.judge(depths, measured, trained)
    assert agrees is None and "BN: 3 unconverged of 3 run(s)" in sentence and "SkipInit" not in sentence
    # The unnormalized arm is the counterexample the claim expects to fail: a stalled seed of it is reported,
    # the verdict still drawn from BN and SkipInit.
    trained = {"bn": runs(0.98, 0.97, 0.98), "skipinit": runs(0.97, 0.97, 0.98),
               "none": runs(0.97, 0.97) + runs(0.1, convergence="stalled")}
    sentence, agrees, discrepancy, _ = residual.judge(depths, measured, trained)
    assert agrees is True and discrepancy is None
    assert sentence.endswith("Unnormalized, without SkipInit: no norm: 1 stalled of 3 run(s) (stalled: "
                             "training loss still falling); the instability SkipInit removes, not gated (no "
                             "comparison uses its accuracy).")


def test_largest_stable_lr_at_the_top_of_the_grid_is_a_lower_bound():
    from normlab.studies._grid import largest_text

    assert largest_text({"largest_stable_lr": 1.6, "grid_top": 1.6}) == ">= 1.6 (top of grid)"
    assert largest_text({"largest_stable_lr": 0.4, "grid_top": 1.6}) == "0.4"
    assert largest_text({"largest_stable_lr": None, "grid_top": 1.6}) == "none"
    top = {("bn", 512): {**lr_summary(1.0, 3.0, (0.90, 0.91, 0.89)), "grid_top": 3.0},
           ("nf", 512): {**lr_summary(1.0, 3.0, (0.902, 0.911, 0.891)), "grid_top": 3.0},
           ("nf_noagc", 512): {**lr_summary(0.1, 0.3, (0.80, 0.81, 0.79)), "grid_top": 3.0},
           ("none", 512): {**lr_summary(0.1, 0.3, (0.80, 0.81, 0.79)), "grid_top": 3.0}}
    sentence, agrees, _, _ = large_batch.judge(top, 512)
    assert "BN largest stable lr >= 3 (top of grid)" in sentence
    assert "no norm largest stable lr 0.3" in sentence
    # NF+AGC at the top, NF without AGC below it: ordered (AGC helps); NF+AGC and BN both at the top:
    # no order, so the stability half cannot decide.
    assert agrees is None and "NF+AGC's and BN's largest stable lrs are both at or above the top" in sentence


# -- noisy-bn's eval: the expected training-time layer ---------------------------------------------


def test_expected_layers_scale_noisy_bn_and_noise_by_e_s():
    import torch

    from normlab.layers import create_norm

    torch.manual_seed(0)
    for norm in ("noisy_bn", "noise"):
        layer = create_norm(norm, 6, dims=1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 6), layer, torch.nn.Linear(6, 3))
        x = torch.randn(64, 5)
        model.train()(x)  # running statistics move off their initial values
        model.eval()
        hidden = model[0](x)
        if norm == "noisy_bn":
            bn = model[1]
            plain = torch.nn.functional.batch_norm(hidden, bn.running_mean, bn.running_var, bn.weight,
                                                   bn.bias, False, 0.0, bn.eps)
        else:
            plain = hidden
        dropped = model[1](hidden)
        added = noisy_bn.expected_layers(model)
        expected = model[1](hidden)
        if torch.allclose(dropped, plain, atol=1e-5):  # today's layer drops the noise: the hook adds E[s]
            assert added == 1
            torch.testing.assert_close(expected, 1.125 * plain)
        else:  # the layer evaluates as its expectation itself: no second scaling
            assert added == 0
            torch.testing.assert_close(expected, dropped)


def test_mean_shift_growth_is_compared_on_a_log_scale():
    # One seed's mean shift explodes (as at depth 110): on the raw scale the spread hides the growth.
    def seeds(values):
        return [{"avg_sq_mean": [v], "avg_var": [1.0], "final_cosine": c, "collapse": 0.5}
                for v, c in zip(values, (0.9, 0.92, 0.91), strict=True)]

    results = {"none": {8: seeds([0.1, 0.2, 0.15]), 110: seeds([1e14, 1e12, 1e13])},
               "bn": {8: [dict(r, final_cosine=0.3) for r in seeds([0.2, 0.2, 0.2])],
                      110: [dict(r, final_cosine=0.3) for r in seeds([0.3, 0.3, 0.3])]}}
    _, agrees, discrepancy, _ = mean_shift.verdict(mean_shift.summarize(results), results)
    assert agrees is True, discrepancy


def test_small_batch_unresolved_within_table_2_range_gives_the_seeds():
    """Recalibrated variants trained at the smallest batch only (recalibrate_batches); rises over 32 -> 8
    whose interval crosses 0 and the margin are unresolved: inconclusive with the seeds that resolve them."""
    def cell(acc: float, spread: float):
        rs = [run(acc + d, "converged") for d in (0.0, spread, -spread)]
        return rs, [(r.final_test_acc, r.final_test_acc) for r in rs]

    spec = {("bn", 8): cell(0.62, 0.03), ("bn", 16): cell(0.63, 0.01), ("bn", 32): cell(0.63, 0.01),
            ("gn", 8): cell(0.56, 0.01), ("gn", 16): cell(0.56, 0.01), ("gn", 32): cell(0.57, 0.01),
            ("evalnorm", 8): cell(0.60, 0.01), ("precise_bn", 8): cell(0.61, 0.01)}
    cells, metrics = {k: v[0] for k, v in spec.items()}, {k: v[1] for k, v in spec.items()}
    variants = ["bn", "gn", "evalnorm", "precise_bn"]
    sentence, agrees, discrepancy, key = small_batch.judge(cells, metrics, variants, [8, 16, 32])
    # The interval (±5 pts) crosses 0 and the margin: unresolved, inconclusive with the seeds to resolve it.
    assert agrees is None and discrepancy is None and key.startswith("test error batch 32 -> 8")
    assert sentence.startswith("Inconclusive at this scale (BN vs GN on error rise is unresolved: difference "
                               "+0.0 pts (95% CI -5.0 to +5.0 pts")
    assert "to settle it: --seeds " in sentence
