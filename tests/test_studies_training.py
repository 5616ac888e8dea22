"""The training-based studies: each runs at tiny scale into a full report (fast tier) and at quick scale
(slow tier); each verdict is computed from the numbers and flips when the numbers flip."""

from __future__ import annotations

import html
import math
import re

import pytest

from normlab.studies import (
    batch_coupling,
    cost,
    large_batch,
    normalizer_free,
    regularization,
    run_study,
    small_batch,
)

STUDIES = ["regularization", "large-batch", "small-batch", "batch-coupling", "cost", "normalizer-free"]


def _check_report(outcome, files, folder):
    assert outcome.tables and all(t.rows for t in outcome.tables)
    assert outcome.figures and all((folder / f.path).is_file() for f in outcome.figures)
    page = files.html.read_text()
    assert outcome.verdict and html.escape(outcome.verdict) in page
    assert page.count("data:image/png;base64,") == len(outcome.figures)
    assert (folder / "report.md").read_text().count("## ") >= 4
    if outcome.agrees_with_paper is False:
        assert outcome.discrepancy and "Discrepancy:" in page


@pytest.mark.parametrize("name", STUDIES)
def test_study_tiny_scale_writes_its_report(name, tmp_path):
    outcome, files = run_study(name, scale="tiny", seeds=2, out=tmp_path)
    _check_report(outcome, files, tmp_path / name)


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_quick_scale(name, tmp_path):
    outcome, files = run_study(name, scale="quick", seeds=2, out=tmp_path)
    _check_report(outcome, files, tmp_path / name)
    # The verdict quotes measured numbers (undecided is a valid outcome when the CIs do not separate).
    assert re.search(r"\d", outcome.verdict)


# -- verdicts follow the numbers --------------------------------------------------------------------


def test_regularization_verdict_flips():
    agree = {"bn": {16: 0.02, 256: 0.08}, "gn": {16: 0.03, 256: 0.04}, "none": {16: 0.05, 256: 0.05}}
    sentence, agrees, discrepancy = regularization.judge(agree, [16, 64, 256])
    assert agrees is True and discrepancy is None
    assert sentence.startswith("From batch 16 to 256, BN's train/test gap changes from +2.0 pts to +8.0 pts "
                               "(+6.0 pts) versus +1.0 pts for gn, +0.0 pts for none: BN's regularization "
                               "weakens more")
    flipped = {"bn": {16: 0.08, 256: 0.02}, "gn": {16: 0.03, 256: 0.04}, "none": {16: 0.05, 256: 0.05}}
    sentence, agrees, discrepancy = regularization.judge(flipped, [16, 256])
    assert agrees is False and "does not weaken more" in sentence
    assert discrepancy == ("Luo et al. predict BN's gap to grow the most with batch size; here gn's grows "
                           "+1.0 pts against BN's -6.0 pts.")
    missing = {"bn": {16: math.nan, 256: 0.1}, "gn": {16: 0.0, 256: 0.0}}
    assert regularization.judge(missing, [16, 256])[1] is None


def test_regularization_underfit_note():
    from types import SimpleNamespace as R

    done = "finished"
    cells = {("bn", 256): [R(status=done, final_train_acc=0.95)],
             ("gn", 256): [R(status=done, final_train_acc=0.70), R(status=done, final_train_acc=0.74)]}
    assert regularization.underfit_note(cells, ["bn", "gn"], 256) == (
        "Train accuracy at batch 256 below 90% (gn 72.0%): these gaps mix regularization with underfitting "
        "(equal epochs give large batches fewer steps)."
    )
    assert regularization.underfit_note(cells, ["bn"], 256) is None


def test_regularization_lr_scaling():
    params = {"lr": 0.05, "base_batch": 32, "lr_power": 0.5}
    assert regularization.scaled_lr(params, 128) == pytest.approx(0.1)


def _summary(best, largest, acc, half=0.01, diverged=0, runs=6):
    return {"best_lr": best, "largest_stable_lr": largest, "acc": (acc, half), "diverged": diverged,
            "runs": runs, "steps_per_s": (100.0, 1.0), "failed": 0}


