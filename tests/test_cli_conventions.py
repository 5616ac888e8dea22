"""CLI conventions: --version, shell completion, --help at 80 columns, train --like, the checkpoint path,
and compare's table at 80 columns."""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

import pytest
from _cli import cli
from rich.console import Console

from normlab import __version__
from normlab.cli import app, compare_cmd
from normlab.store import Store
from normlab.train import TrainConfig

TINY = ["--dataset", "synthetic", "--batch-size", "16", "--steps", "6", "--log-every", "3",
        "--eval-train-samples", "32", "--no-progress"]  # fmt: skip
COMMANDS = [["train"], ["compare"], ["probe"], ["study"], ["report"], ["runs", "list"], ["runs", "show"],
            ["runs", "export"], ["models"], ["norms"], ["crossval", "layer"]]  # fmt: skip


def test_version(capsys):
    import torch

    code, out, err = cli(capsys, "--version")
    assert code == 0 and err == ""
    assert out == f"normlab {__version__} (torch {torch.__version__}, Python {platform.python_version()})\n"


def test_completion_script_and_completions(capsys, monkeypatch):
    code, out, _ = cli(capsys, "--show-completion", "bash")
    assert code == 0 and "_NORMLAB_COMPLETE=complete_bash" in out and "complete -o" in out
    code, out, _ = cli(capsys, "--help")
    assert "--install-completion" in out
    monkeypatch.setenv("_NORMLAB_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "normlab train --batch")
    monkeypatch.setenv("COMP_CWORD", "2")
    code, out, _ = cli(capsys)
    assert code == 0 and out.split() == ["--batch-size"]
    monkeypatch.setenv("COMP_WORDS", "normlab tr")
    monkeypatch.setenv("COMP_CWORD", "1")
    code, out, _ = cli(capsys)
    assert out.split() == ["train"]


def _help(capsys, monkeypatch, *command: str) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli(capsys, *command, "--help")
    assert code == 0, err
    return out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_fits_80_columns_uncut(capsys, monkeypatch, command):
    out = _help(capsys, monkeypatch, *command)
    too_long = [line for line in out.splitlines() if len(line) > 80]
    assert too_long == []
    assert "…" not in out  # rich's cut, gone with plain click help
    # Every option of the command is named whole in the help.
    click_command = _click_command(command)
    for param in click_command.params:
        for name in param.opts:
            assert re.search(rf"(^|[\s,/]){re.escape(name)}([\s,/=]|$)", out, re.M), name


def _click_command(command: list[str]):
    import typer.main

    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]
    return group


def _entries(help_text: str) -> dict[str, str]:
    """Option entries of click's help: the first flag of each -> its text (continuation lines joined)."""
    entries: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        match = re.match(r"  (?:-\w, )?(--[\w-]+)(.*)", line)
        if match:
            flag = match.group(1)
            entries[flag] = match.group(2)
        elif flag is not None and line.startswith("    "):
            entries[flag] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_train_help_gives_every_default_and_meaning(capsys, monkeypatch):
    entries = _entries(_help(capsys, monkeypatch, "train"))
    for option, default in [("--lr", "0.1"), ("--batch-size", "128"), ("--epochs", "10"),
                            ("--optimizer", "sgd"), ("--val-fraction", "0.0"), ("--budget", "fixed"),
                            ("--wd-exclude-norm-bias", "on"), ("--steps", "unset")]:  # fmt: skip
        assert entries[option].endswith(f"[default: {default}]"), (option, entries[option])
    for field in TrainConfig.__dataclass_fields__:
        flag = "--" + field.replace("_", "-")
        text = entries[flag].split(" [default:", 1)[0]
        assert "[default: " in entries[flag], flag
        # Words of meaning after the metavar, never the field's bare name (--stop-below said "stop_below").
        words = [w for w in text.split() if not w.startswith(("<", "/", "--"))]
        assert len(words) >= 2, f"{flag}: {text!r}"
    assert "held-out accuracy is still below this" in entries["--stop-below"]
    assert entries["--like"].startswith("RUN_ID train the stored run RUN_ID's config again")


def test_executor_help_keeps_its_brackets(capsys, monkeypatch):
    out = " ".join(_help(capsys, monkeypatch, "compare").split())
    assert "pip install 'normlab[ray]'" in out
    assert "--seeds <int> seeds per configuration (0..n-1) [default: 3]" in out
    assert "--wide the table with every column" in out


