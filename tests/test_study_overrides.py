"""``normlab study NAME --set FIELD=VALUE``: a scale table's field changed from the command line."""

from __future__ import annotations

import json

import pytest
from _cli import run_cli

from normlab.errors import NormlabError
from normlab.store import Store
from normlab.studies.overrides import apply_overrides, override_flags, parse_overrides
from normlab.studies.runner import run_study


def test_values_are_read_as_toml_and_bare_words_as_strings():
    parsed = parse_overrides([
        "steps=6000", "lr = 0.05", "lrs=[0.1, 0.5]", "budget=auto", 'dataset="cifar10"', "augment=true",
        "nets.vgg.steps=10_000", "steps=7000",
    ])
    assert parsed == {"steps": 7000, "lr": 0.05, "lrs": [0.1, 0.5], "budget": "auto", "dataset": "cifar10",
                      "augment": True, "nets.vgg.steps": 10000}  # the last of a field set twice wins
    assert override_flags({"steps": 7000, "lrs": [0.1, 0.5], "budget": "auto", "name": "a b"}) == (
        '--set steps=7000 --set lrs=[0.1, 0.5] --set budget=auto --set name="a b"'
    )


@pytest.mark.parametrize(("text", "message"), [
    ("steps", "--set 'steps': expected FIELD=VALUE, e.g. --set steps=6000"),
    ("=5", "expected FIELD=VALUE"),
    ("steps=", "expected FIELD=VALUE"),
    ("nets..steps=5", "expected FIELD=VALUE"),
    ("lrs=[0.1,", "'[0.1,' is not a TOML value"),
    ("steps=1\nx=2", "the value must be on one line"),
])
def test_malformed_set_is_refused(text, message):
    with pytest.raises(NormlabError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_overrides([text])


TABLE = {"steps": 1500, "lrs": [0.1], "eta": 0.5, "nets": {"vgg": {"steps": 2500, "model": "vgg"}}}


def test_apply_sets_nested_fields_on_a_copy():
    out = apply_overrides(TABLE, {"nets.vgg.steps": 10000, "steps": 6000, "eta": 1, "lrs": [1, 0.5]}, "t")
    assert out == {"steps": 6000, "lrs": [1.0, 0.5], "eta": 1.0,
                   "nets": {"vgg": {"steps": 10000, "model": "vgg"}}}
    # an int where the recipe has a float is that float (TrainConfig's lr takes floats only)
    assert isinstance(out["eta"], float) and isinstance(out["lrs"][0], float)
    assert TABLE["nets"]["vgg"]["steps"] == 2500 and TABLE["steps"] == 1500  # the recipe is untouched


@pytest.mark.parametrize(("field", "value", "message"), [
    ("stepz", 1, "--set stepz: t has no field 'stepz' (fields of the table: eta, lrs, nets, steps)"),
    ("nets.dln.steps", 1, "t has no field 'nets.dln' (fields of nets: vgg)"),
    ("steps.x", 1, "--set steps.x: steps of t is not a table"),
    ("nets.vgg", 1, "--set nets.vgg: that is a table of t; set its fields one by one"),
    ("steps", "many", "--set steps: expected an int like the recipe's 1500, got a string 'many'"),
    ("steps", 1.5, "expected an int like the recipe's 1500, got a number 1.5"),
    ("steps", True, "expected an int like the recipe's 1500, got a boolean True"),
    ("lrs", 0.1, "expected a list like the recipe's [0.1], got a number 0.1"),
])
def test_apply_refuses_unknown_fields_and_other_types(field, value, message):
    with pytest.raises(NormlabError) as err:
        apply_overrides(TABLE, {field: value}, "t")
    assert message in str(err.value)


def test_a_study_trains_with_the_fields_set_and_its_report_says_so(tmp_path):
    outcome, files = run_study("ics", scale="tiny", seeds=1, out=tmp_path,
                               overrides={"nets.vgg.steps": 12, "probe_every": 6})
    store = Store(tmp_path / "ics" / "runs.sqlite", readonly=True)
    steps = {(r.config["model"], r.config["steps"]) for r in store.runs()}
    assert steps == {("vgg", 12), ("dln", 8)}  # the VGG's budget changed, the DLN's (not set) did not
    meta = json.loads((tmp_path / "ics" / "outcome.json").read_text())["meta"]
    assert meta["overrides"] == {"nets.vgg.steps": 12, "probe_every": 6}
    assert meta["params"]["nets"]["vgg"]["steps"] == 12 and meta["params"]["probe_every"] == 6
    html = files.html.read_text()
    assert "normlab study ics --scale tiny --seeds 1 --set nets.vgg.steps=12 --set probe_every=6" in html
    assert "of recipe &#x27;ics&#x27;, changed by --set nets.vgg.steps=12 --set probe_every=6." in html
    assert files.markdown_text.splitlines()[2] == (
        "_normlab study ics --scale tiny --seeds 1 --set nets.vgg.steps=12 --set probe_every=6_")


def test_a_value_the_study_cannot_take_fails_before_training(tmp_path):
    with pytest.raises(NormlabError, match=r"field scale.tiny.norms\[0\] must be str, got int 1"):
        run_study("ics", scale="tiny", seeds=1, out=tmp_path, overrides={"norms": [1]})
    assert not (tmp_path / "ics").exists()  # nothing written, nothing trained


@pytest.mark.parametrize(("argv", "message"), [
    (["study", "ics", "--set", "nets.vgg.stepz=10"],
     "error: --set nets.vgg.stepz: scale.quick of recipe ics has no field 'nets.vgg.stepz' (fields of "
     "nets.vgg: "),
    (["study", "--all", "--set", "steps=10"], "--set goes with one study, not --all"),
    (["study", "noisy-bn", "--set", "steps"], "expected FIELD=VALUE"),
])
def test_cli_bad_set_is_one_line_exit_2(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv)
    assert code == 2 and message in err and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "normlab-results").exists()  # refused before any folder or store
