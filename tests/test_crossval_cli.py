"""``normlab crossval`` commands, the measured conventions probe, and the HTML section."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normlab.cli import main
from normlab.crossval import LayerSpec, crossval_layer
from normlab.crossval.probe import probe_conventions
from normlab.crossval.report import conventions_html, report_html


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_layer_command_json_reports_each_backend_pair(capsys):
    code, out, _ = _run(
        [
            "crossval",
            "layer",
            "--kind",
            "bn",
            "--mode",
            "train",
            "--steps",
            "2",
            "--backends",
            "numpy,torch,jax",
            "--shape",
            "4,3,2,2",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    assert [b["status"] for b in data["backends"]] == ["ok", "ok", "ok"]
    assert [p["backends"] for p in data["pairs"]] == [["numpy", "torch"], ["numpy", "jax"], ["torch", "jax"]]
    assert data["inconsistent"] is False
    conv = {tuple(c["backends"]): c for c in data["conventions"]}
    assert conv[("torch", "jax")]["expected"] == pytest.approx(16 / 15)  # m = 4*2*2 values per channel


def test_layer_command_table_and_bad_backend(capsys):
    code, out, _ = _run(
        ["crossval", "layer", "--kind", "gn", "--groups", "1", "--backends", "numpy,torch"], capsys
    )
    assert code == 0 and "numpy|torch" in out and "consistent" in out
    code, _, err = _run(["crossval", "layer", "--backends", "numpy,caffe"], capsys)
    assert code == 2
    assert ("unknown backend 'caffe'; valid backends: numpy, torch, torch-compile, onnxruntime, jax, "
            "torch-cuda") in err
    code, _, err = _run(["crossval", "layer", "--momentum", "fast"], capsys)
    assert code == 2 and "momentum must be a float in [0, 1] or 'none', got 'fast'" in err


def test_model_command_prints_the_per_layer_table(capsys):
    code, out, _ = _run(
        [
            "crossval",
            "model",
            "--model",
            "cnn",
            "--dims",
            "1",
            "--in-channels",
            "1",
            "--batch",
            "2",
            "--backends",
            "numpy,torch",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    (pair,) = data["pairs"]
    assert pair["first_inconsistent"] is None
    assert [layer["op"] for layer in pair["layers"]][:3] == ["conv", "bn", "relu"]
    assert all(layer["delta"] < 1e-6 for layer in pair["layers"])


def test_conventions_are_measured_from_the_installed_libraries():
    probes = {p.backend: p for p in probe_conventions("numpy,torch,onnxruntime,jax")}
    torch_bn, flax_bn, onnx_bn = probes["torch"], probes["jax"], probes["onnxruntime"]
    assert torch_bn.eps_default == flax_bn.eps_default == onnx_bn.eps_default == 1e-5
    assert (
        torch_bn.momentum_meaning == "weight of the new batch"
        and torch_bn.new_batch_weight == pytest.approx(0.1)
    )
    assert flax_bn.momentum_meaning == "decay of the old value" and flax_bn.new_batch_weight == pytest.approx(
        0.01
    )
    assert onnx_bn.momentum_meaning == "decay of the old value" and onnx_bn.momentum_default == pytest.approx(
        0.9
    )
    assert torch_bn.variance_factor == pytest.approx(16 / 15, rel=1e-5)  # probing batch: m = 16
    assert flax_bn.running_var == onnx_bn.running_var == "biased"
    assert torch_bn.batch1_train.startswith("error: ValueError: Expected more than 1 value per channel")
    assert flax_bn.batch1_train.startswith("output")
    assert torch_bn.half["float16"].startswith("output float16")
    assert flax_bn.half["bfloat16"].startswith("output bfloat16")
    assert "NaN" in probes["numpy"].batch1_train or "nan" in probes["numpy"].batch1_train


def test_conventions_command_and_missing_package(capsys, monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    code, out, _ = _run(["crossval", "conventions", "--backends", "torch,onnxruntime", "--json"], capsys)
    assert code == 0
    torch_probe, onnx_probe = json.loads(out)
    assert torch_probe["momentum_meaning"] == "weight of the new batch"
    assert "package 'onnxruntime' is not importable" in onnx_probe["skipped"]


def test_html_sections_escape_strings():
    report = crossval_layer(LayerSpec(kind="ln", mode="train", steps=0), "numpy,torch")
    report.target = "<script>alert(1)</script>"
    html = report_html(report)
    assert html.startswith('<section class="crossval">') and html.rstrip().endswith("</section>")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<table>" in html and "numpy|torch" in html
    probes = probe_conventions("torch")
    section = conventions_html(probes)
    assert "weight of the new batch" in section and section.count("<tr>") == 2


def test_inconsistent_pair_exits_with_code_1(capsys, monkeypatch):
    from normlab.crossval.backends import torch_backend

    original = torch_backend.TorchBackend.run_layer

    def shifted(self, spec, params, batches):
        run = original(self, spec, params, batches)
        run.output = run.output + 0.1
        return run

    monkeypatch.setattr(torch_backend.TorchBackend, "run_layer", shifted)
    code, out, _ = _run(["crossval", "layer", "--kind", "ln", "--backends", "numpy,torch", "--json"], capsys)
    assert code == 1
    (pair,) = json.loads(out)["pairs"]
    assert pair["delta"] == pytest.approx(0.1, rel=1e-4)
    assert np.all(np.array(pair["d_mad"]) == 1.0)


def test_cli_parse_errors(capsys):
    code, _, err = _run(["crossval", "layer", "--shape", "4,x"], capsys)
    assert code == 2 and "shape must be comma-separated ints, got '4,x'" in err
    code, _, err = _run(["crossval", "model", "--batch", "0"], capsys)
    assert code == 2 and "batch must be >= 1 and steps >= 0, got batch=0, steps=0" in err
