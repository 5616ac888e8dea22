"""Santurkar et al.'s three studies (ics, landscape, noisy-bn): matched training-loss bands, the trajectory
gate, and each verdict at chosen values. No training: records are built by hand, so every number the
verdicts read is known, and each test flips the numbers to flip the word."""

from __future__ import annotations

import math

import pytest

from normlab.errors import NormlabError
from normlab.stats import t_quantile_975
from normlab.studies import _bands, ics, landscape, noisy_bn
from normlab.studies._santurkar import longer_budget
from normlab.studies._verdict import SETTLE

BANDS = [(2.0, 1.0), (1.0, 0.5), (0.5, 0.05)]

# -- bands -------------------------------------------------------------------------------------------


def test_smoothed_loss_averages_the_window_before_the_step():
    loss = [(10, 2.0), (20, 1.0), (30, 0.6), (40, 0.2)]
    assert _bands.smoothed_loss(loss, 30, 20) == pytest.approx((1.0 + 0.6) / 2)  # steps 20, 30 in (10, 30]
    assert _bands.smoothed_loss(loss, 35, 10) == pytest.approx(0.6)
    assert math.isnan(_bands.smoothed_loss(loss, 5, 5))


def test_band_index_is_half_open_from_the_top():
    # [2, 1): from 2 down to, not including, 1.
    assert _bands.band_index(2.0, BANDS) == 0
    assert _bands.band_index(2.001, BANDS) is None
    assert _bands.band_index(1.0, BANDS) == 1
    assert _bands.band_index(0.5001, BANDS) == 1
    assert _bands.band_index(0.05, BANDS) is None
    assert _bands.band_index(0.051, BANDS) == 2
    assert _bands.band_index(math.nan, BANDS) is None


def test_band_means_file_each_probe_by_its_runs_loss():
    # Logged losses every 10 steps; window 10: the loss at a probe is the log at its own step.
    loss = [(10, 2.5), (20, 1.5), (30, 1.2), (40, 0.7), (50, 0.3), (60, 0.01)]
    values = [(10, 9.0), (20, 1.0), (30, 3.0), (40, 5.0), (50, 7.0), (60, 100.0)]
    means, counts = _bands.band_means(values, loss, BANDS, 10)
    assert means == [pytest.approx(2.0), pytest.approx(5.0), pytest.approx(7.0)]
    assert counts == [2, 1, 1]  # step 10 is above every band, step 60 below (post-convergence)
    assert _bands.matched_mean(means) == pytest.approx((2.0 + 5.0 + 7.0) / 3)
    assert _bands.phase_mean(values, loss, 0.05, 10) == pytest.approx(100.0)
    # A band without a probe: no matched value, never a mean over the bands that happen to exist.
    means, counts = _bands.band_means(values[:3], loss, BANDS, 10)
    assert counts == [2, 0, 0] and math.isnan(_bands.matched_mean(means))


def test_step_windows_split_by_step():
    values = [(s, float(s)) for s in range(10, 70, 10)]
    assert _bands.step_windows(values, [0, 20, 40, 60]) == [15.0, 35.0, 55.0]


def test_probe_due_is_dense_early():
    due = [s for s in range(1, 121) if _bands.probe_due(s, 50, 5, 20)]
    assert due == [5, 10, 15, 20, 50, 100]
    with pytest.raises(NormlabError,
                       match=r"probe_every \(12\) must be a positive multiple of dense_every \(5\)"):
        _bands.check_schedule(12, 5, "recipe x")


@pytest.mark.parametrize("bands, message", [
    ([], "loss_bands must be a non-empty list of \\[high, low\\] pairs, got \\[\\]"),
    ([[1.0, 2.0]], "a loss band must be \\[high, low\\] with high > low >= 0, got \\[1.0, 2.0\\]"),
    ([[2.0, 1.0], [1.5, 0.5]],
     "loss bands must not overlap, listed from the highest loss down; \\[1.5, 0.5\\] "
                               "starts above \\[2.0, 1.0\\] ends"),
    ([[2.0, "a"]], "a loss band must be \\[high, low\\]"),
])
def test_check_bands_refuses_bad_bands(bands, message):
    with pytest.raises(NormlabError, match=message):
        _bands.check_bands(bands, "recipe ics")