def test_large_batch_verdict_flips():
    ok = {("bn", 512): _summary(1.0, 3.0, 0.90), ("none", 512): _summary(0.1, 0.3, 0.80, diverged=3),
          ("nf", 512): _summary(0.3, 1.0, 0.89)}
    sentence, agrees, discrepancy = large_batch.judge(ok, 512)
    assert agrees is True and discrepancy is None
    assert sentence == (
        "At batch 512, the largest stable lr is 3 with BN, 0.3 without normalization and 1 for NF+AGC; "
        "best test accuracy BN 90.0%, no norm 80.0%, NF+AGC 89.0%: consistent with the claim."
    )
    bad = {("bn", 512): _summary(0.1, 0.3, 0.90), ("none", 512): _summary(1.0, 3.0, 0.80),
           ("nf", 512): _summary(0.3, 1.0, 0.70)}
    sentence, agrees, discrepancy = large_batch.judge(bad, 512)
    assert agrees is False and sentence.endswith("not consistent with the claim.")
    assert "the unnormalized net is stable up to lr 3, above BN's 0.3" in discrepancy
    assert "NF+AGC's best accuracy 70.0% is more than 2 pts below BN's 90.0% beyond the 95%" in discrepancy
    noisy = {("bn", 512): _summary(1.0, 3.0, 0.90), ("nf", 512): _summary(0.3, 1.0, 0.75, half=0.3)}
    sentence, agrees, discrepancy = large_batch.judge(noisy, 512)
    assert agrees is None and discrepancy is None
    assert sentence.endswith(": not resolved within the 95% CIs.")
    unstable = {("bn", 512): _summary(None, None, math.nan)}
    assert large_batch.judge(unstable, 512)[1] is None


def test_small_batch_verdict_flips():
    errors = {"bn": {2: 30.0, 32: 20.0}, "gn": {2: 21.0, 32: 20.5}, "precise_bn": {2: 25.0, 32: 20.0}}
    sentence, agrees, discrepancy = small_batch.judge(errors)
    assert agrees is True and discrepancy is None
    assert sentence == (
        "From batch 32 to 2, BN's test error goes from 20.0% to 30.0% (+10.0 pts) and GN's from 20.5% to "
        "21.0% (+0.5 pts): BN degrades more at small batch, as in Group Norm's Table 2 (BN +11.1, GN +0.0 "
        "pts from 32 to 2); at batch 2, vs BN: PreciseBN -5.0 pts."
    )
    flipped = {"bn": {2: 20.0, 32: 20.0}, "gn": {2: 30.0, 32: 20.0}}
    sentence, agrees, discrepancy = small_batch.judge(flipped)
    assert agrees is False and "does not degrade more than GN" in sentence
    assert "here BN's error changes by +0.0 pts and GN's by +10.0 pts" in discrepancy


def test_small_batch_compares_over_table_2_range():
    # Batch 128 (outside Group Norm's Table 2) would make GN look worse; the verdict uses 32 -> 2.
    errors = {"bn": {2: 30.0, 32: 20.0, 128: 40.0}, "gn": {2: 21.0, 32: 20.5, 128: 50.0}}
    sentence, agrees, _ = small_batch.judge(errors)
    assert sentence.startswith("From batch 32 to 2, BN's test error goes from 20.0% to 30.0% (+10.0 pts)")
    assert agrees is True


def test_small_batch_reference_is_group_norm_table_2():
    assert small_batch.REFERENCE["bn"] == {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7}
    assert set(small_batch.REFERENCE["gn"].values()) == {24.1, 24.2, 24.0}


def test_batch_coupling_verdict_flips():
    coupling = {"bn": {"train": 0.3, "eval": 0.0}, "gn": {"train": 0.0, "eval": 0.0}}
    expected = {"bn": True, "gn": False}
    sentence, agrees, discrepancy = batch_coupling.judge(coupling, expected)
    assert agrees is True and discrepancy is None
    assert sentence == (
        "In train mode 1 of 2 norms couple the examples of a batch (bn; largest bn at 0.3) and gn keep them "
        "independent (coupling <= 1e-06); in eval mode none does."
    )
    wrong = {"bn": {"train": 0.0, "eval": 0.0}, "gn": {"train": 0.2, "eval": 0.1}}
    sentence, agrees, discrepancy = batch_coupling.judge(wrong, expected)
    assert agrees is False and "in eval mode gn still couple them." in sentence
    assert discrepancy == (
        "coupling does not follow the use of batch statistics for bn, gn; eval mode couples examples for gn."
    )


def test_batch_coupling_bad_norms_spec():
    from normlab.errors import NormlabError

    with pytest.raises(NormlabError, match="norms must be 'all' or a list of norm names, got 'bn'"):
        batch_coupling.norm_names("bn")
    assert "nf" in batch_coupling.norm_names("all") and "bn" in batch_coupling.norm_names("all")


def _ratios(train, infer, folded=(0.8, 0.05), half=0.05):
    return {"train": (train, half), "infer": (infer, half), "infer_folded": folded, "memory": (1.0, 0.0)}


