"""The study framework: recipes, registry, mean ± CI, the runner, resumption, the CLI and `normlab report`."""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from scipy import stats

from normlab.cli import main
from normlab.errors import NormlabError
from normlab.studies import (
    StudyContext,
    get_study,
    list_studies,
    load_recipe,
    mean_ci,
    parse_recipe,
    render_study_folder,
    run_study,
    validate_params,
)

MINE = ["batch-coupling", "cost", "large-batch", "normalizer-free", "regularization", "small-batch"]

# -- mean ± 95% CI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[0.9, 0.92, 0.95], [1.0, 2.0], [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]])
def test_mean_ci_matches_scipy_t_interval(values):
    mean, half = mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert mean == pytest.approx(sum(values) / len(values), abs=1e-15)
    assert half == pytest.approx((high - low) / 2, rel=1e-4)


def test_mean_ci_edge_cases():
    assert mean_ci([0.5, float("nan"), 0.7])[0] == pytest.approx(0.6)  # diverged (NaN) runs are dropped
    mean, half = mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half)
    assert all(math.isnan(v) for v in mean_ci([]))
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 0.0)


# -- recipes and registry ----------------------------------------------------------------------------

GOOD = {
    "name": "demo",
    "title": "Demo",
    "claim": "c",
    "paper": "p",
    "module": "demo",
    "scale": {"tiny": {"steps": 1}, "quick": {"steps": 2}, "paper": {"steps": 3}},
}


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "demo.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_builtin_recipes_load_and_validate_against_their_modules():
    names = list_studies()
    assert set(MINE) <= set(names)
    for name in MINE:
        study = get_study(name)
        assert study.name == name and study.claim and study.paper
        assert set(study.scales) == {"tiny", "quick", "paper"}


def test_unknown_study_lists_valid_ones():
    with pytest.raises(NormlabError, match=r"unknown study 'nope'; valid studies: .*regularization"):
        get_study("nope")


def test_recipe_missing_field_names_file_field_and_type(tmp_path):
    path = _toml(tmp_path, 'name = "demo"\ntitle = "t"\nclaim = "c"\nmodule = "demo"\n')
    expected = rf"recipe {re.escape(str(path))}: missing field 'paper' \(expected str\)"
    with pytest.raises(NormlabError, match=expected):
        load_recipe(path)


def test_recipe_wrong_type_names_file_field_and_type(tmp_path):
    path = _toml(tmp_path, """\
        name = "demo"
        title = 3
        claim = "c"
        paper = "p"
        module = "demo"
    """)
    expected = rf"recipe {re.escape(str(path))}: field 'title' must be str, got int 3"
    with pytest.raises(NormlabError, match=expected):
        load_recipe(path)


def test_recipe_scale_tables_checked():
    raw = {**GOOD, "scale": {"tiny": {}, "quick": {}}}
    with pytest.raises(NormlabError, match=r"missing field scale.'paper' \(expected table\)"):
        parse_recipe(raw, source="r.toml")
    raw = {**GOOD, "scale": {"tiny": {}, "quick": 1, "paper": {}}}
    with pytest.raises(NormlabError, match=r"field scale.'quick' must be table, got int 1"):
        parse_recipe(raw, source="r.toml")
    raw = {**GOOD, "scale": {**GOOD["scale"], "huge": {}}}
    with pytest.raises(NormlabError, match="unknown scale.s. huge; allowed: tiny, quick, paper"):
        parse_recipe(raw, source="r.toml")
    with pytest.raises(NormlabError, match="unknown field.s. extra; allowed: name, title"):
        parse_recipe({**GOOD, "extra": 1}, source="r.toml")


def test_recipe_invalid_toml_and_missing_file(tmp_path):
    path = _toml(tmp_path, "name = \n")
    with pytest.raises(NormlabError, match="invalid TOML"):
        load_recipe(path)
    with pytest.raises(NormlabError, match="does not exist or is not a file"):
        load_recipe(tmp_path / "missing.toml")