def test_trajectory_gate_left_chance_and_did_not_diverge():
    chance = math.log(10)
    falling = [(s, 2.3 - s / 100) for s in range(10, 210, 10)]  # 2.2 -> 0.3
    assert _bands.trajectory_status("finished", falling, chance, 0.9, 30) == _bands.TRAINED
    flat = [(s, 2.30) for s in range(10, 210, 10)]
    assert _bands.trajectory_status("finished", flat, chance, 0.9, 30) == "stalled"
    # Left chance, then climbed back above 0.9 x ln 10 = 2.07 by the end: diverged within the window.
    back = falling[:10] + [(s, 2.3) for s in range(110, 210, 10)]
    assert _bands.trajectory_status("finished", back, chance, 0.9, 30) == "diverged"
    assert _bands.trajectory_status("diverged", falling, chance, 0.9, 30) == "diverged"
    assert _bands.trajectory_status("failed", [], chance, 0.9, 30) == "failed"
    assert _bands.result_statuses([_bands.TRAINED, "stalled"]) == ["converged", "stalled"]


def test_longer_budget_settles_stalled_and_unconverged_arms():
    settle = longer_budget({"steps": 1500})
    assert settle["unconverged"] == settle["stalled"] == "a longer budget, --set steps=3000, or --scale paper"
    assert settle["diverged"] == SETTLE["diverged"]


# -- ics ---------------------------------------------------------------------------------------------


def ics_records(cos: float, rel: float, gate: str = _bands.TRAINED, spread=(0.0, 0.01, -0.01)):
    return [{"cos": cos + d, "rel": rel * math.exp(d), "gate": gate} for d in spread]


def test_ics_summarize_run_compares_matched_bands_over_layers_2_to_k():
    loss = [(10, 1.5), (20, 1.5), (30, 0.7), (40, 0.2), (50, 0.01)]
    layer1 = [(s, 1.0) for s in (10, 20, 30, 40, 50)]  # G' = G in layer 1: never counted
    layer2 = [(10, 0.2), (20, 0.4), (30, 0.5), (40, 0.6), (50, 0.9)]
    layer3 = [(10, 0.0), (20, 0.2), (30, 0.7), (40, 0.8), (50, 0.9)]
    series = {"cos": {"a": layer1, "b": layer2, "c": layer3}}
    out = ics.summarize_run(series, loss, BANDS, 10, 60)
    assert out["cos_bands"] == [pytest.approx(0.2), pytest.approx(0.6), pytest.approx(0.7)]
    assert out["cos"] == pytest.approx((0.2 + 0.6 + 0.7) / 3)
    assert out["cos_after"] == pytest.approx(0.9)
    assert out["cos_layers"]["b"] == [pytest.approx(0.3), 0.5, 0.6]
    assert out["probes"] == [2, 1, 1]


def test_relative_distance_divides_by_the_gradient_norm():
    rel = ics.relative_series({"a": [(1, 0.5), (2, 1.0)]}, {"a": [(1, 2.0), (2, 0.0)]})
    assert rel["a"][0] == (1, 0.25) and math.isnan(rel["a"][1][1])


def test_ics_agrees_when_bn_has_more_ics_at_matched_loss():
    # The DLN at LR 0.001 (science.md): the standard net's cos ~1, BN's ~0.2, its distance ~20x larger.
    per_run = {("dln_slow", "none"): ics_records(0.999, 0.03), ("dln_slow", "bn"): ics_records(0.2, 0.9)}
    sentence, agrees, discrepancy, key = ics.verdict(per_run)
    assert agrees is True and discrepancy is None
    assert sentence.startswith(
        "dln_slow: standard beats BN on cos(G, G_prime) at matched loss by +79.9 x 0.01")
    assert sentence.endswith("BN does not reduce internal covariate shift.")
    assert key == ("dln_slow: cos BN 0.2 ± 0.025 vs std 0.999 ± 0.025, "
                   "||G-G'||/||G|| BN 0.9 ± 0.022 vs std 0.03 ± 0.00075")


def test_ics_disagrees_when_bn_has_the_higher_cosine_at_matched_loss():
    # The VGG measured in issue 26 at matched loss: cos BN 0.56-0.59 vs standard 0.18-0.23.
    per_run = {("vgg", "none"): ics_records(0.2, 0.9), ("vgg", "bn"): ics_records(0.57, 0.8),
               ("dln_slow", "none"): ics_records(0.999, 0.03), ("dln_slow", "bn"): ics_records(0.2, 0.9)}
    sentence, agrees, discrepancy, _ = ics.verdict(per_run)
    assert agrees is False and sentence.endswith("BN reduces internal covariate shift here.")
    assert discrepancy == ("Santurkar et al. find BN's ICS similar or higher, but in the vgg BN has less ICS "
                           "at "
                           "matched training loss (a higher cos(G, G')) (see the per-band figure).")


