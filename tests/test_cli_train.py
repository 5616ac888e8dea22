"""The train / runs / models / norms / compare commands, through ``normlab.cli.main`` and one subprocess."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import pytest
from _cli import cli

from normlab.store import Store

TINY = ["--subset", "256", "--batch-size", "32", "--steps", "8", "--width", "4", "--log-every", "4",
        "--eval-train-samples", "64", "--no-progress"]  # fmt: skip




@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "store" / "results.sqlite")


def test_train_json_then_runs_list_show_export(capsys, db, tmp_path):
    code, out, err = cli(capsys, "train", *TINY, "--norm", "gn", "--store", db, "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "finished" and result["steps"] == 8 and result["config"]["norm"] == "gn"

    code, out, _ = cli(capsys, "runs", "list", "--store", db, "--json")
    runs = json.loads(out)
    assert code == 0 and [r["id"] for r in runs] == [result["run_id"]]
    assert runs[0]["summary"]["final_test_acc"] == result["final_test_acc"]

    code, out, _ = cli(capsys, "runs", "show", str(result["run_id"]), "--store", db, "--json")
    shown = json.loads(out)
    assert code == 0 and [s for s, _ in shown["metrics"]["train/loss"]] == [4, 8]

    code, out, _ = cli(capsys, "runs", "export", "--format", "csv", "--store", db)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and rows[0]["config.norm"] == "gn"
    assert float(rows[0]["summary.final_test_acc"]) == pytest.approx(result["final_test_acc"])
    target = tmp_path / "runs.json"
    code, _, _ = cli(capsys, "runs", "export", "--format", "json", "--output", str(target), "--store", db)
    assert code == 0 and json.loads(target.read_text())[0]["id"] == result["run_id"]

    code, out, _ = cli(capsys, "runs", "list", "--store", db)
    assert code == 0 and "gn" in out and "finished" in out


def test_config_file_with_option_overrides(capsys, db, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('norm = "none"\nlr = 0.05\nsteps = 4\nsubset = 128\nbatch_size = 16\nwidth = 4\n')
    code, out, err = cli(capsys, "train", "--config", str(path), "--lr", "0.02", "--store", db, "--json")
    assert code == 0, err
    config = json.loads(out)["config"]
    assert (config["norm"], config["lr"], config["steps"], config["batch_size"]) == ("none", 0.02, 4, 16)


def test_models_and_norms_listings(capsys):
    code, out, _ = cli(capsys, "models", "--json")
    assert code == 0 and {"cnn", "resnet", "nf_resnet", "dln"} <= {m["name"] for m in json.loads(out)}
    code, out, _ = cli(capsys, "norms", "--json")
    names = {n["name"] for n in json.loads(out)}
    assert code == 0 and {"bn", "gn", "ln", "none", "nf"} <= names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "resnet9"], "error: unknown model 'resnet9'; valid models: cnn"),
        (["train", "--lr", "-1"], "error: lr=-1.0 is out of range; allowed: >= 0.0"),
        (["train", "--dataset", "cifar10", "--data-root", "{tmp}/nodata"], "error: "),
        (["train", "--norm-options", "{groups: 2"], "error: --norm-options must be a JSON object"),
        (["train", "--milestones", "10,x"], "error: --milestones='10,x' must be a comma-separated list"),
        (["train", "--config", "{tmp}/bad.toml"], "error: config file '{tmp}/bad.toml' is not valid TOML"),
        (["train", "--config", "{tmp}/unknown.toml"], "error: unknown TrainConfig field(s) learning_rate in"),
        (["train", "--resume", "--checkpoint-dir", "{tmp}/ckpt"], "error: checkpoint '{tmp}/ckpt/"),
        (["train", "--threads", "0"], "error: --threads must be between 1 and"),
        (["compare", "--norms", "bn,batchnorm"], "error: unknown norm(s) batchnorm; valid norms:"),
        (["compare", "--batch-sizes", "16,x"], "error: --batch-sizes='16,x' must be a comma-separated list"),
        (["compare", "--seeds", "0"], "error: --seeds must be >= 1, got 0"),
        (["compare", "--workers", "0"], "error: workers must be a positive int, got 0"),
        (["compare", "--model", "vgg19"], "error: unknown model 'vgg19'"),
        (["runs", "list"], "error: no results store at"),
        (["runs", "export", "--format", "xml"], "error: unknown export format 'xml'; allowed: csv, json"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_store_untouched(capsys, tmp_path, args, message):
    from normlab.train import TrainConfig

    (tmp_path / "bad.toml").write_text("lr = = 1\n")
    (tmp_path / "unknown.toml").write_text("learning_rate = 1\n")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / f"{TrainConfig(checkpoint_dir='x').key()}.pt").write_bytes(b"corrupt" * 10)
    db = tmp_path / "db.sqlite"
    if args[0] == "runs" and args[1] == "export":
        Store(db).close()
    before = db.read_bytes() if db.exists() else None
    code, out, err = cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args], "--store", str(db))
    assert code == 2
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
    assert out == "" and "Traceback" not in err
    assert (db.read_bytes() if db.exists() else None) == before


def test_compare_json_statistics_and_resume(capsys, db, tmp_path):
    args = ["compare", "--norms", "bn,none", "--batch-sizes", "32", "--lrs", "0.02", "--seeds", "2",
            "--epochs", "6", "--lr-extensions", "0", "--lr-scaling", "linear", "--subset", "256",
            "--width", "8", "--workers", "2",
            "--store", db, "--out", str(tmp_path / "compare"), "--json"]  # fmt: skip
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    report = json.loads(out)
    html = (tmp_path / "compare" / "report.html").read_text()
    assert report["report"] == str(tmp_path / "compare" / "report.html")
    assert "Verdicts" in html and "Learning curves" in html
    assert report["runs"] == 4 and report["statuses"] == {"finished": 4, "diverged": 0, "failed": 0}
    assert report["budget"] == "fixed" and report["epochs"] == 6
    rows = {row["norm"]: row for row in report["rows"]}
    assert set(rows) == {"bn", "none"} and rows["bn"]["best_lr"] == 0.02 * 32 / 128
    a, b = rows["bn"]["accuracies"]
    assert rows["bn"]["test_acc_mean"] == pytest.approx((a + b) / 2)
    # t_{0.975, 1} * s / sqrt(2) with s the sample std of two values: 12.7062 * |a - b| / 2
    assert rows["bn"]["test_acc_ci95"] == pytest.approx(12.706205 * abs(a - b) / 2, rel=1e-6)
    assert rows["bn"]["steps_per_s"] > 0 and rows["bn"]["steps"] == [42, 42]  # 6 epochs of 7 batches
    # Two seeds and a one-lr grid (best lr at its edge): every verdict is inconclusive, with the reason.
    assert rows["bn"]["verdict"] == "inconclusive" and rows["bn"]["best_lr_at_edge"] == "high"
    assert rows["bn"]["largest_stable_lr_text"] == ">= 0.005 (top of grid)"
    assert all(c in ("converged", "unconverged") for c in rows["bn"]["convergences"])
    assert "the best lr of bn at batch 32, 0.005, is at the top of its grid" in report["verdicts"][1]
    # none stalls at chance level in 42 steps: no stable lr, which is not a result either.
    assert rows["none"]["best_lr"] is None and rows["none"]["verdict"] == "inconclusive"

    code, out, _ = cli(capsys, *args)  # everything is in the store now: nothing is retrained
    assert code == 0 and json.loads(out)["rows"] == report["rows"]
    with Store(db) as store:
        assert len(store.runs()) == 4
    code, out, _ = cli(capsys, *args[:-1])
    assert code == 0 and "bn" in out and "max lr" in out and not math.isnan(report["wall_time"])


def test_compare_gn_json_shows_its_groups_and_bad_budget_flags(capsys, db, tmp_path):
    args = ["compare", "--norms", "gn", "--batch-sizes", "32", "--lrs", "0.01", "--seeds", "1", "--steps",
            "8", "--lr-extensions", "0", "--subset", "256", "--workers", "1", "--store", db, "--no-report",
            "--json"]  # fmt: skip
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    (row,) = json.loads(out)["rows"]
    assert row["gn_groups"] == [5, 5, 5]  # the MNIST-1D cnn's 25 channels: Group Norm, not Instance Norm
    code, _, err = cli(capsys, "compare", "--budget", "fixed", "--store", db)
    assert code == 2 and "error: --budget fixed needs --epochs N or --steps N" in err
    code, _, err = cli(capsys, "compare", "--epochs", "2", "--steps", "5", "--store", db)
    assert code == 2 and "error: give --epochs or --steps, not both" in err


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "normlab", "train", "--norm", "batchnorm", "--store", str(tmp_path / "s.db")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: unknown norm 'batchnorm'") and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.db").exists()
