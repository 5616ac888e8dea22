"""Every command, driven through the real CLI (``normlab.cli.main``, in process) with a table of bad values:
each must end in exactly one line naming the problem (JSON under ``--json``), exit code 2, no traceback,
and leave the results store byte for byte as it was (issue 15, items 9-11)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from _cli import run_cli

from normlab.store import Store
from normlab.train import TrainConfig, Trainer

TINY = ["--subset", "64", "--batch-size", "16", "--steps", "1"]
C = "--subset 64 --batch-sizes 16 --seeds 1 --epochs 1"  # a one-run compare


cli = run_cli


def _png(width: int, height: int, truncate: bool = False) -> bytes:
    """A PNG whose header claims ``width x height``; its pixel data is one row (or cut off)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = min(height, 4)  # a huge image's header is refused before its data is read
    raw = zlib.compress((b"\x00" + b"\x80" * 3 * width) * rows if width <= 4 else b"\x00")
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))  # fmt: skip
    return png[: len(png) // 2] if truncate else png


def _image_folder(root: Path, bad_name: str, bad_bytes: bytes) -> Path:
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "ok.png").write_bytes(_png(4, 4))
    (root / "train" / "a" / bad_name).write_bytes(bad_bytes)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with one finished run, and the bad files the table points at."""
    tmp = tmp_path_factory.mktemp("bad-input")
    store = tmp / "store.sqlite"
    with Store(store) as db:
        rid = db.start_run({"model": "cnn"}, name="r", environment={})
        db.finish_run(rid, "finished", summary={"final_test_acc": 0.5})
    (tmp / "afile").write_text("x")
    (tmp / "notes.txt").write_text("my notes\n")
    (tmp / "empty.sqlite").write_bytes(b"")
    (tmp / "emptydir").mkdir()
    (tmp / "bad.toml").write_bytes(b'name = "\xff"\n')
    _image_folder(tmp / "img-text", "x.png", b"not an image at all")
    _image_folder(tmp / "img-trunc", "x.png", _png(64, 64, truncate=True))
    _image_folder(tmp / "img-huge", "x.png", _png(30000, 30000))
    _image_folder(tmp / "img-big", "x.png", _png(10000, 10000))  # over our limit, under PIL's bomb check
    cifar = tmp / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in ("batches.meta", "test_batch", *[f"data_batch_{i}" for i in range(1, 6)]):
        (cifar / name).write_bytes(b"\x80\x02junk")
    # Checkpoints: a real one (1 step), then copies with a damaged step, a string config, a bad field.
    config = TrainConfig(subset=64, batch_size=16, steps=1, checkpoint_dir=str(tmp / "ckpt"))
    Trainer(config, progress=False).fit()
    real = tmp / "ckpt" / f"{config.key()}.pt"
    state = torch.load(real, weights_only=True)
    torch.save({**state, "config": "cnn please"}, tmp / "string-config.pt")
    torch.save({**state, "config": {**state["config"], "lr": "abc"}}, tmp / "bad-field.pt")
    far = tmp / "far"
    far.mkdir()
    torch.save({**state, "step": 10**12}, far / real.name)
    (tmp / "dir-ckpt" / real.name).mkdir(parents=True)
    outcome = tmp / "study-out"
    outcome.mkdir()
    meta = {"name": "x", "title": "T", "claim": "c", "paper": "p", "scale": "tiny", "seeds": [0],
            "device": "cpu", "params": {}, "store": "s", "wall_time_s": 0.0, "environment": {}}
    figures = [{"name": "f", "path": "../afile", "caption": "c"}]
    (outcome / "outcome.json").write_text(json.dumps({"meta": meta, "outcome": {
        "tables": [], "figures": figures, "verdict": "v", "agrees_with_paper": None, "data": {}}}))
    return tmp


# (argv, expected fragment of the one-line message). T is the world folder, S the store.
CASES: list[tuple[str, str]] = [
    # train
    ("train --lr abc", "Invalid value for '--lr'"),
    ("train --steps 1e20", "Invalid value for '--steps'"),
    ("train --device cpu:abc " + " ".join(TINY), "--device 'cpu:abc' is not a device"),
    ("train --device cuda:x " + " ".join(TINY), "--device 'cuda:x' is not a device"),
    ("train --lr 1e39 " + " ".join(TINY), "exceeds float32's largest value"),
    ("train --width 1e12 " + " ".join(TINY), "too large to build"),
    ("train --store T/afile/x.sqlite " + " ".join(TINY), "is a file, not a folder"),
    ("train --checkpoint-dir T/afile " + " ".join(TINY), "--checkpoint-dir 'T/afile' exists and is a file"),
    ("train --subset 64 --batch-size 16 --steps 100000000000000000000", "would take about"),
    ("train --depth 100000 " + " ".join(TINY), "depth=100000 exceeds 2000 layers"),
    ("train --threads 100000 " + " ".join(TINY), "--threads must be between 1 and"),
    ("train --threads 0 " + " ".join(TINY), "--threads must be between 1 and"),
    ("train --augment crop_flip " + " ".join(TINY), "crop_flip needs images"),
    ("train --augment rotate " + " ".join(TINY), "unknown augment 'rotate'"),
    ("train --subset 64 --steps 1 --batch-size 100000", "batch size 100000 exceeds the 64 training examples"),
    ("train --norm nosuch " + " ".join(TINY), "unknown norm 'nosuch'"),
    ("train --norm-options {\"eps\":\"x\"} " + " ".join(TINY), "eps must be a number, got str 'x'"),
    ("train --norm-options {\"affine\":\"no\"} " + " ".join(TINY), "affine must be True or False"),
    ("train --norm-options {\"eps\":1e999} " + " ".join(TINY), "eps must be finite, got inf"),
    ("train --norm-options {\"eps\":0} " + " ".join(TINY), "eps must be > 0"),
    ("train --config T/missing.toml", "does not exist"),
    ("train --config T/bad.toml", "is not valid TOML"),
    ("train --dataset imagefolder --data-root T/img-text --steps 1", "x.png cannot be read"),
    ("train --dataset imagefolder --data-root T/img-trunc --steps 1", "x.png cannot be read"),
    ("train --dataset imagefolder --data-root T/img-huge --steps 1", "x.png is too large (Image size"),
    ("train --dataset imagefolder --data-root T/img-big --steps 1", "is 10000 x 10000 = 100 megapixels"),
    ("train --dataset cifar10 --data-root T/cifar --steps 1", "is not an official CIFAR batch file"),
    ("train --resume --checkpoint-dir T/far " + " ".join(TINY), "checkpoint step 1000000000000 is outside"),
    ("train --resume --checkpoint-dir T/dir-ckpt " + " ".join(TINY), "is a folder, not a checkpoint file"),
    ("train --store T/notes.txt " + " ".join(TINY), "not a sound normlab SQLite store"),
    ("train --store T/emptydir " + " ".join(TINY), "is a folder"),
    ("train --nosuch-option 1", "No such option: --nosuch-option"),
    # runs
    ("runs show 99999999999999999999999", "run id must be between 1 and 2**63-1"),
    ("runs show 0", "run id must be between 1 and 2**63-1"),
    ("runs show 5", "no run with id 5"),
    ("runs show abc", "Invalid value for 'run_id'"),
    ("runs list --status bogus", "unknown status bogus"),
    ("runs list --limit 0", "--limit must be a positive int"),
    ("runs list --store T/notes.txt", "is not a sound normlab SQLite store"),
    ("runs list --store T/empty.sqlite", "is not a normlab results store"),
    ("runs list --store T/missing.sqlite", "no results store at"),
    ("runs export --format xml", "unknown export format 'xml'"),
    ("runs export -o T/afile/out.csv", "is a file, not a folder"),
    ("runs export -o T/emptydir", "is a folder; give a file path"),
    ("runs bogus", "No such command 'bogus'"),
    # catalog
    ("models --bogus", "No such option: --bogus"),
    ("norms extra-arg", "Got unexpected extra argument"),
    # compare
    ("compare --batch-sizes 100000 --subset 64 --seeds 1 --epochs 1", "batch size 100000 exceeds the 64"),
    (f"compare --out T/afile {C}", "--out 'T/afile' exists and is a file"),
    ("compare --lrs abc", "--lrs='abc' must be a comma-separated list of floats"),
    ("compare --seeds 0", "--seeds must be >= 1"),
    ("compare --norms bogus", "unknown norm(s) bogus"),
    ("compare --epochs 100000000000 --subset 64 --batch-sizes 16 --seeds 1", "would take about"),
    (f"compare --lrs 1e40 {C}", "exceeds float32's largest value"),
    (f"compare --workers 0 {C}", "workers must be a positive int"),
    (f"compare --device cpu:abc {C}", "--device 'cpu:abc' is not a device"),
    (f"compare --store T/afile/x.sqlite {C}", "is a file, not a folder"),
    # probe
    ("probe nosuch", "unknown probe 'nosuch'"),
    ("probe landscape --options {\"num_points\":1000000000}", "would take about"),
    ("probe landscape --options {\"num_points\":\"x\"}", "num_points must be a positive int"),
    ("probe landscape --options [1]", "--options must be a JSON object"),
    ("probe landscape --seed -1", "--seed must be between 0 and 2**63-1"),
    ("probe landscape --mode bogus", "bogus"),
    ("probe hessian --checkpoint T/missing.pt", "does not exist"),
    ("probe hessian --checkpoint T/emptydir", "is a folder, not a checkpoint file"),
    ("probe hessian --checkpoint T/string-config.pt", "has no config table"),
    ("probe hessian --checkpoint T/bad-field.pt", "lr must be a float"),
    ("probe hessian --checkpoint T/afile", "is corrupt or not a checkpoint"),
    ("probe hessian --data-root T/afile", "--data-root 'T/afile' is not a folder"),
    ("probe hessian --batch-size 0", "--batch-size must be a positive int"),
    # study and report
    ("study nosuch", "unknown study 'nosuch'"),
    ("study T/bad.toml", "is not UTF-8 text"),
    ("study regularization --scale huge", "unknown scale 'huge'"),
    ("study regularization --seeds 0", "seeds must be a positive int"),
    ("study regularization --threads 100000", "--threads must be between 1 and"),
    ("study regularization --workers 0", "--workers must be >= 1"),
    ("study regularization --out T/afile", "--out 'T/afile' exists and is a file"),
    ("report T/missing", "does not exist"),
    ("report T/notes.txt", "is not a sound normlab SQLite store"),
    ("report T/empty.sqlite", "is not a normlab results store"),
    ("report T/emptydir", "has no outcome.json"),
    ("report T/study-out", "leads outside the report folder"),
    ("report S --out T/afile", "--out 'T/afile' exists and is a file"),
    # crossval
    ("crossval layer --seed -1", "--seed must be between 0 and 2**63-1"),
    ("crossval layer --rtol nan", "--rtol must be a finite number >= 0"),
    ("crossval layer --atol -1", "--atol must be a finite number >= 0"),
    ("crossval layer --p 2", "--p must be a fraction in [0, 1]"),
    ("crossval layer --steps 100000000000", "the limit is 2e+09"),
    ("crossval layer --shape abc", "shape must be comma-separated ints"),
    ("crossval layer --kind bogus", "unknown kind 'bogus'"),
    ("crossval model --steps 100000000000", "the limit is 2e+09"),
    ("crossval model --batch 0", "batch must be >= 1"),
    ("crossval conventions --backends bogus", "unknown backend 'bogus'"),
    # the whole program
    ("nosuch", "No such command 'nosuch'"),
]

JSON_CASES = [
    ("train --lr abc --json", "Invalid value for '--lr'"),
    ("train --device cpu:abc --json " + " ".join(TINY), "is not a device"),
    ("runs list --limit 0 --json", "--limit must be a positive int"),
    ("runs show 99999999999999999999999 --json", "run id must be between"),
    ("compare --seeds 0 --json", "--seeds must be >= 1"),
    ("probe nosuch --json", "unknown probe"),
    ("study nosuch --json", "unknown study"),
    ("report T/missing --json", "does not exist"),
    ("crossval layer --rtol nan --json", "--rtol must be"),
    ("models --json --bogus", "No such option"),
]


def _argv(case: str, world: Path) -> list[str]:
    return [part.replace("T/", f"{world}/").replace("S", str(world / "store.sqlite")) if part in ("S",)
            or part.startswith("T/") or "T/" in part else part for part in case.split()]


def _sqlite_side_file(path: Path) -> bool:
    # A reader of a WAL store may create SQLite's WAL index (-shm) and an empty -wal: neither holds data.
    return path.name.endswith("-shm") or (path.name.endswith("-wal") and path.stat().st_size == 0)


def _snapshot(world: Path) -> dict[str, bytes]:
    watched = ("store.sqlite", "notes.txt", "empty.sqlite", "afile")
    return {p.name: p.read_bytes() for p in world.iterdir()
            if p.name.startswith(watched) and p.is_file() and not _sqlite_side_file(p)}


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.setenv("NORMLAB_STORE", str(world / "store.sqlite"))
    monkeypatch.chdir(world)
    before = _snapshot(world)
    names = sorted(p.name for p in world.iterdir() if not _sqlite_side_file(p))
    yield world
    assert _snapshot(world) == before, "the store (or a file mistaken for one) changed"
    assert sorted(p.name for p in world.iterdir() if not _sqlite_side_file(p)) == names, "a new file"


@pytest.mark.parametrize(("case", "expected"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2(in_world, case, expected):
    code, out, err = cli(_argv(case, in_world))
    assert "Traceback" not in out + err
    assert code == 2, (out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.replace("T/", f"{in_world}/") in lines[0]


@pytest.mark.parametrize(("case", "expected"), JSON_CASES, ids=[c for c, _ in JSON_CASES])
def test_bad_input_under_json_is_one_json_line(in_world, case, expected):
    code, out, err = cli(_argv(case, in_world))
    assert code == 2 and err == "", err
    lines = out.splitlines()
    assert len(lines) == 1
    reply = json.loads(lines[0])
    assert reply["exit_code"] == 2 and expected in reply["error"]


def test_no_args_prints_help_and_exits_2(in_world):
    code, out, _ = cli(["runs"])
    assert code == 2 and "Usage: normlab runs" in out


def test_study_and_report_have_json(in_world):
    code, out, err = cli(["study", "--list", "--json"])
    assert code == 0, err
    names = [row["name"] for row in json.loads(out)]
    assert "regularization" in names
    code, out, err = cli(["report", str(in_world / "store.sqlite"), "--out", str(in_world / "rep"), "--json"])
    assert code == 0, err
    reply = json.loads(out)
    assert reply["report"] == str(in_world / "rep" / "report.html") and "1 runs" in reply["summary"]
    import shutil

    shutil.rmtree(in_world / "rep")


def test_force_lets_a_long_run_start(in_world, monkeypatch):
    # --force skips the estimate; the run is then stopped by the smallest real cost we can give it.
    from normlab.cli import _common

    seen = []
    monkeypatch.setattr(_common, "preflight", lambda config, force=False, data=None: seen.append(force))
    monkeypatch.setattr("normlab.cli.train_cmd.preflight", _common.preflight)
    code, _, err = cli(["train", "--subset", "64", "--batch-size", "16", "--steps", "1", "--force",
                        "--store", str(in_world / "forced.sqlite"), "--no-progress", "--json"])
    assert code == 0, err and seen == [True]
    os.remove(in_world / "forced.sqlite")