def test_ics_equivalent_arms_agree_with_similar_ics():
    # "similar or higher": equal cosines and distances within the margins agree.
    per_run = {("dln", "none"): ics_records(0.10, 1.2), ("dln", "bn"): ics_records(0.12, 1.25)}
    sentence, agrees, _, _ = ics.verdict(per_run, cos_margin=0.1, distance_margin=math.log(1.25))
    assert agrees is True
    assert "BN and standard are equivalent on cos(G, G_prime) at matched loss within ±10 x 0.01" in sentence


def test_ics_unresolved_names_the_seeds_and_a_stalled_arm_blocks():
    wide = ics_records(0.3, 0.9, spread=(0.0, 0.3, -0.25))
    per_run = {("vgg", "none"): ics_records(0.3, 0.9), ("vgg", "bn"): wide}
    sentence, agrees, _, _ = ics.verdict(per_run)
    assert agrees is None and sentence.startswith("Inconclusive at this scale (vgg: the 95% interval")
    assert "to settle it: --seeds " in sentence
    stalled = {("vgg", "none"): ics_records(0.2, 0.9, gate="stalled"), ("vgg", "bn"): ics_records(0.57, 0.8)}
    sentence, agrees, _, _ = ics.verdict(stalled, settle=longer_budget({"nets.vgg.steps": 2400}))
    assert agrees is None
    assert sentence.startswith("Inconclusive at this scale (vgg: 3 run(s) of standard stalled at chance "
                               "level); "
                               "to settle it: a longer budget, --set nets.vgg.steps=4800, or --scale paper.")


# -- landscape ---------------------------------------------------------------------------------------


def landscape_records(beta: float, gate: str = _bands.TRAINED, spread=(1.0, 1.05, 0.93)):
    return [{"beta": beta * f, "grad_change": beta * f / 5, "loss_range": beta * f / 40, "eig_train": 1.0,
             "eig_eval": 2.0, "gate": gate} for f in spread]


def test_line_search_ends_below_the_standard_nets_divergence_lr():
    trained, stalled = _bands.TRAINED, "stalled"
    # The quick scale's measured grid: a seed slow to leave chance at 0.2, every seed at chance at 0.28.
    statuses = {0.2: [trained, trained, stalled], 0.28: [stalled] * 3, 0.4: [stalled, "diverged", stalled]}
    assert landscape.line_search_end([0.2, 0.28, 0.4], statuses) == (0.2, 0.28)
    assert landscape.line_search_end([0.4, 0.2, 0.28], statuses) == (0.2, 0.28)  # the grid is sorted
    assert landscape.line_search_end([0.2], {0.2: [trained]}) == (0.2, None)
    assert landscape.line_search_end([0.2], {0.2: ["diverged"]}) == (None, 0.2)


def test_landscape_series_of_reads_the_loss_range():
    metrics = {"probe/landscape/loss_min": [(5, 1.0), (10, 0.5)], "probe/landscape/loss_max": [(10, 0.9),
               (5, 1.5)], "probe/landscape/beta_smoothness": [(5, 3.0)]}
    series = landscape.series_of(metrics)
    assert series["loss_range"] == [(5, 0.5), (10, pytest.approx(0.4))]
    assert series["beta"] == [(5, 3.0)] and series["grad_change"] == []


def test_landscape_verdict_at_matched_loss():
    sentence, agrees, _, _ = landscape.verdict(0.1, {"none": landscape_records(40.0),
                                                     "bn": landscape_records(4.0)})
    assert agrees is True
    assert "effective beta-smoothness: 39.7 ± 6 -> 3.97 ± 0.6" in sentence
    # ln(1/10) = -2.303: BN's beta a tenth of the standard net's (the shared sentence keeps the sign of
    # the difference when the lower value wins).
    assert "BN beats standard on log effective beta-smoothness (lower) by -230.3 x 0.01" in sentence
    # Within 25% of each other on every quantity: equivalent is no smoothing, so the win claim disagrees.
    _, agrees, discrepancy, _ = landscape.verdict(0.1, {"none": landscape_records(4.2),
                                                        "bn": landscape_records(4.0)})
    assert agrees is False
    assert "BN's effective beta-smoothness is not lower beyond the margin (equivalent)" in discrepancy
    _, agrees, discrepancy, _ = landscape.verdict(0.1, {"none": landscape_records(4.0),
                                                        "bn": landscape_records(40.0)})
    assert agrees is False and "(the standard net wins)" in discrepancy
    sentence, agrees, _, _ = landscape.verdict(0.1, {"none": landscape_records(40.0, "stalled"),
                                                     "bn": landscape_records(4.0)})
    assert agrees is None and sentence.startswith("Inconclusive at this scale (loss variation: 3 run(s) of "
                                                  "standard stalled at chance level")