def test_validate_params_checks_every_scale_and_list_items():
    study = parse_recipe({**GOOD, "scale": {"tiny": {"lrs": [0.1, 1]}, "quick": {"lrs": [0.1, "x"]},
                                            "paper": {"lrs": [1.0]}}}, source="r.toml")
    with pytest.raises(NormlabError, match=r"field scale.quick.lrs\[1\] must be float, got str 'x'"):
        validate_params(study, {"lrs": {"list": float}})
    study = parse_recipe({**GOOD, "scale": {k: {"steps": True} for k in ("tiny", "quick", "paper")}})
    with pytest.raises(NormlabError, match=r"field scale.tiny.'steps' must be int, got bool True"):
        validate_params(study, {"steps": int})


def test_builtin_recipe_with_wrong_typed_param_is_refused(tmp_path):
    source = Path(get_study("regularization").path).read_text()
    bad = source.replace("stat_batches = [8, 32]", 'stat_batches = [8, "32"]')
    path = tmp_path / "regularization.toml"
    path.write_text(bad)
    with pytest.raises(NormlabError, match=r"scale.tiny.stat_batches\[1\] must be int, got str '32'"):
        get_study(path)


def test_context_param_errors():
    study = parse_recipe(GOOD, source="r.toml")
    ctx = StudyContext(study, "tiny", {"steps": "3"}, [0], "cpu", Path("."), store=None)
    with pytest.raises(NormlabError, match=r"demo \[scale.tiny\]: missing field 'lr'"):
        ctx.param("lr")
    with pytest.raises(NormlabError, match=r"field 'steps' must be int, got str '3'"):
        ctx.param("steps", int)


# -- a fake study package (no training) for the runner and the report ---------------------------------

DEMO_MODULE = '''
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from normlab.studies import StudyOutcome, Table, mean_ci

def run(ctx):
    values = [float(s + 1) for s in ctx.seeds]
    table = Table("Scores <b>", ["what", "value"], [["score", mean_ci(values)]])
    fig, ax = plt.subplots()
    ax.plot(values)
    figure = ctx.save_figure(fig, "values", "values per seed")
    verdict = f"The mean score is {mean_ci(values)[0]:.2f}."
    return StudyOutcome([table], [figure], verdict, agrees_with_paper=False,
                        discrepancy="the paper says 3", data={"values": values})
'''