def test_train_like_retrains_the_stored_config_and_prints_the_checkpoint(capsys, tmp_path):
    db, ckpt = str(tmp_path / "db.sqlite"), tmp_path / "ckpt"
    # A run like a compare cell: AdamW, auto budget, validation split, a stop bar; none of train's defaults.
    code, out, err = cli(capsys, "train", *TINY, "--optimizer", "adamw", "--lr", "0.003", "--budget", "auto",
                         "--val-fraction", "0.25", "--stop-below", "0.05", "--norm", "gn", "--seed", "2",
                         "--checkpoint-dir", str(ckpt), "--store", db, "--json")  # fmt: skip
    assert code == 0, err
    first = json.loads(out)
    assert first["checkpoint"] is not None and Path(first["checkpoint"]).is_file()
    assert Path(first["checkpoint"]).parent == ckpt
    code, out, err = cli(capsys, "train", "--like", str(first["run_id"]), "--store", db, "--no-progress",
                         "--json")  # fmt: skip
    assert code == 0, err
    again = json.loads(out)
    with Store(db) as store:
        stored, redone = store.get_run(first["run_id"]), store.get_run(again["run_id"])
    assert redone.id != stored.id and redone.config == stored.config
    assert redone.config_key == stored.config_key
    assert again["final_test_acc"] == first["final_test_acc"] and again["steps"] == first["steps"]
    # An option beside --like changes that field only.
    code, out, err = cli(capsys, "train", "--like", str(first["run_id"]), "--seed", "5", "--store", db,
                         "--no-progress")  # fmt: skip
    assert code == 0, err
    assert f"checkpoint: {ckpt}" in out  # the table run prints where its checkpoint went
    with Store(db) as store:
        third = max(store.runs(), key=lambda run: run.id)
    assert {k for k in stored.config if stored.config[k] != third.config[k]} == {"seed"}


def test_train_like_bad_input(capsys, tmp_path):
    db = str(tmp_path / "db.sqlite")
    code, _, err = cli(capsys, "train", "--like", "3", "--store", db)
    assert code == 2 and err.startswith(f"error: no results store at {db!r}")
    code, out, _ = cli(capsys, "train", *TINY, "--store", db, "--json")
    run_id = json.loads(out)["run_id"]
    code, _, err = cli(capsys, "train", "--like", str(run_id + 7), "--store", db)
    assert code == 2 and f"no run with id {run_id + 7}" in err
    toml = str(tmp_path / "x.toml")
    code, _, err = cli(capsys, "train", "--like", str(run_id), "--config", toml, "--store", db)
    assert code == 2 and "error: give --config or --like, not both" in err
    with Store(db) as store:  # a store from elsewhere naming user code: imported only when given as --model
        store._write(lambda c: c.execute("UPDATE runs SET config = json_set(config, '$.model', 'evil.py:f')"))
    code, _, err = cli(capsys, "train", "--like", str(run_id), "--store", db)
    assert code == 2 and f"run {run_id} of the store names model code 'evil.py:f'" in err


def _summary(verdicts: bool = True):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reports import _compare_results

    results = _compare_results()
    if not verdicts:  # two seeds: every verdict is inconclusive
        results = [r for r in results if r.config["seed"] < 2]
    example = TrainConfig(model="cnn", dataset="mnist1d", budget="auto", steps=3000)
    return compare_cmd.compare_summary(results, 12.0, example)


@pytest.mark.parametrize("verdicts", [True, False], ids=["decided", "inconclusive"])
def test_compare_table_fits_80_columns_with_a_legend(capsys, monkeypatch, verdicts):
    monkeypatch.setattr(compare_cmd, "console", lambda: Console(width=80))
    compare_cmd._print_compare(_summary(verdicts), "cnn", "mnist1d", 3)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in out
    header = next(line for line in lines if "verdict" in line)
    assert header.split() == ["norm", "bs", "test", "acc", "%", "verdict", "conv", "best", "lr", "max", "lr"]
    rows = [line.split() for line in lines if re.match(r"\s*(bn|gn)\s+\d", line)]
    assert len(rows) == 4
    words = {row[3] for row in rows}
    assert words == ({"win", "loss"} if verdicts else {"inconclusive"})
    assert "bs: batch size; test acc %: mean ± 95% t-interval over seeds" in " ".join(out.split())
    assert "--wide: every column" in out
    monkeypatch.setattr(compare_cmd, "console", lambda: Console(width=160))  # --wide: a wide terminal
    compare_cmd._print_compare(_summary(verdicts), "cnn", "mnist1d", 3, wide=True)
    wide = capsys.readouterr().out
    assert "…" not in wide and "steps/s" in wide and "train/eval gap" in wide and "(5 groups)" in wide