# -- noisy-bn ----------------------------------------------------------------------------------------


def noisy_records(fit: float, change: float, gate: str = _bands.TRAINED, spread=(0.0, 0.1, -0.1)):
    return [{"fit_acc": fit + d, "fit_loss": 0.1, "test_acc": fit - 1.0, "mean_change": change * (1 + d),
             "gate": gate} for d in spread]


def arms(**changes):
    out = {"none": noisy_records(95.0, 0.01), "bn": noisy_records(99.6, 0.02),
           "noisy_bn": noisy_records(99.2, 0.2, spread=(0.1, 0.0, 0.2)),
           "noise": noisy_records(10.4, 0.5, "stalled", spread=(0.3, -0.2, 0.1))}
    out.update(changes)
    return out


def test_noisy_bn_three_claims_agree():
    sentence, agrees, discrepancy, key = noisy_bn.verdict(0.1, arms())
    assert agrees is True and discrepancy is None
    # (1) noisy BN - BN per seed: -0.3, -0.5, -0.1 pts; paired t: half-width t(2) x 0.2 / sqrt(3) = 0.50,
    # so the 95% interval (-0.8, +0.2) lies inside ±1 pt.
    half = t_quantile_975(2) * 0.2 / 3 ** 0.5
    assert half == pytest.approx(0.4968, abs=1e-4)
    assert "(1) noisy BN trains about as well as BN: agrees. noisy BN and BN are equivalent on train-mode " \
           "training accuracy within ±1 pts: difference -0.3 pts (95% CI -0.8 to +0.2 pts, paired t over 3 " \
           "seeds; margin ±1 pts)." in sentence
    # (2) the noise arm stalled at chance: that is the result, not a missing arm.
    assert "(2) the noise without BN prevents training: agrees. noise, no BN and chance level are " \
           "equivalent" \
           in sentence
    assert "(3) noisy BN's layer inputs are less stable than BN's: agrees. BN beats noisy BN" in sentence
    assert "Control (not decided on): the standard net reaches 95.0 ± 0.2% train-mode training accuracy " \
           "(3/3 runs left chance level)." in sentence
    assert key.startswith("train-mode training acc: noisy BN 99.3 ± 0.2%, BN 99.6 ± 0.2%, standard 95.0")


def test_noisy_bn_standard_control_never_blocks():
    _, agrees, _, _ = noisy_bn.verdict(0.1, arms(none=noisy_records(10.0, 0.01, "stalled")))
    assert agrees is True


def test_noisy_bn_disagrees_when_bn_trains_better_beyond_the_margin():
    _, agrees, discrepancy, _ = noisy_bn.verdict(0.1, arms(noisy_bn=noisy_records(96.4, 0.2)))
    assert agrees is False
    assert discrepancy == ("Santurkar et al. find all three, but noisy BN trains about as well as BN does "
                           "not hold "
                           "(win, BN ahead) (see the accuracy figure).")


def test_noisy_bn_noise_arm_that_trains_disagrees():
    _, agrees, discrepancy, _ = noisy_bn.verdict(0.1, arms(noise=noisy_records(64.8, 0.5)))
    assert agrees is False and "the noise without BN prevents training does not hold (win, noise, no BN " \
                               "ahead)" in discrepancy


def test_noisy_bn_equally_stable_inputs_disagree():
    # Noisy BN's mean change 1.05x BN's in every seed: equivalent within ln 1.25, not less stable.
    _, agrees, discrepancy, _ = noisy_bn.verdict(0.1, arms(noisy_bn=noisy_records(99.2, 0.021)))
    assert agrees is False
    assert "noisy BN's layer inputs are less stable than BN's does not hold" in discrepancy


def test_noisy_bn_untrained_or_unresolved_claim_is_inconclusive():
    sentence, agrees, _, _ = noisy_bn.verdict(0.1, arms(bn=noisy_records(99.6, 0.02, "stalled")),
                                              settle=longer_budget({"steps": 2000}))
    assert agrees is None
    assert sentence.startswith("Inconclusive at this scale (noisy BN trains about as well as BN: 3 run(s) of "
                               "BN "
                               "stalled at chance level")
    assert "to settle it: a longer budget, --set steps=4000, or --scale paper." in sentence
    wide = noisy_records(98.8, 0.2, spread=(0.0, 1.5, -1.2))
    sentence, agrees, _, _ = noisy_bn.verdict(0.1, arms(noisy_bn=wide))
    assert agrees is None and "(1) noisy BN trains about as well as BN: undecided." in sentence
    assert "to settle it: --seeds " in sentence
