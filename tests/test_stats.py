"""normlab.stats: intervals checked against scipy's t distribution; the verdict rule on constructed seeds."""

import math

import pytest
from scipy import stats as sps

from normlab.errors import NormlabError
from normlab.stats import INCONCLUSIVE, TIE, WIN, compare_arms, diff_ci, mean_ci, t_quantile_975


@pytest.mark.parametrize("df", [1, 2, 3, 7, 29, 30, 31, 45, 60, 90, 150, 1000, 100000, 2.5, 4.7])
def test_t_quantile_matches_scipy(df):
    assert t_quantile_975(df) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-9)


def test_t_quantile_rejects_bad_df():
    with pytest.raises(NormlabError, match="degrees of freedom must be a number >= 1, got 0"):
        t_quantile_975(0)


def test_welch_interval_matches_scipy():
    a, b = [0.95, 0.91, 0.955, 0.93], [0.90, 0.96, 0.905]
    diff, half, df = diff_ci(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    low, high = ref.confidence_interval(0.95)
    assert df == pytest.approx(ref.df, rel=1e-9)
    assert diff - half == pytest.approx(low, rel=1e-9)
    assert diff + half == pytest.approx(high, rel=1e-9)


def test_paired_interval_matches_scipy():
    a, b = [0.95, 0.91, 0.955], [0.90, 0.89, 0.93]
    diff, half, df = diff_ci(a, b, paired=True)
    low, high = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert (diff - half, diff + half, df) == (pytest.approx(low), pytest.approx(high), 2.0)


def test_mean_ci_drops_non_finite_values():
    mean, half = mean_ci([1.0, 2.0, 3.0, math.nan])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_clear_difference_is_a_win_for_the_better_arm():
    verdict = compare_arms("gn", [0.90, 0.91, 0.905], "bn", [0.95, 0.96, 0.955])
    assert verdict.word == WIN and verdict.winner == "bn"
    assert verdict.sentence().startswith("bn beats gn on test accuracy by +5.0 pts (95% CI +3.")


def test_lower_is_better_for_errors():
    verdict = compare_arms("bn", [0.05, 0.04, 0.045], "gn", [0.10, 0.09, 0.095], higher_is_better=False)
    assert verdict.winner == "bn"


def test_overlapping_seeds_are_a_tie():
    verdict = compare_arms("bn", [0.95, 0.91, 0.955], "gn", [0.90, 0.96, 0.905])
    assert verdict.word == TIE and verdict.winner is None
    assert verdict.low < 0 < verdict.high
    assert "which includes 0" in verdict.sentence()


def test_unconverged_arm_is_inconclusive_with_the_flag_that_settles_it():
    verdict = compare_arms(
        "bn", [0.95, 0.96, 0.955], "gn", [0.50, 0.52, 0.51],
        statuses_b=["converged", "unconverged", "converged"], settle={"unconverged": "--budget auto"},
    )  # fmt: skip
    assert verdict.word == INCONCLUSIVE
    assert verdict.sentence() == (
        "bn vs gn on test accuracy is inconclusive: 1 run(s) of gn had not converged when the budget ended. "
        "To settle it: --budget auto."
    )


def test_stalled_arm_is_inconclusive_not_a_loss():
    verdict = compare_arms("none", [0.1, 0.1, 0.1], "bn", [0.9, 0.9, 0.9], statuses_a=["stalled"] * 3)
    assert verdict.word == INCONCLUSIVE and "stalled at chance level" in verdict.reason


def test_every_arm_that_did_not_train_is_named_and_the_worst_problem_settles():
    verdict = compare_arms(
        "std", [0.6, 0.7, 0.65], "bn", [0.95, 0.96, 0.955],
        statuses_a=["unconverged"] * 3, statuses_b=["converged", "diverged", "unconverged"],
        settle={"unconverged": "a longer budget", "diverged": "a smaller lr"},
    )  # fmt: skip
    assert verdict.reason == ("3 run(s) of std had not converged when the budget ended; 1 run(s) of bn "
                              "diverged; 1 run(s) of bn had not converged when the budget ended")
    assert verdict.settle == "a smaller lr"


def test_too_few_seeds_is_inconclusive():
    verdict = compare_arms("bn", [0.95, 0.96], "gn", [0.90, 0.91])
    assert verdict.word == INCONCLUSIVE
    assert verdict.reason == "bn has 2 result(s), the rule needs at least 3 seeds"
    assert verdict.settle == "--seeds 3"