@pytest.fixture
def demo_recipe(tmp_path, monkeypatch):
    # An installed plugin: a package plus a .dist-info with an entry point in group "normlab.studies",
    # in a site folder apart from the recipe (recipes may only name built-in modules or plugins).
    package = f"fakestudies_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    (site / package / "demo.py").write_text(DEMO_MODULE)
    info = site / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[normlab.studies]\n{package} = {package}.demo\n")
    monkeypatch.syspath_prepend(str(site))
    path = tmp_path / "demo.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "demo"
        title = "Demo <study>"
        claim = "Scores are 3."
        paper = "Nobody 2024"
        module = "plugin:{package}"
        [scale.tiny]
        n = 1
        [scale.quick]
        n = 2
        [scale.paper]
        n = 3
    """))
    yield path
    sys.modules.pop(f"{package}.demo", None)
    sys.modules.pop(package, None)


def test_run_study_writes_report_outcome_and_figures(demo_recipe, tmp_path):
    outcome, files = run_study(demo_recipe, scale="tiny", seeds=3, out=tmp_path / "out")
    folder = tmp_path / "out" / "demo"
    assert files.html == folder / "report.html"
    assert outcome.verdict == "The mean score is 2.00."
    page = files.html.read_text()
    assert "The mean score is 2.00." in page and "Disagrees with the paper" in page
    assert "Discrepancy: the paper says 3" in page
    assert "Demo &lt;study&gt;" in page and "Scores &lt;b&gt;" in page
    assert "data:image/png;base64," in page
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert f"| score | 2 ± {half:.2g} |" in files.markdown_text
    saved = json.loads((folder / "outcome.json").read_text())
    assert saved["meta"]["seeds"] == [0, 1, 2] and saved["outcome"]["data"]["values"] == [1.0, 2.0, 3.0]
    assert (folder / "values.png").is_file() and (folder / "runs.sqlite").is_file()
    # Re-rendering from the folder gives the same Markdown.
    (folder / "report.md").unlink()
    again = render_study_folder(folder)
    assert again.markdown_text == files.markdown_text


def test_run_study_bad_inputs(demo_recipe, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(NormlabError, match=f"output folder {re.escape(str(blocker))} exists and is a file"):
        run_study(demo_recipe, scale="tiny", seeds=1, out=blocker)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "demo").write_text("x")
    with pytest.raises(NormlabError, match="o/demo exists and is a file"):
        run_study(demo_recipe, scale="tiny", seeds=1, out=tmp_path / "o")
    with pytest.raises(NormlabError, match="unknown scale 'big'; valid scales: tiny, quick, paper"):
        run_study(demo_recipe, scale="big", out=tmp_path)
    with pytest.raises(NormlabError, match="seeds must be a positive int, got 0"):
        run_study(demo_recipe, scale="tiny", seeds=0, out=tmp_path)
    with pytest.raises(NormlabError, match="is not a study output folder: it has no outcome.json"):
        render_study_folder(tmp_path)


# -- resumption: an interrupted sweep loses nothing -----------------------------------------------------


def _interrupt(config):
    def stop(ctx):
        raise KeyboardInterrupt

    return [stop]


def test_interrupted_study_resumes_from_the_store(tmp_path, monkeypatch):
    import normlab.sweep

    real = normlab.sweep.run_sweep

    def interrupted(configs, store, executor=None, callbacks_factory=None, **kw):
        real(configs[:3], store, executor)  # three runs finish ...
        real(configs[3:4], store, executor, callbacks_factory=_interrupt)  # ... the fourth is killed mid-run
        raise AssertionError("unreachable")

    monkeypatch.setattr(normlab.sweep, "run_sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study("regularization", scale="tiny", seeds=1, out=tmp_path)
    monkeypatch.setattr(normlab.sweep, "run_sweep", real)

    from normlab.store import Store

    store = Store(tmp_path / "regularization" / "runs.sqlite")
    before = {run.id: run for run in store.runs()}
    assert [r.status for r in before.values()] == ["finished"] * 3 + ["failed"]

    outcome, _ = run_study("regularization", scale="tiny", seeds=1, out=tmp_path)
    after = store.runs()
    finished = [r for r in after if r.status == "finished"]
    assert len(finished) == 6  # 3 arms (BN/8, BN/32, GN) x 2 lrs x 1 seed
    assert len({r.config_key for r in finished}) == 6  # nothing trained twice
    for run_id, run in before.items():  # the finished runs were read back, not retrained
        if run.status == "finished":
            assert store.get_run(run_id).summary == run.summary
    assert len(after) == 7  # + the failed (interrupted) record, kept
    assert outcome.tables[0].rows


# -- CLI ---------------------------------------------------------------------------------------------


def _cli(args: list[str]) -> int:
    """Run ``normlab ARGS`` in-process; the exit code (typer exits 0 on success)."""
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_cli_list_and_unknown(capsys):
    assert _cli(["study", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in MINE)
    assert _cli(["study", "nope"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown study 'nope'; valid studies:" in err and "Traceback" not in err


def test_cli_study_bad_counts(capsys):
    assert _cli(["study", "regularization", "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    assert _cli(["study", "regularization", "--threads", "-1"]) == 2
    assert "--threads must be >= 0 (0 = usable cores / workers), got -1" in capsys.readouterr().err
    assert _cli(["study"]) == 2
    assert "give a study name, --all or --list; valid studies:" in capsys.readouterr().err
    assert _cli(["study", "regularization", "--all"]) == 2
    assert "give a study name or --all, not both (got 'regularization' and --all)" in capsys.readouterr().err


def test_cli_study_out_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert _cli(["study", "regularization", "--scale", "tiny", "--out", str(blocker)]) == 2
    assert "exists and is a file" in capsys.readouterr().err


def test_cli_study_and_report(demo_recipe, tmp_path, capsys):
    out_dir = str(tmp_path / "o")
    assert _cli(["study", str(demo_recipe), "--scale", "tiny", "--seeds", "2", "--out", out_dir]) == 0
    out = capsys.readouterr().out
    assert "The mean score is 1.50." in out and "report.html" in out
    folder = tmp_path / "o" / "demo"
    (folder / "report.html").unlink()
    assert _cli(["report", str(folder)]) == 0
    assert (folder / "report.html").is_file()
    assert "The mean score is 1.50." in capsys.readouterr().out


def test_cli_report_of_a_store(tmp_path, capsys):
    from normlab.store import Store

    store = Store(tmp_path / "s.sqlite")
    for lr, status in ((0.1, "finished"), (10.0, "diverged")):
        run_id = store.start_run({"norm": "bn", "lr": lr}, group="g<1>")
        store.finish_run(run_id, status, summary={"final_test_acc": 0.9 if status == "finished" else None},
                         error=None if status == "finished" else "loss nan at step 3")
    store.close()
    assert _cli(["report", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Group g&lt;1&gt;" in page and "loss nan at step 3" in page
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| finished | 1 |" in md and "| diverged | 1 |" in md
    assert "| 1 | finished | 0.1 | 0.9 |" in md
    assert _cli(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- normlab study --all: one table, an index report ------------------------------------------------


def test_run_all_rows_and_index_report(demo_recipe, tmp_path):
    from normlab.studies.suite import run_all, suite_table, write_index

    out = tmp_path / "all"
    rows = run_all([str(demo_recipe), "no-such-study"], out=out, scale="tiny", seeds=3)
    demo, broken = rows
    assert (demo.name, demo.claim, demo.verdict, demo.report) == (
        str(demo_recipe), "Scores are 3.", "disagrees", "demo/report.html"
    )
    assert demo.sentence == "The mean score is 2.00." and demo.wall_time_s >= 0
    assert broken.verdict == "error" and broken.key_figures.startswith("NormlabError: unknown study")
    table = suite_table(rows)
    assert table.columns[:3] == ["study", "paper's claim", "our verdict"]
    assert table.column("our verdict") == ["disagrees", "error"]
    files = write_index(out, rows, scale="tiny", seeds=3)
    page = files.html.read_text()
    assert files.html == out / "index.html" and '<a href="demo/report.html">' in page
    assert "normlab study --all --scale tiny --seeds 3" in page
    saved = json.loads((out / "index.json").read_text())
    assert [r["verdict"] for r in saved["rows"]] == ["disagrees", "error"]
    assert "- [" in files.markdown_text and "](demo/report.html)" in files.markdown_text


def test_cli_all_json_runs_every_listed_study(demo_recipe, tmp_path, capsys, monkeypatch):
    import normlab.studies.registry as registry

    monkeypatch.setattr(registry, "list_studies", lambda: [str(demo_recipe)])
    out = tmp_path / "o"
    assert _cli(["study", "--all", "--scale", "tiny", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scale"] == "tiny" and printed["seeds"] == 3
    assert [r["verdict"] for r in printed["rows"]] == ["disagrees"]
    assert (out / "index.html").is_file() and (out / "demo" / "report.html").is_file()


def test_report_of_a_results_folder_writes_the_index(demo_recipe, tmp_path, capsys):
    out = tmp_path / "res"
    assert _cli(["study", str(demo_recipe), "--scale", "tiny", "--seeds", "3", "--out", str(out)]) == 0
    (out / "junk").mkdir()
    (out / "junk" / "outcome.json").write_text("{not json")  # untrusted: skipped, never fatal
    capsys.readouterr()
    assert _cli(["report", str(out), "--quiet"]) == 0
    page = (out / "index.html").read_text()
    assert '<a href="demo/report.html">' in page and "disagrees" in page
    assert "normlab study --all --scale tiny --seeds 3" in page
    assert json.loads((out / "index.json").read_text())["rows"][0]["name"] == "demo"


# -- the margin: stated by the recipe, overridden by --margin, recorded ------------------------------------

ALL_MINE = [*MINE, "mean-shift", "residual", "replicas"]


def test_my_recipes_state_their_margin_and_its_unit():
    margins = {name: (get_study(name).margin, get_study(name).margin_unit) for name in ALL_MINE}
    assert margins["regularization"][0] == 0.01 and "accuracy" in margins["regularization"][1]
    assert margins["cost"][0] == pytest.approx(math.log(1.1), abs=1e-4) and "log ratio" in margins["cost"][1]
    assert margins["batch-coupling"][0] == 1e-6
    for name in ALL_MINE:
        text = (Path(get_study(name).path)).read_text()
        assert "\nmargin = " in text and "\nmargin_unit = " in text, name


def test_recipe_margin_is_checked(tmp_path):
    base = 'name = "demo"\ntitle = "t"\nclaim = "c"\npaper = "p"\nmodule = "demo"\n'
    scales = "[scale.tiny]\n[scale.quick]\n[scale.paper]\n"
    path = _toml(tmp_path, base + "margin = -0.5\n" + scales)
    expected = (rf"recipe {re.escape(str(path))}: field 'margin' must be a positive number \(the "
                r"equivalence margin\), got -0.5")
    with pytest.raises(NormlabError, match=expected):
        load_recipe(path)
    path = _toml(tmp_path, base + 'margin = "1pt"\n' + scales)
    with pytest.raises(NormlabError, match=r"field 'margin' must be float, got str '1pt'"):
        load_recipe(path)
    study = load_recipe(_toml(tmp_path, base + 'margin = 0.02\nmargin_unit = "accuracy"\n' + scales))
    assert (study.margin, study.margin_unit) == (0.02, "accuracy")
    assert load_recipe(_toml(tmp_path, base + scales)).margin == 0.01  # the default: 1 point


def test_outcome_and_report_state_the_margin(demo_recipe, tmp_path):
    _, files = run_study(demo_recipe, scale="tiny", seeds=2, out=tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "demo" / "outcome.json").read_text())["meta"]
    assert (meta["margin"], meta["margin_source"]) == (0.01, "recipe")
    assert "Margin: ±0.01 (accuracy (0.01 = 1 point); the recipe's)" in files.markdown_text
    _, files = run_study(demo_recipe, scale="tiny", seeds=2, out=tmp_path / "b", margin=0.025)
    meta = json.loads((tmp_path / "b" / "demo" / "outcome.json").read_text())["meta"]
    assert (meta["margin"], meta["margin_source"]) == (0.025, "--margin")
    assert "Margin: ±0.025 (accuracy (0.01 = 1 point); set by --margin)" in files.markdown_text
    assert "--seeds 2 --margin 0.025" in files.markdown_text
    for bad in (0, -1.0, math.inf, True):
        with pytest.raises(NormlabError, match=r"--margin must be a positive number"):
            run_study(demo_recipe, scale="tiny", seeds=1, out=tmp_path / "c", margin=bad)


def test_cli_margin_positive_and_not_with_all(demo_recipe, tmp_path, capsys):
    assert _cli(["study", str(demo_recipe), "--scale", "tiny", "--margin", "0", "--out", str(tmp_path)]) == 2
    assert "--margin must be a positive number (the equivalence margin), got 0.0" in capsys.readouterr().err
    assert _cli(["study", "--all", "--margin", "0.02", "--out", str(tmp_path)]) == 2
    assert "--margin goes with one study, not --all" in capsys.readouterr().err
    assert _cli(["study", str(demo_recipe), "--scale", "tiny", "--seeds", "1", "--margin", "0.03",
                 "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "demo" / "outcome.json").read_text())["meta"]["margin"] == 0.03
