"""Trackers against the real packages: what normlab sends is read back with each tracker's own reader.

TensorBoard event files through tensorboard's ``EventAccumulator``; MLflow runs through ``MlflowClient``
(MLflow's local SQLite store under tmp_path); W&B offline run folders through W&B's own protobuf records
(``wandb.proto.wandb_internal_pb2.Record``) in the run's transaction log. Every number is compared with
what the results store holds for the same run.
"""

from __future__ import annotations

import json
import struct
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from _cli import cli

from normlab.probes import ProbeSchedule
from normlab.store import Store
from normlab.sweep import run_sweep
from normlab.track import SweepLog, hyperparameters, open_tracker, run_name
from normlab.train import TrainConfig, Trainer


def _config(**overrides):
    values = dict(model="mlp", norm="bn", dataset="synthetic", steps=6, batch_size=16, log_every=2,
                  eval_every=3, subset=128, eval_train_samples=64)  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


PROBES = {"activation_stats": 3, "landscape": (6, {"num_points": 2})}


def _train(tmp_path, tracker):
    """One tracked run with probes; returns (store, run id, result)."""
    store = Store(tmp_path / "runs.sqlite")
    trainer = Trainer(_config(), store=store, callbacks=[ProbeSchedule(PROBES)], progress=False,
                      trackers=[tracker])
    result = trainer.fit()
    tracker.close()
    return store, trainer.run_id, result


def _stored(store, run_id):
    """name -> [(step, value)] of every metric of the run, from the results store."""
    return {name: store.metrics(run_id, name) for name in store.metric_names(run_id)}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture
def no_mlflow_env(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# -- TensorBoard ------------------------------------------------------------------------------------------


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_the_stored_metrics_probes_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2

    store, run_id, result = _train(tmp_path, open_tracker("tensorboard", tmp_path / "logs"))
    folder = tmp_path / "logs" / "tensorboard" / run_name(store.get_run(run_id).config, run_id)
    assert folder.name == f"run{run_id}-mlp-bn-bs16-lr0.1-seed0"
    acc = _events(folder)
    stored = _stored(store, run_id)
    assert "probe/landscape/beta_smoothness" in stored and "train/loss" in stored and "test/acc" in stored
    for name, series in stored.items():
        events = acc.Scalars(name)
        assert [e.step for e in events] == [step for step, _ in series], name
        assert [e.value for e in events] == pytest.approx([v for _, v in series], rel=1e-6), name  # float32
    assert [e.step for e in acc.Scalars("probe/activation_stats/mean/body.1")] == [3, 6]
    final = acc.Scalars("final/final_test_acc")
    assert final[0].step == 6 and final[0].value == pytest.approx(result.final_test_acc)
    # HParams: the config and the status, in the run's own folder.
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["lr"].number_value == 0.1 and start.hparams["norm"].string_value == "bn"
    assert start.hparams["status"].string_value == "finished"
    assert start.hparams["convergence"].string_value == result.convergence != ""
    assert start.hparams["norm_options"].string_value == "{}"
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(textwrap.dedent(config))["subset"] == 128
    store.close()


# -- MLflow -----------------------------------------------------------------------------------------------


def test_mlflow_run_holds_the_stored_metrics_params_and_status(tmp_path, no_mlflow_env):
    from mlflow.tracking import MlflowClient

    tracker = open_tracker("mlflow", tmp_path / "logs")
    store, run_id, result = _train(tmp_path, tracker)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("normlab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"run{run_id}-mlp-bn-bs16-lr0.1-seed0" and run.info.status == "FINISHED"
    assert run.data.tags["normlab.status"] == "finished"
    assert run.data.tags["normlab.convergence"] == result.convergence != ""
    assert run.data.params["lr"] == "0.1" and run.data.params["dataset"] == "synthetic"
    assert run.data.params["subset"] == "128" and run.data.params["val_fraction"] == "0.0"
    for name, series in _stored(store, run_id).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == series, name  # float64 end to end: exact
    assert run.data.metrics["final/final_test_acc"] == result.final_test_acc
    # Artifacts stay in the log folder, not in ./mlruns of the working directory.
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "logs" / "mlflow")
    store.close()


# -- W&B --------------------------------------------------------------------------------------------------


def _wandb_records(run_dir: Path, timeout: float = 60.0):
    """The protobuf records of an offline run's ``run-<id>.wandb``, once W&B's writer has written its last
    (``exit``) record: ``run.finish()`` returns before the W&B service has flushed the file (seen on a
    loaded machine), so it is read again until it is whole."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = _parse_wandb_log(next(run_dir.glob("run-*.wandb")).read_bytes())
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except (StopIteration, struct.error, DecodeError):  # not written yet, or cut mid-record
            pass
        assert time.monotonic() < deadline, f"{run_dir}: W&B never finished writing its run log"
        time.sleep(0.2)


def _parse_wandb_log(data: bytes):
    """W&B's 7-byte header, then LevelDB log blocks of 32 KiB, each record a CRC, a length and a type
    (full / first / middle / last), each whole record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # padding to the end of a block
            pos += left - 7 - length
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _wandb_run(run_dir: Path):
    """(run record, config dict, history rows {step: {name: value}}, summary dict) of an offline run."""
    records = _wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    history, summary = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            if "_step" in row:  # (a history record without a step holds only W&B's own _runtime)
                history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    return run, config, history, summary


def test_wandb_offline_run_holds_the_stored_metrics_config_and_summary(tmp_path, wandb_env):
    store, run_id, result = _train(tmp_path, open_tracker("wandb", tmp_path / "logs"))
    (run_dir,) = (tmp_path / "logs" / "wandb").glob("offline-run-*")
    run, config, history, summary = _wandb_run(run_dir)
    assert run.display_name == f"run{run_id}-mlp-bn-bs16-lr0.1-seed0" and run.project == "normlab"
    assert config["lr"] == 0.1 and config["norm"] == "bn" and config["subset"] == 128
    for name, series in _stored(store, run_id).items():
        assert [(s, row[name]) for s, row in sorted(history.items()) if name in row] == series, name
    assert summary["final_test_acc"] == result.final_test_acc and summary["normlab_status"] == "finished"
    assert summary["normlab_convergence"] == result.convergence != ""
    store.close()


# -- a sweep: runs from the store as they complete, then the session's summary ---------------------------


def _sweep(tmp_path, trackers):
    store = Store(tmp_path / "runs.sqlite")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("<h1>report</h1>")
    (report / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (report / "runs.sqlite").write_bytes(b"not sent")
    log = SweepLog(trackers, store, "compare-mlp-test")
    results = run_sweep([_config(seed=0), _config(seed=1)], store, on_result=log.on_result)
    log.summary("compare mlp on synthetic", {"norms": "bn", "seeds": 2}, ["bn ties bn.", "second."], report)
    for tracker in trackers:
        tracker.close()
    return store, results


def test_a_sweep_goes_to_one_session_with_its_verdicts_and_report(tmp_path, wandb_env, no_mlflow_env):
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    kinds = ("tensorboard", "mlflow", "wandb")
    store, results = _sweep(tmp_path, [open_tracker(kind, tmp_path / "logs") for kind in kinds])
    names = [run_name(store.get_run(r.run_id).config, r.run_id) for r in results]
    # TensorBoard: one folder per run and the summary, under the session's folder.
    session = tmp_path / "logs" / "tensorboard" / "compare-mlp-test"
    assert sorted(p.name for p in session.iterdir()) == sorted([*names, "summary"])
    text = _events(session / "summary").Tensors("verdicts/text_summary")[0].tensor_proto.string_val[0]
    assert text.decode() == "bn ties bn.\n\nsecond."
    assert sorted(p.name for p in (session / "summary" / "report").iterdir()) == ["curves.png", "report.html"]
    # MLflow: the runs nested under the session's parent run, which holds the verdicts and the report.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("normlab").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "compare-mlp-test"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(names)
    assert parent.data.params == {"norms": "bn", "seeds": "2"} and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"verdicts.md", "report"}
    shipped = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert shipped == {"report/report.html", "report/curves.png"}
    # W&B: two training runs and the summary run, one group.
    runs = [_wandb_run(d) for d in sorted((tmp_path / "logs" / "wandb").glob("offline-run-*"))]
    assert {r.run_group for r, *_ in runs} == {"compare-mlp-test"}
    assert sorted(r.display_name for r, *_ in runs) == sorted([*names, "compare mlp on synthetic"])
    (summary_dir,) = [d for d in (tmp_path / "logs" / "wandb").glob("offline-run-*")
                      if _wandb_run(d)[0].job_type == "summary"]  # fmt: skip
    assert (summary_dir / "files" / "report" / "report.html").read_text() == "<h1>report</h1>"
    assert (summary_dir / "files" / "verdicts.md").read_text() == "bn ties bn.\n\nsecond.\n"
    assert _wandb_run(summary_dir)[3]["verdicts"] == "bn ties bn.\n\nsecond."
    store.close()


def test_hyperparameters_are_flat_plain_values():
    flat = hyperparameters({"lr": 0.1, "norm_options": {"groups": 8}, "milestones": [1, 2], "width": None})
    assert flat == {"lr": 0.1, "norm_options.groups": 8, "milestones": "[1, 2]", "width": "None"}
    assert run_name({"name": "my run/1?"}, 3) == "run3-my_run_1"


# -- the CLI ----------------------------------------------------------------------------------------------


def test_train_log_sends_the_run_live_and_says_how_to_look(capsys, tmp_path):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "logs"
    code, out, err = cli(capsys, "train", "--model", "mlp", "--dataset", "synthetic", "--steps", "4",
                         "--subset", "128", "--batch-size", "16", "--log-every", "2", "--store",
                         str(tmp_path / "db.sqlite"), "--no-progress", "--log", "tensorboard",
                         "--log-dir", str(logs))  # fmt: skip
    assert code == 0, err
    assert f"tensorboard: tensorboard --logdir {(logs / 'tensorboard').resolve()}" in out
    (folder,) = (logs / "tensorboard").iterdir()
    assert [e.step for e in _events(folder).Scalars("train/loss")] == [2, 4]


def test_compare_log_sends_every_cell_and_the_report(capsys, tmp_path):
    pytest.importorskip("tensorboard")
    logs, db = tmp_path / "logs", str(tmp_path / "db.sqlite")
    args = ["compare", "--model", "mlp", "--dataset", "synthetic", "--norms", "bn,none", "--batch-sizes",
            "32", "--lrs", "0.01", "--seeds", "1", "--steps", "4", "--lr-extensions", "0", "--subset", "128",
            "--workers", "1", "--store", db, "--out", str(tmp_path / "out"), "--log", "tensorboard",
            "--log-dir", str(logs), "--json"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    (session,) = (logs / "tensorboard").iterdir()
    assert session.name.startswith("compare-mlp-synthetic-")
    runs = sorted(p.name for p in session.iterdir())
    assert len(runs) == 3 and runs[-1] == "summary"
    verdicts = _events(session / "summary").Tensors("verdicts/text_summary")[0].tensor_proto.string_val[0]
    assert verdicts.decode() == "\n\n".join(json.loads(out)["verdicts"])
    assert (session / "summary" / "report" / "report.html").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log", "neptune"], "error: --log 'neptune' is not a tracker; valid: tensorboard, mlflow, wandb"),
        (["--log", "mlflow"], "error: --log mlflow needs the mlflow package: pip install 'normlab[mlflow]'"),
    ],
)
@pytest.mark.parametrize("command", [["train"], ["compare"], ["study", "regularization"]])
def test_a_bad_or_missing_tracker_is_one_line_before_anything_runs(capsys, tmp_path, monkeypatch, command,
                                                                    args, message):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "mlflow" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *command, *args, "--log-dir", str(tmp_path / "logs"))
    assert code == 2 and err == message + "\n"
    assert not (tmp_path / "logs").exists() and not (tmp_path / ".normlab").exists()