def test_cost_verdict_flips():
    ratios = {"bn": _ratios(1.0, 1.0, (0.7, 0.05)), "gn": _ratios(1.3, 1.4), "ln": _ratios(1.1, 1.2)}
    sentence, agrees, discrepancy = cost.judge(ratios, "fold_bn folded 6 of 13 BN layers")
    assert agrees is True and discrepancy is None
    assert sentence == (
        "Per training step GN 1.30x ± 0.05, LN 1.10x ± 0.05 BN's time; at inference BN folded into its "
        "convolutions (fold_bn folded 6 of 13 BN layers) takes 0.70x ± 0.05 unfolded BN's time against "
        "GN 1.40x ± 0.05, LN 1.20x ± 0.05."
    )
    flipped = {"bn": _ratios(1.0, 1.0, (1.0, 0.05)), "gn": _ratios(0.8, 0.7)}
    sentence, agrees, discrepancy = cost.judge(flipped)
    assert agrees is False
    assert discrepancy == (
        "GN trains faster than BN beyond the 95% CI; folded BN inference is slower than GN beyond the 95% CI."
    )
    noisy = {"bn": _ratios(1.0, 1.0, (0.7, 0.05)), "gn": _ratios(1.03, 1.4)}
    sentence, agrees, discrepancy = cost.judge(noisy)
    assert agrees is None and discrepancy is None
    assert sentence.endswith("(GN training: within the 95% CI, no difference resolved).")


def test_cost_activation_bytes_is_exact_for_a_linear_relu_net():
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    # Saved for backward, parameters excluded: x (linear 1, 5x8 float32), the ReLU output (relu and linear 2
    # share its storage, 5x16), log_softmax's output (5x4), and nll_loss's target (5 int64) and total_weight
    # (a float32 scalar).
    got = cost.activation_bytes(model, x, y)
    assert got == 4 * (5 * 8 + 5 * 16 + 5 * 4) + 8 * 5 + 4
    assert cost.param_bytes(model) == 4 * (8 * 16 + 16 + 16 * 4 + 4)


def test_normalizer_free_verdict_flips():
    good = {"bn": _summary(0.2, 0.8, 0.90), "nf": _summary(0.8, 3.2, 0.895),
            "skipinit": _summary(0.2, 0.8, 0.88), "none": _summary(0.05, 0.2, 0.85, diverged=6)}
    sentence, agrees, discrepancy = normalizer_free.judge(good)
    assert agrees is True and discrepancy is None
    assert sentence.startswith("Best test accuracy: BN-ResNet 90.0% (largest stable lr 0.8, 0/6 diverged); "
                               "NF-ResNet+AGC 89.5% (largest stable lr 3.2, 0/6 diverged)")
    assert sentence.endswith(": NF+AGC matches BN's accuracy and is stable up to lr 3.2.")
    bad = {"bn": _summary(0.2, 0.8, 0.90), "nf": _summary(0.05, 0.05, 0.60),
           "none": _summary(0.2, 0.8, 0.85)}
    sentence, agrees, discrepancy = normalizer_free.judge(bad)
    assert agrees is False
    assert sentence.endswith("falls short of BN's accuracy and is less stable than the unnormalized net "
                             "(lr 0.05 vs 0.8).")
    assert re.search(r"NF\+AGC's 60.0% is more than 2 pts below BN's 90.0% beyond the 95% CIs", discrepancy)
    # A huge CI (one seed did not train) decides nothing: the quick run's 73.1 ± 49 vs 95.6 ± 3.1.
    noisy = {"bn": _summary(0.2, 3.2, 0.956, half=0.031), "nf": _summary(0.8, 0.8, 0.731, half=0.49)}
    sentence, agrees, discrepancy = normalizer_free.judge(noisy)
    assert agrees is None and discrepancy is None
    assert "NF+AGC is not resolved against BN's accuracy (the 95% CIs overlap the 2-pt margin)" in sentence


def test_matches_margin_and_ci():
    from normlab.studies._grid import matches

    assert matches((0.89, 0.01), (0.90, 0.01)) is True  # within 2 pts
    assert matches((0.80, 0.01), (0.90, 0.01)) is False  # 0.81 < 0.89 - 0.02
    assert matches((0.80, 0.08), (0.90, 0.01)) is None  # CI top 0.88 reaches 0.90 - 0.01 - 0.02
    assert matches((0.80, math.nan), (0.90, 0.01)) is None  # one seed: no CI, nothing resolved
    assert matches((math.nan, 0.0), (0.90, 0.01)) is None
