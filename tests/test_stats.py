"""normlab.stats: intervals checked against scipy's t distribution; the verdict rule on constructed seeds."""

import math

import pytest
from scipy import stats as sps

from normlab.errors import NormlabError
from normlab.stats import (
    EQUIVALENT,
    INCONCLUSIVE,
    UNRESOLVED,
    WIN,
    compare_arms,
    diff_ci,
    mean_ci,
    rule_text,
    seeds_to_resolve,
    t_quantile_975,
)


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
    assert verdict.sentence().endswith("; margin ±1 pts).")


def test_lower_is_better_for_errors():
    verdict = compare_arms("bn", [0.05, 0.04, 0.045], "gn", [0.10, 0.09, 0.095], higher_is_better=False)
    assert verdict.winner == "bn"


def test_wide_overlapping_seeds_are_unresolved_with_the_seeds_that_would_resolve_it():
    # Welch: diff +1.7 pts, interval about -5.2 to +8.5 pts: includes 0 and reaches past the 1-pt margin.
    verdict = compare_arms("bn", [0.95, 0.91, 0.955], "gn", [0.90, 0.96, 0.905])
    assert verdict.word == UNRESOLVED and verdict.winner is None
    assert verdict.low < -0.01 and verdict.high > 0.01
    # Target half-width max(|d|, delta - |d|) = |d|; s from the interval; the fewest n whose t-interval at
    # the scaled Welch df is narrower (computed independently below with scipy's t).
    from scipy import stats as sps

    d, half, df, n = verdict.diff, (verdict.high - verdict.low) / 2, float(verdict.test.split("df ")[1]), 3
    spread = half * math.sqrt(n) / sps.t.ppf(0.975, df)
    expected = next(k for k in range(4, 1001)
                    if sps.t.ppf(0.975, max(1.0, df * (k - 1) / (n - 1))) * spread / math.sqrt(k) < abs(d))
    assert verdict.seeds == expected and verdict.settle == f"--seeds {expected}"
    assert verdict.sentence().endswith(
        f"which includes 0 and reaches past the margin; about {expected} seeds would resolve it "
        f"(--seeds {expected})."
    )


def test_interval_inside_the_margin_is_equivalent_even_when_it_excludes_0():
    # Paired differences 0.3, 0.4, 0.5 pts (compare's gn/128 of stop 24): mean 0.4, half 0.248 pts.
    bn, gn = [0.963, 0.955, 0.963], [0.960, 0.951, 0.958]
    verdict = compare_arms("bn", bn, "gn", gn, paired=True)
    assert verdict.word == EQUIVALENT and verdict.winner is None
    assert verdict.low == pytest.approx(0.004 - 4.302653 * 0.001 / math.sqrt(3), abs=1e-9) and verdict.low > 0
    assert verdict.sentence() == (
        "bn and gn are equivalent on test accuracy within ±1 pts: difference +0.4 pts (95% CI +0.2 to +0.6 "
        "pts, paired t over 3 seeds; margin ±1 pts)."
    )
    # The same seeds against a margin of 0.1 pts: the interval excludes 0 and is not inside it, a win.
    narrow = compare_arms("bn", bn, "gn", gn, paired=True, margin=0.001)
    assert narrow.word == WIN and narrow.winner == "bn" and "margin ±0.1 pts" in narrow.sentence()


def test_win_needs_the_interval_outside_the_margin_not_only_past_0():
    # A difference of 5 pts with an interval of +3.x to +6.x pts: outside the 1-pt margin, a win; against a
    # 10-pt margin the same interval lies inside it: equivalent.
    a, b = [0.90, 0.91, 0.905], [0.95, 0.96, 0.955]
    assert compare_arms("gn", a, "bn", b).word == WIN
    assert compare_arms("gn", a, "bn", b, margin=0.10).word == EQUIVALENT


def test_interval_that_straddles_the_margin_but_excludes_0_is_a_win():
    # Paired differences 0.8, 1.0, 1.2 pts: interval +0.5 to +1.5 pts excludes 0, not inside +-1: a win.
    verdict = compare_arms("bn", [0.958, 0.960, 0.962], "gn", [0.950, 0.950, 0.950], paired=True)
    assert verdict.word == WIN and verdict.winner == "bn"


def test_seeds_to_resolve_exact_values():
    # Paired, n = 3 (df 2), half 0.02, diff 0.005, margin 0.01: target 0.005, s = 0.02 * sqrt(3) / 4.3027.
    from scipy import stats as sps

    s = 0.02 * math.sqrt(3) / sps.t.ppf(0.975, 2)
    expected = next(k for k in range(4, 1001) if sps.t.ppf(0.975, k - 1) * s / math.sqrt(k) < 0.005)
    assert seeds_to_resolve(0.005, 0.02, 3, 2.0, 0.01) == expected
    assert seeds_to_resolve(0.005, 50.0, 3, 2.0, 0.01) is None  # beyond MAX_SEEDS
    assert seeds_to_resolve(0.005, math.nan, 3, 2.0, 0.01) is None


def test_margin_must_be_positive():
    with pytest.raises(NormlabError, match=r"the margin must be a positive number, got 0"):
        compare_arms("a", [1.0, 1.0, 1.0], "b", [1.0, 1.0, 1.0], margin=0)
    with pytest.raises(NormlabError, match=r"got True"):
        compare_arms("a", [1.0, 1.0, 1.0], "b", [1.0, 1.0, 1.0], margin=True)


def test_rule_text_states_the_margin():
    assert "a margin of ±1 pts" in rule_text()
    assert "a margin of ±0.5 pts" in rule_text(0.005)


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