# -- a study: its runs and its verdict --------------------------------------------------------------------

TRAINING_STUDY = '''
from normlab.studies import StudyOutcome, Table

def run(ctx):
    configs = [ctx.config(model="mlp", dataset="synthetic", steps=2, batch_size=16, subset=64, seed=s)
               for s in ctx.seeds]
    results = ctx.train_grid(configs)
    return StudyOutcome([Table("runs", ["n"], [[len(results)]])], [], f"{len(results)} runs trained.")
'''


def test_study_log_sends_its_runs_and_its_verdict(capsys, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    package = f"trackedstudy_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    (site / package / "demo.py").write_text(TRAINING_STUDY)
    info = site / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[normlab.studies]\n{package} = {package}.demo\n")
    monkeypatch.syspath_prepend(str(site))
    recipe = tmp_path / "tracked.toml"
    scales = "".join(f"[scale.{s}]\nn = 1\n" for s in ("tiny", "quick", "paper"))
    head = f'name = "tracked"\ntitle = "T"\nclaim = "C"\npaper = "P"\nmodule = "plugin:{package}"\n'
    recipe.write_text(head + scales)
    logs = tmp_path / "logs"
    code, _, err = cli(capsys, "study", str(recipe), "--scale", "tiny", "--seeds", "2", "--out",
                       str(tmp_path / "out"), "--log", "tensorboard", "--log-dir", str(logs))  # fmt: skip
    sys.modules.pop(f"{package}.demo", None)
    sys.modules.pop(package, None)
    assert code == 0, err
    (session,) = (logs / "tensorboard").iterdir()
    assert session.name.startswith("study-tracked-")
    assert len([p for p in session.iterdir() if p.name.startswith("run")]) == 2
    verdict = _events(session / "summary").Tensors("verdicts/text_summary")[0].tensor_proto.string_val[0]
    assert verdict.decode() == "2 runs trained."
    assert (session / "summary" / "report" / "report.html").is_file()
    assert not (session / "summary" / "report" / "runs.sqlite").exists()
