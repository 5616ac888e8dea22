"""normlab.store: runs, metrics, artifacts, queries, exports, corrupt files and concurrent writers."""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import pickle
import sqlite3
import sys

import pytest

from normlab.errors import NormlabError
from normlab.store import SCHEMA_VERSION, Store, canonical_json, config_key, default_store_path


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "results.sqlite") as db:
        yield db


def _run(db: Store, **config) -> int:
    return db.start_run(config, group=config.get("group"), environment={"torch": "x"})


def test_run_lifecycle_and_summary(store):
    rid = _run(store, model="cnn", norm="bn", lr=0.1, group="g1")
    assert store.get_run(rid).status == "running"
    store.finish_run(rid, "finished", summary={"final_test_acc": 0.93, "loss": math.nan}, wall_time=1.5)
    run = store.get_run(rid)
    assert (run.status, run.wall_time, run.group) == ("finished", 1.5, "g1")
    assert run.summary["final_test_acc"] == 0.93 and math.isnan(run.summary["loss"])
    assert run.config == {"model": "cnn", "norm": "bn", "lr": 0.1, "group": "g1"}
    assert run.environment == {"torch": "x"}
    assert run.finished_at >= run.started_at


def test_config_key_is_sha256_of_sorted_compact_json():
    import hashlib

    config = {"b": [1, 2.5], "a": {"y": None, "x": True}}
    text = '{"a":{"x":true,"y":null},"b":[1,2.5]}'
    assert canonical_json(config) == text
    assert config_key(config) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert config_key({"a": {"x": True, "y": None}, "b": [1, 2.5]}) == config_key(config)
    with pytest.raises(NormlabError, match=r"config\.lr is nan"):
        config_key({"lr": math.nan})


def test_queries_by_status_group_and_config_fields(store):
    a = _run(store, norm="bn", batch_size=16, opts={"groups": 8}, group="g")
    b = _run(store, norm="gn", batch_size=16, opts={"groups": 4}, group="g")
    c = _run(store, norm="gn", batch_size=128, opts={"groups": 8}, nesterov=True)
    store.finish_run(a, "finished")
    store.finish_run(b, "diverged", error="loss nan")
    assert [r.id for r in store.runs(status="finished")] == [a]
    assert [r.id for r in store.runs(status=["diverged", "running"])] == [b, c]
    assert [r.id for r in store.runs(group="g")] == [a, b]
    assert [r.id for r in store.runs(where={"norm": "gn", "batch_size": 16})] == [b]
    assert [r.id for r in store.runs(where={"opts.groups": 8})] == [a, c]
    assert [r.id for r in store.runs(where={"nesterov": True})] == [c]
    assert store.latest_run(where={"norm": "gn"}).id == c
    key = config_key({"norm": "bn", "batch_size": 16, "opts": {"groups": 8}, "group": "g"})
    assert store.find_completed(key).id == a
    assert store.get_run(b).error == "loss nan"


def test_metrics_series_latest_and_nan(store):
    rid = _run(store, m=1)
    store.log_metrics(rid, 10, {"loss": 2.0, "acc": 0.5})
    store.log_metric_rows([(rid, 20, "loss", 1.0), (rid, 30, "loss", math.nan)])
    store.log_metric(rid, 20, "loss", 1.25)  # the same step again replaces the value
    assert store.metric_names(rid) == ["acc", "loss"]
    series = store.metrics(rid, "loss")
    assert series[:2] == [(10, 2.0), (20, 1.25)] and series[2][0] == 30 and math.isnan(series[2][1])
    assert store.latest_metric(rid, "acc") == (10, 0.5)
    assert store.latest_metric(rid, "missing") is None


def test_artifacts_keep_bytes_or_path(store):
    rid = _run(store, m=1)
    store.add_artifact(rid, "fig.png", "figure", b"\x89PNG")
    store.add_artifact(rid, "/ckpt/a.pt", "checkpoint")
    arts = store.artifacts(rid)
    assert [(a.path, a.kind, a.payload) for a in arts] == [
        ("fig.png", "figure", b"\x89PNG"),
        ("/ckpt/a.pt", "checkpoint", None),
    ]


def test_bad_status_and_missing_run_are_named(store):
    rid = _run(store, m=1)
    message = "status 'done' cannot end a run; allowed: finished, diverged, failed"
    with pytest.raises(NormlabError, match=message):
        store.finish_run(rid, "done")
    with pytest.raises(NormlabError, match="no run with id 99"):
        store.get_run(99)
    with pytest.raises(NormlabError, match="unknown status ok; allowed: running, finished, diverged, failed"):
        store.runs(status="ok")
    with pytest.raises(NormlabError, match="config field 'a;drop' is not a valid field name"):
        store.runs(where={"a;drop": 1})


