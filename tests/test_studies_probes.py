"""The five mechanism studies (noisy-bn, ics, landscape, residual, mean-shift).

Fast tier: every study runs end to end at ``tiny`` scale and writes its report; the verdict functions are
fed hand-made numbers (and the same numbers flipped) and must flip their sentence and agreement; the small
pure helpers are checked against hand computations. Slow tier: each study at ``quick`` scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from normlab.errors import NormlabError
from normlab.studies import get_study, parse_recipe, validate_params
from normlab.studies import ics as ics_study
from normlab.studies import landscape as landscape_study
from normlab.studies import mean_shift as mean_shift_study
from normlab.studies import noisy_bn as noisy_bn_study
from normlab.studies import residual as residual_study
from normlab.studies.runner import run_study

STUDIES = ["noisy-bn", "ics", "landscape", "residual", "mean-shift"]


def _first_mean(table, column: str, row: int = 0) -> float:
    cell = table.column(column)[row]
    return cell[0] if isinstance(cell, tuple) else cell


# -- end to end at tiny scale -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    return {name: (run_study(name, scale="tiny", seeds=2, out=out)[0], out / name) for name in STUDIES}


@pytest.mark.parametrize("name", STUDIES)
def test_tiny_study_writes_report_with_figures_and_table(tiny_outcomes, name):
    outcome, folder = tiny_outcomes[name]
    html = (folder / "report.html").read_text(encoding="utf-8")
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert outcome.tables and all(t.rows for t in outcome.tables)
    assert outcome.figures
    for figure in outcome.figures:
        png = folder / figure.path
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "data:image/png;base64," in html
    assert outcome.verdict.split(";")[0][:40] in md
    assert outcome.agrees_with_paper in (True, False, None)
    if outcome.agrees_with_paper is False:
        assert outcome.discrepancy


def test_tiny_noisy_bn_verdict_quotes_its_table(tiny_outcomes):
    outcome, _ = tiny_outcomes["noisy-bn"]
    table = outcome.tables[0]
    labels = table.column("network")
    fit = {label: table.column("train-mode batch acc %")[i][0] for i, label in enumerate(labels)}
    for label in ("noisy BN", "BN", "standard", "noise, no BN"):
        assert f"{label} {fit[label]:.1f}" in outcome.key_figures
    # Two seeds at tiny scale: never a verdict (the rule needs 3 converged seeds).
    assert outcome.agrees_with_paper is None and outcome.verdict.startswith("Inconclusive at this scale")
    # The tracker ran in every run: a finite step-to-step change for every network.
    assert all(math.isfinite(c[0]) for c in table.column("|mu_t+1 - mu_t|"))


def test_tiny_ics_tables_per_band_and_per_paper_layer(tiny_outcomes):
    outcome, _ = tiny_outcomes["ics"]
    table, layers = outcome.tables
    assert set(table.column("network")) == {"vgg", "dln"}
    bands = table.column("band")
    # Per network and norm: each band of the recipe, the matched mean, the post-convergence phase and the
    # three same-step windows.
    assert bands.count("matched") == 4 and bands.count("first third of steps") == 4
    assert bands.count("[3, 2)") == 2 and bands.count("[100, 5)") == 2
    # Every same-step window has probes at tiny scale (steps 2, 4 and 8): finite raw ||G - G'||.
    thirds = [i for i, b in enumerate(bands) if b.endswith("third of steps")]
    assert all(math.isfinite(table.column("||G - G'|| (raw)")[i][0]) for i in thirds)
    assert set(layers.column("layer")) >= {"#5 (features.15)", "#10 (head.4)", "#2 (layers.3)"}
    # Two seeds at tiny scale: never a verdict.
    assert outcome.agrees_with_paper is None and outcome.verdict.startswith("Inconclusive at this scale")


def test_tiny_landscape_table_has_hessian_in_both_modes(tiny_outcomes):
    outcome, _ = tiny_outcomes["landscape"]
    table, probe = outcome.tables
    matched = [i for i, b in enumerate(table.column("band")) if b == "matched"]
    for column in ("lambda_max train", "lambda_max eval"):
        assert all(math.isfinite(table.column(column)[i][0]) for i in matched)
    # Without BN train and eval mode are the same function: the same top eigenvalue.
    i = next(i for i in matched if table.column("network")[i] == "standard")
    assert table.column("lambda_max train")[i][0] == pytest.approx(
        table.column("lambda_max eval")[i][0], rel=1e-4
    )
    # The standard net's short runs at the divergence grid say where the line search ends.
    assert probe.column("lr") == [0.2, 0.4]
    assert "Step range: the standard net stops training at LR " in outcome.verdict


def test_tiny_residual_skipinit_branch_is_zero_at_init(tiny_outcomes):
    outcome, _ = tiny_outcomes["residual"]
    table = outcome.tables[0]
    rows = [r for r in table.rows if r[0] == "SkipInit"]
    assert rows and all(r[2][0] == 0.0 for r in rows)  # SkipInit(0): the branch contributes exactly 0
    assert all(r[2][0] > 0 for r in table.rows if r[0] != "SkipInit")


def test_tiny_mean_shift_collapse_is_defined_for_every_net(tiny_outcomes):
    # NF-ResNet's classifier follows DeepMind's nfnets init, N(0, 0.01) (no longer zero), so its logits do
    # not all tie and the top-class share is defined as for the other nets.
    outcome, _ = tiny_outcomes["mean-shift"]
    table = outcome.tables[0]
    assert [r for r in table.rows if r[0] == "NF-ResNet"]
    assert all(0 < r[-1][0] <= 1 for r in table.rows)


# -- helpers against hand computations ----------------------------------------------------------------


def test_log_slope_recovers_power_law_exponent():
    depths = [8, 14, 20, 56, 110]
    assert residual_study.log_slope(depths, [3.0 * d**-0.5 for d in depths]) == pytest.approx(-0.5, abs=1e-12)
    assert residual_study.log_slope(depths, [2.0] * 5) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(residual_study.log_slope(depths, [0.0] * 5))  # SkipInit: the log is undefined


def test_ics_layer_order_and_first_layer_excluded():
    metrics = {
        "probe/ics/position/features.3": [(4, 1.0)],
        "probe/ics/position/classifier": [(4, 2.0)],
        "probe/ics/position/features.0": [(4, 0.0)],
        "probe/ics/l2/classifier": [(4, 3.0), (8, 5.0)],
        "probe/ics/l2/features.0": [(4, 0.0), (8, 0.0)],
        "probe/ics/l2/features.3": [(4, 1.0), (8, 3.0)],
    }
    series = ics_study.layer_series(metrics, "l2")
    assert list(series) == ["features.0", "features.3", "classifier"]
    assert ics_study.run_ics(series) == pytest.approx((3.0 + 5.0 + 1.0 + 3.0) / 4)


def test_ics_and_landscape_probes_measure_the_step_the_run_takes_next():
    """Definition 2.1 and Sec. 3.2 measure the step from W^t on its own batch: from a callback after step t
    that is the batch of step t + 1 (``ctx.next_batch()``), not a second step on the batch just used."""
    import copy

    from normlab.probes import ics, landscape
    from normlab.train import TrainConfig, Trainer

    captured = {}

    def capture(ctx):  # runs before the probes: the state they see
        # One deepcopy of the pair, so that the copied optimizer steps the copied model's parameters.
        captured.update(state=copy.deepcopy((ctx.model, ctx.optimizer)), loss_fn=ctx.loss_fn,
                        batch=ctx.batch, upcoming=ctx.next_batch())

    config = TrainConfig(subset=256, batch_size=32, steps=4, width=8, lr=0.5, optimizer="sgd", momentum=0.0,
                         schedule="constant", log_every=4, eval_train_samples=64)
    probes = [(capture, 4), ics_study.ICSProbe(4),
              landscape_study.LandscapeProbe(4, num_points=3, eta_range=(0.5, 4.0), hessian_every=0,
                                             hessian_iters=2)]
    trainer = Trainer(config, callbacks=probes, progress=False)
    trainer.fit()
    logged = {name: series[-1][1] for name, series in trainer.history.items() if name.startswith("probe/")}
    model, optimizer = captured["state"]
    want = ics(model, optimizer, captured["upcoming"], captured["loss_fn"])
    used = ics(model, optimizer, captured["batch"], captured["loss_fn"])
    for layer in want.l2:
        assert logged[f"probe/ics/l2/{layer}"] == pytest.approx(want.l2[layer], rel=1e-6)
        assert logged[f"probe/ics/cos/{layer}"] == pytest.approx(want.cos[layer], rel=1e-6, abs=1e-9)
    assert any(abs(used.l2[n] - want.l2[n]) > 1e-3 * abs(want.l2[n]) for n in want.l2 if want.l2[n] > 0)
    shape = landscape(model, captured["upcoming"], captured["loss_fn"], optimizer=optimizer, num_points=3,
                      eta_range=(0.5, 4.0))
    assert logged["probe/landscape/beta_smoothness"] == pytest.approx(shape.beta_smoothness, rel=1e-6)
    assert logged["probe/landscape/loss_max"] == pytest.approx(shape.loss_max, rel=1e-6)


def test_final_fit_is_the_mean_of_the_last_tenth_of_the_logs():
    series = [(10 * i, float(i)) for i in range(1, 21)]  # 20 logs: the last 2 are 19 and 20
    assert noisy_bn_study.final_fit(list(reversed(series))) == pytest.approx(19.5)
    assert math.isnan(noisy_bn_study.final_fit([]))


def test_noisy_bn_stability_averages_layers_and_steps():
    metrics = {
        "probe/activation_stats/mean_change/a": [(3, 0.0), (6, 0.2), (9, 0.4)],
        "probe/activation_stats/mean_change/b": [(3, 0.0), (6, 1.0), (9, 1.0)],
        "probe/activation_stats/mean_drift/a": [(3, 0.0), (6, 0.2), (9, 0.7)],
    }
    assert noisy_bn_study.stability(metrics, "mean_change") == pytest.approx((0.3 + 1.0) / 2)
    assert noisy_bn_study.stability(metrics, "mean_drift") == pytest.approx(0.7)
    assert math.isnan(noisy_bn_study.stability(metrics, "var_change"))


def test_norm_slots_are_the_bn_layers_of_vgg():
    from normlab.models import create_model

    model = create_model("vgg", norm="bn", width=0.125, in_channels=1, dims=1)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert noisy_bn_study.norm_slots(model) == bn_names
    assert len(bn_names) == 15  # VGG-16: 13 convs + 2 hidden linears, none after the classifier
    plain = create_model("vgg", norm="none", width=0.125, in_channels=1, dims=1)
    assert noisy_bn_study.norm_slots(plain) == bn_names  # the same slots hold nn.Identity


def test_landscape_summary_by_hand():
    metrics = {
        "probe/landscape/loss_min": [(4, 1.0), (8, 2.0), (12, 1.0), (16, 1.0)],
        "probe/landscape/loss_max": [(4, 3.0), (8, 2.5), (12, 2.0), (16, 1.5)],
        "probe/landscape/grad_change_max": [(4, 8.0), (8, 4.0), (12, 2.0), (16, 2.0)],
        "probe/landscape/beta_smoothness": [(4, 10.0), (8, 6.0), (12, 2.0), (16, 2.0)],
        "probe/hessian/top_eigenvalue/train": [(8, 5.0), (16, 7.0)],
    }
    # Training loss (window 4: the log at the probe's own step): steps 4 and 8 in [2, 1), 12 in [1, 0.5),
    # 16 below the lowest band (the post-convergence phase).
    loss = [(4, 1.8), (8, 1.2), (12, 0.7), (16, 0.01)]
    s = landscape_study.summarize_run(metrics, loss, [(2.0, 1.0), (1.0, 0.5), (0.5, 0.05)], 4, 16)
    assert s["loss_range_bands"][:2] == [pytest.approx((2.0 + 0.5) / 2), pytest.approx(1.0)]
    assert math.isnan(s["loss_range_bands"][2]) and math.isnan(s["loss_range"])  # no probe in [0.5, 0.05)
    assert s["beta_bands"][:2] == [pytest.approx(8.0), pytest.approx(2.0)] and s["probes"] == [2, 1, 0]
    assert s["beta_after"] == pytest.approx(2.0) and s["grad_change_after"] == pytest.approx(2.0)
    assert s["beta_thirds"] == [pytest.approx(10.0), pytest.approx(6.0), pytest.approx(2.0)]  # (0,5] (5,10]..
    assert s["eig_train"] == 7.0 and math.isnan(s["eig_eval"])


def test_mean_shift_summary_by_hand():
    runs = [
        {"avg_sq_mean": [0.1, 3.0], "avg_var": [1.0, 1.0], "final_cosine": 0.9, "collapse": 1.0},
        {"avg_sq_mean": [0.1, 1.0], "avg_var": [1.0, 3.0], "final_cosine": 0.7, "collapse": 0.5},
    ]
    s = mean_shift_study.summarize({"none": {20: runs}})["none"][20]
    assert s["sq_mean"][0] == pytest.approx(2.0)
    assert s["share"][0] == pytest.approx((0.75 + 0.25) / 2)
    # 95% t-interval, 1 degree of freedom: 12.7062 * sd / sqrt(2), sd of (0.9, 0.7) = 0.1 * sqrt(2)
    assert s["cosine"] == pytest.approx((0.8, 12.7062 * 0.1), rel=1e-6)


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STUDIES)
def test_recipes_validate_against_their_params(name):
    study = get_study(name)
    for scale in ("tiny", "quick", "paper"):
        assert study.params(scale)


def test_recipe_with_wrong_typed_field_names_file_field_and_type():
    study = get_study("noisy-bn")
    raw = {
        "name": study.name,
        "title": study.title,
        "claim": study.claim,
        "paper": study.paper,
        "module": study.module,
        "scale": {s: dict(p) for s, p in study.scales.items()},
    }
    raw["scale"]["quick"]["lrs"] = "0.1"
    bad = parse_recipe(raw, source="bad-noisy.toml")
    with pytest.raises(
        NormlabError, match=r"recipe noisy-bn: field scale.quick.'lrs' must be list, got str '0.1'"
    ):
        validate_params(bad, noisy_bn_study.PARAMS)


def test_track_layers_out_of_range_is_refused():
    with pytest.raises(
        NormlabError,
        match=r"recipe x: norm slots must be a non-empty list of 1-based positions in "
        r"1..10 \(the model has 10 norm slots\), got \[0, 11\]",
    ):
        noisy_bn_study.check_track_layers([0, 11], 10, "recipe x")


def test_landscape_loss_bands_must_be_high_then_low(tmp_path):
    import tomllib

    from normlab.studies.registry import RECIPES_DIR

    raw = tomllib.loads((RECIPES_DIR / "landscape.toml").read_text())
    raw["scale"]["tiny"]["loss_bands"] = [[1.0, 2.0]]
    path = tmp_path / "landscape.toml"
    path.write_text(_to_toml(raw))
    with pytest.raises(
        NormlabError,
        match=r"\[scale.tiny\]: a loss band must be \[high, low\] with high > low >= 0, got \[1.0, 2.0\]",
    ):
        run_study(str(path), scale="tiny", seeds=1, out=tmp_path / "out")


def _to_toml(raw: dict) -> str:
    """A minimal TOML writer for recipes (strings, numbers, lists, nested tables)."""
    import json

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines: list[str] = []

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", raw)
    return "\n".join(lines) + "\n"


# -- slow tier: quick scale ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_quick_study_runs_and_decides(tmp_path, name):
    outcome, files = run_study(name, scale="quick", seeds=3, out=tmp_path)
    assert (tmp_path / name / "report.html").is_file()
    assert outcome.key_figures
    if outcome.agrees_with_paper is None:  # inconclusive: the verdict says why (an arm, the seeds)
        assert outcome.verdict.startswith("Inconclusive"), outcome.verdict
    elif not outcome.agrees_with_paper:
        assert outcome.discrepancy
