"""Every command on the models users write (tests/user_models/styles.py) and real data (scikit-learn's
``load_digits``, 8x8 digits): studies, probes at a stated lr, crossval, fold_bn, device errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normlab.cli import main
from normlab.errors import NormlabError

STYLES = Path(__file__).parent / "user_models" / "styles.py"


def _cli(capsys, *args) -> str:
    try:
        main(list(args))
    except SystemExit as exc:
        captured = capsys.readouterr()
        assert exc.code in (0, None), captured.err[-800:]
        return captured.out
    return capsys.readouterr().out


def _cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's load_digits as an npz (x in [0, 1], (N, 1, 8, 8)), and the styles file beside it."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    folder = tmp_path_factory.mktemp("digits")
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = (data.images[order] / 16.0).astype(np.float32)[:, None]
    y = data.target[order].astype(np.int64)
    np.savez(folder / "digits.npz", x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])
    shutil.copy(STYLES, folder / "styles.py")
    return folder


@pytest.mark.slow  # a 30-step run and five probe commands: ~45 CPU s
def test_digits_end_to_end_train_checkpoint_and_probes_at_the_runs_lr(digits, monkeypatch, capsys):
    """Cosine AdamW run on the user's keyword-only factory, checkpointed; each probe on the checkpoint
    names the user's blocks, and the stepping ones step at the run's lr (printed), not the schedule's end."""
    monkeypatch.chdir(digits)
    monkeypatch.setenv("NORMLAB_STORE", str(digits / "runs.sqlite"))
    model = "styles.py:kw_net"
    _cli(capsys, "train", "--model", model, "--dataset", "npz:digits.npz", "--schedule", "cosine",
         "--optimizer", "adamw", "--lr", "0.003", "--steps", "30", "--batch-size", "32",
         "--checkpoint-dir", "ck", "--eval-train-samples", "64")
    (checkpoint,) = (digits / "ck").glob("*.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state["base_lr"] == 0.003 and state["optimizer"]["param_groups"][0]["lr"] < 1e-4
    common = ["--checkpoint", str(checkpoint), "--model", model, "--batch-size", "32"]
    out = _cli(capsys, "probe", "landscape", *common, "--options", '{"num_points": 3}')
    assert "landscape stepped at lr 0.003" in out
    land = json.loads(_cli(capsys, "probe", "landscape", *common, "--json", "--options", '{"num_points": 3}'))
    assert land["lr"] == 0.003 and land["etas"] == pytest.approx([0.0015, 0.00675, 0.012])  # [0.5, 4] x lr
    ics = json.loads(_cli(capsys, "probe", "ics", *common, "--json"))
    assert ics["lr"] == 0.003 and set(ics["l2"]) >= {"units.0.c_a", "out"}
    assert min(ics["cos"].values()) < 0.9999  # a real step, not the ~0 lr at the cosine's end
    assert "ics stepped at lr 0.01" in _cli(capsys, "probe", "ics", *common, "--lr", "0.01")
    hessian = json.loads(_cli(capsys, "probe", "hessian", *common, "--json", "--options",
                              '{"max_iter": 5, "top_k": 1}'))
    assert hessian["mode"] == "train"
    spp = json.loads(_cli(capsys, "probe", "signal_propagation", *common, "--json"))
    assert list(spp["avg_var"]) == ["entry.2", "units.0", "units.1", "units.2"]
    assert "--lr must be a finite number > 0" in _cli_error(capsys, "probe", "ics", *common, "--lr", "-1")


def test_digits_crossval_model_and_layer_of_the_users_model(digits, monkeypatch, capsys):
    monkeypatch.chdir(digits)
    report = json.loads(_cli(capsys, "crossval", "model", "--model", "styles.py:kw_net", "--dataset",
                             "npz:digits.npz", "--backends", "numpy,torch", "--json"))
    assert report["target"] == "model styles.py:kw_net on npz:digits.npz (eval)"
    assert report["config"]["input_shape"] == [8, 1, 8, 8] and not report["inconsistent"]
    layer = json.loads(_cli(capsys, "crossval", "layer", "--model", "styles.py:kw_net", "--layer",
                            "units.1.n_a", "--dataset", "npz:digits.npz", "--backends", "numpy,torch",
                            "--json"))
    assert layer["config"]["shape"][1] == 16 and not layer["inconsistent"]  # units.1.n_a: 16 channels
    err = _cli_error(capsys, "crossval", "layer", "--model", "styles.py:kw_net", "--layer", "out")
    assert "--layer 'out' is not a norm layer of 'styles.py:kw_net'; its norm layers: entry.1" in err


def test_study_context_passes_only_the_fields_the_factory_takes():
    from normlab.studies import get_study
    from normlab.studies.base import StudyContext

    def context(model):
        return StudyContext(study=get_study("large-batch"), scale="tiny", params={}, seeds=[0], device="cpu",
                            out_dir=Path("."), store=None, model=model, dataset="npz:x.npz")

    kw = context(f"{STYLES}:kw_net").config(width=16, depth=3, steps=1)
    assert kw.width is None and kw.depth is None and kw.dataset == "npz:x.npz"
    resnet = context(f"{STYLES}:cifar_resnet").config(width=16, depth=10, steps=1)
    assert resnet.width == 16 and resnet.depth == 10


def test_study_whose_runs_all_fail_exits_2_with_the_first_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.py").write_text("def net(num_classes=10):\n    raise RuntimeError('broken factory')\n")
    monkeypatch.chdir(tmp_path)
    err = _cli_error(capsys, "study", "large-batch", "--model", "bad.py:net", "--scale", "tiny", "--seeds",
                     "1", "--out", str(tmp_path / "out"))
    assert "every run of study large-batch failed (12 runs); the first: NormlabError: model factory " in err
    assert "raised RuntimeError: broken factory" in err


@pytest.mark.slow
def test_digits_study_on_the_users_model_and_data_names_them(digits, monkeypatch, capsys):
    """``study --model --dataset`` on a factory without ``width`` (the recipe's width=16 is not passed)."""
    monkeypatch.chdir(digits)
    out = json.loads(_cli(capsys, "study", "large-batch", "--model", "styles.py:kw_net", "--dataset",
                          "npz:digits.npz", "--scale", "tiny", "--seeds", "1", "--set", "subset=128", "--out",
                          str(digits / "results"), "--json"))
    assert out["study"] == "large-batch"
    saved = json.loads((digits / "results" / "large-batch" / "outcome.json").read_text())
    assert saved["meta"]["model"] == "styles.py:kw_net" and saved["meta"]["dataset"] == "npz:digits.npz"
    report = (digits / "results" / "large-batch" / "report.md").read_text()
    assert "--model styles.py:kw_net --dataset npz:digits.npz" in report.splitlines()[2]
    assert "on your model 'styles.py:kw_net' and your data 'npz:digits.npz'" in report
    from normlab.store import Store

    runs = Store(digits / "results" / "large-batch" / "runs.sqlite", readonly=True).runs()
    assert runs and all(r.status == "finished" and r.config["model"] == "styles.py:kw_net" for r in runs)


@pytest.mark.slow
def test_compare_bn_gn_nf_trains_the_post_activation_resnet_without_divergence(tmp_path, monkeypatch, capsys):
    """The issue's ResNet (``out += self.shortcut(x)``): its nf arm diverged at step 5 (loss 7.6e6) before."""
    from test_external import write_images

    write_images(tmp_path / "img32.npz", n_train=256, n_test=128, size=32)
    shutil.copy(STYLES, tmp_path / "styles.py")
    monkeypatch.chdir(tmp_path)
    out = json.loads(_cli(capsys, "compare", "--model", "styles.py:cifar_resnet", "--model-options",
                          '{"width": 4, "depth": 10}', "--dataset", "npz:img32.npz", "--norms", "bn,gn,nf",
                          "--lrs", "0.004", "--steps", "40", "--seeds", "1", "--batch-sizes", "32",
                          "--lr-extensions", "0", "--store", str(tmp_path / "c.sqlite"), "--no-report",
                          "--json"))
    from normlab.store import Store

    runs = Store(tmp_path / "c.sqlite", readonly=True).runs()
    assert {r.config["norm"] for r in runs} == {"bn", "gn", "nf"} and out
    for run in runs:
        assert run.status == "finished", (run.config["norm"], run.status)
        assert run.summary["final_train_loss"] < np.log(4), run.config["norm"]


def test_fold_bn_keeps_the_users_class_and_attribute_access():
    import importlib.util

    from normlab.layers import fold_bn

    spec = importlib.util.spec_from_file_location("user_styles_fold", STYLES)
    styles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(styles)
    torch.manual_seed(0)
    model = styles.named_blocks()
    x = torch.randn(6, 3, 8, 8)
    for _ in range(3):
        model(x)  # running statistics away from (0, 1)
    model.eval()
    folded = fold_bn(model)
    assert type(folded) is type(model) and type(folded.units[1]) is styles.Unit
    assert isinstance(folded.units[1].n_a, nn.Identity) and isinstance(folded.units[1].c_a, nn.Conv2d)
    assert folded.units[1].proj is not None and folded.units[1].c_a.bias is not None
    assert isinstance(model.units[1].n_a, nn.BatchNorm2d)  # the input is untouched
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_error_says_what_is_missing(capsys):
    err = _cli_error(capsys, "train", "--device", "cuda", "--steps", "1")
    assert "--device cuda but CUDA is not available here; use --device cpu or auto" in err
    with pytest.raises(NormlabError, match="CUDA is not available here"):
        from normlab.train.build import resolve_device

        resolve_device("cuda:1")
