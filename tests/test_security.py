"""Files from a shared folder never run code or pull in other files (issue 15, items 1-4): report figures
(crafted SVG, outcome.json naming files outside the folder), CIFAR batch pickles, recipe modules, and
escaping of Markdown reports and of run names printed to a terminal."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from _cli import run_cli

from normlab.data import cifar as cifar_module
from normlab.errors import NormlabError
from normlab.reports.document import Section, render_markdown
from normlab.reports.figure import Figure
from normlab.store import Store
from normlab.studies.recipe import load_recipe
from normlab.studies.runner import render_study_folder

EVIL_SVG = (
    '<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">'
    "<script>alert(2)</script><rect width='1' height='1'/></svg>"
)
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


cli = run_cli


# -- 1. report figures --------------------------------------------------------------------------------


def test_a_crafted_svg_is_embedded_as_an_image_never_as_markup(tmp_path):
    (tmp_path / "evil.svg").write_text(EVIL_SVG)
    page = Figure("evil", "evil.svg", "c").to_html(tmp_path)
    assert "<svg" not in page and "<script" not in page and "onload" not in page
    encoded = re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(encoded).decode() == EVIL_SVG  # inert inside <img>: scripts never run there


def _study_folder(folder: Path, figure_path: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"name": "x", "title": "T", "claim": "c", "paper": "p", "scale": "tiny", "seeds": [0],
            "device": "cpu", "params": {}, "store": "s", "wall_time_s": 0.0, "environment": {}}
    outcome = {"tables": [], "figures": [{"name": "f", "path": figure_path, "caption": "c"}],
               "verdict": "v", "agrees_with_paper": None, "discrepancy": None, "data": {}}
    (folder / "outcome.json").write_text(json.dumps({"meta": meta, "outcome": outcome}))
    return folder


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../outside/evil.svg", "leads outside the report folder"),
        ("ABSOLUTE", "must be relative to the report folder"),
        ("link.png", "leads outside the report folder"),
        ("fake.png", "is not a valid PNG file"),
        ("notes.txt", "unsupported format '.txt'"),
    ],
)
def test_outcome_json_cannot_pull_in_files_from_elsewhere(tmp_path, path, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.svg").write_text(EVIL_SVG)
    (outside / "secret.png").write_bytes(PNG_1PX)
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside / "secret.png")
    (folder / "fake.png").write_text("<script>alert(1)</script>")
    (folder / "notes.txt").write_text("x")
    path = str(outside / "evil.svg") if path == "ABSOLUTE" else path
    _study_folder(folder, path)
    with pytest.raises(NormlabError, match=re.escape(message)):
        render_study_folder(folder)
    assert not (folder / "report.html").exists()
    code, out, err = cli(["report", str(folder)])
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err


def test_a_png_inside_the_folder_still_renders(tmp_path):
    folder = _study_folder(tmp_path / "report", "plots/ok.png")
    (folder / "plots").mkdir()
    (folder / "plots" / "ok.png").write_bytes(PNG_1PX)
    files = render_study_folder(folder)
    assert "data:image/png;base64," in files.html.read_text()


# -- 2. CIFAR pickles -----------------------------------------------------------------------------------


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_folder(root: Path, batch: object) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [*cifar_module.CIFAR10.train_files, *cifar_module.CIFAR10.test_files]:
        (folder / name).write_bytes(pickle.dumps(good, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_a_crafted_cifar_pickle_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    _cifar_folder(tmp_path / "data", {b"data": _WritesMarker(marker), b"labels": [0]})
    with pytest.raises(NormlabError, match=r"data_batch_1 is not an official CIFAR batch file; refusing it "
                                           r"\(global (posix|os)\.system is not allowed\)"):
        cifar_module.load_cifar10(tmp_path / "data", download=False)
    assert not marker.exists()
    code, out, err = cli(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                          "--steps", "1", "--store", str(tmp_path / "s.sqlite")])
    assert code == 2 and len(err.splitlines()) == 1 and "refusing it" in err
    assert not marker.exists() and not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "a uint8 array of shape (N, 3072)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "must be 2 integer labels"),
        ([1, 2, 3], "it holds a list"),
        ({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, "must be a uint8 array"),
    ],
)
def test_junk_cifar_batches_are_one_line(tmp_path, batch, message):
    _cifar_folder(tmp_path / "data", batch)
    with pytest.raises(NormlabError, match=re.escape(message)):
        cifar_module.load_cifar10(tmp_path / "data", download=False)


def test_a_truncated_cifar_pickle_is_one_line(tmp_path):
    folder = _cifar_folder(tmp_path / "data", {})
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": b"x" * 100}, protocol=2)[:20])
    with pytest.raises(NormlabError, match=r"data_batch_1 is not an official CIFAR batch file; refusing it "
                                           r"\(pickle data was truncated\)"):
        cifar_module.load_cifar10(tmp_path / "data", download=False)


# -- 3. recipe modules ----------------------------------------------------------------------------------


def _recipe(folder: Path, module: str) -> Path:
    scales = "".join(f"[scale.{s}]\nn = 1\n" for s in ("tiny", "quick", "paper"))
    path = folder / "evil.toml"
    path.write_text(f'name = "evil"\ntitle = "t"\nclaim = "c"\npaper = "p"\nmodule = "{module}"\n{scales}')
    return path


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("evil_study", "'evil_study' is not a built-in study module of normlab.studies"),
        ("os", "'os' is not a built-in study module"),
        ("evil_pkg.study", "must be the name of a built-in study module"),
        ("../evil_study", "must be the name of a built-in study module"),
        ("plugin:evil", "no installed study plugin 'evil'"),
    ],
)
def test_a_recipe_cannot_import_code_from_its_folder(tmp_path, monkeypatch, module, message):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').close()\ndef run(ctx):\n    pass\n"
    (tmp_path / "evil_study.py").write_text(code)
    (tmp_path / "evil_pkg").mkdir()
    (tmp_path / "evil_pkg" / "__init__.py").write_text(code)
    (tmp_path / "evil_pkg" / "study.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, module)
    with pytest.raises(NormlabError, match=re.escape(message)):
        load_recipe(path).load_module()
    rc, out, err = cli(["study", str(path), "--scale", "tiny", "--out", str(tmp_path / "out")])
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not marker.exists()


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    rc, _, err = cli(["study", str(path)])
    assert rc == 2 and err == f"error: recipe {path} is not UTF-8 text (byte 8); save it as UTF-8\n"


# -- 4. escaping ----------------------------------------------------------------------------------------


def test_markdown_reports_escape_raw_html():
    md = render_markdown("<script>t()</script>", [Section("<b>h</b>", text=["<img src=x onerror=y()>"],
                                                          callout="<script>c()</script>")])
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script&gt;t()&lt;/script&gt;" in md and "&lt;img src=x onerror=y()&gt;" in md


def test_data_blocks_cannot_close_their_code_fence():
    md = render_markdown("t", [Section("s", data={"x": "```\n<script>x()</script>"})])
    fence = re.search(r"^(`{4,})json$", md, re.M).group(1)
    assert md.rstrip().endswith(fence)


def test_runs_list_and_show_print_escape_sequences_as_text(tmp_path):
    store = tmp_path / "s.sqlite"
    name = "run\x1b]0;owned\x07\x1b[2J"
    with Store(store) as db:
        rid = db.start_run({"model": "cnn\x1b[31m"}, name=name, group="g\x1b[1m", environment={})
        db.finish_run(rid, "failed", error="boom\x1b[2K")
    for argv in (["runs", "list"], ["runs", "show", str(rid)]):
        code, out, err = cli([*argv, "--store", str(store)])
        assert code == 0, err
        assert "\x1b" not in out and "\x07" not in out
        assert "\\x1b" in out