def test_export_csv_and_json(store):
    a = _run(store, norm="bn", lr=0.1, opts={"groups": 8})
    store.finish_run(a, "finished", summary={"acc": 0.9, "loss": math.inf})
    b = _run(store, norm="gn", lr=0.2, milestones=[3, 5])
    store.finish_run(b, "diverged")
    buffer = io.StringIO()
    store.export(buffer, "csv")
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [r["config.norm"] for r in rows] == ["bn", "gn"]
    assert rows[0]["config.opts.groups"] == "8" and rows[0]["summary.acc"] == "0.9"
    assert rows[1]["config.milestones"] == "[3, 5]" and rows[1]["status"] == "diverged"
    buffer = io.StringIO()
    store.export(buffer, "json", status="finished")
    data = json.loads(buffer.getvalue())
    assert len(data) == 1 and data[0]["summary"] == {"acc": 0.9, "loss": None}  # strict JSON: inf -> null
    with pytest.raises(NormlabError, match="unknown export format 'xml'; allowed: csv, json"):
        store.export(io.StringIO(), "xml")


def test_to_pandas_and_missing_pandas(store, monkeypatch):
    pytest.importorskip("pandas")
    rid = _run(store, norm="bn")
    store.log_metrics(rid, 1, {"loss": 3.0})
    frame = store.to_pandas()
    assert list(frame["config.norm"]) == ["bn"]
    metrics = store.to_pandas("metrics")
    assert metrics.to_dict("records") == [{"run_id": rid, "step": 1, "name": "loss", "value": 3.0}]
    monkeypatch.setitem(sys.modules, "pandas", None)
    message = r"to_pandas needs pandas, which is not installed: pip install 'normlab\[pandas\]'"
    with pytest.raises(NormlabError, match=message):
        store.to_pandas()


def test_corrupt_or_foreign_files_are_refused_and_left_untouched(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database " * 100)
    with pytest.raises(NormlabError, match=f"cannot open results store '{junk}': file is not a database"):
        Store(junk)
    assert junk.read_bytes() == b"not a database " * 100
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(NormlabError, match="is an SQLite file with other tables, not a normlab store"):
        Store(foreign)
    with sqlite3.connect(foreign) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]
    newer = tmp_path / "newer.sqlite"
    Store(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(NormlabError, match=f"schema version {SCHEMA_VERSION + 1}; this normlab reads up to"):
        Store(newer)
    with pytest.raises(NormlabError, match="is a folder"):
        Store(tmp_path)


def test_default_path_follows_env_and_pickles_as_path(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_STORE", str(tmp_path / "env.sqlite"))
    assert default_store_path() == tmp_path / "env.sqlite"
    with Store() as db:
        assert db.path == tmp_path / "env.sqlite"
        rid = _run(db, a=1)
        clone = pickle.loads(pickle.dumps(db))
        assert clone.get_run(rid).config == {"a": 1}
        clone.close()
    with sqlite3.connect(tmp_path / "env.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _writer(path: str, tag: int, runs: int, metrics: int) -> None:
    db = Store(path)
    for i in range(runs):
        rid = db.start_run({"writer": tag, "i": i}, environment={})
        for step in range(metrics):
            db.log_metric(rid, step, "loss", float(tag * 1000 + step))
        db.finish_run(rid, "finished", summary={"writer": tag})
    db.close()


def test_two_processes_writing_concurrently(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    Store(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 15, 20)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Store(path) as db:
        assert db.integrity_check() == "ok"
        runs = db.runs(status="finished")
        written = sorted((r.config["writer"], r.config["i"]) for r in runs)
        assert written == [(t, i) for t in (1, 2) for i in range(15)]
        for run in runs:
            tag = run.config["writer"]
            assert db.metrics(run.id, "loss") == [(s, float(tag * 1000 + s)) for s in range(20)]


def test_damaged_pages_give_a_named_error_and_keep_the_file(tmp_path):
    path = tmp_path / "damaged.sqlite"
    with Store(path) as db:
        for i in range(200):
            db.finish_run(db.start_run({"i": i, "pad": "x" * 200}, environment={}), "finished")
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page : len(data)] = b"\xff" * (len(data) - 2 * page)  # keep the header, wreck the tables
    path.write_bytes(bytes(data))
    with pytest.raises(NormlabError, match=f"store '{path}'.*malformed"):
        Store(path).runs()
    assert path.read_bytes() == bytes(data)
