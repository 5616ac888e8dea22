"""``normlab probe landscape_2d`` / ``hessian_density``: the plane through checkpoints and the figures."""

import json

import pytest
import torch
from torch.nn import functional as F

from normlab.cli import main
from normlab.train import TrainConfig, Trainer


def _run(capsys, *args):
    try:
        main(["probe", *args])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return capsys.readouterr().out


def _error(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(["probe", *args])
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = []
    for seed in range(3):
        folder = tmp_path_factory.mktemp(f"ckpt{seed}")
        config = TrainConfig(model="mlp", norm="bn", dataset="synthetic", steps=4, batch_size=16, seed=seed,
                             checkpoint_dir=str(folder))
        trainer = Trainer(config, progress=False)
        trainer.fit()
        out.append((str(trainer.checkpoint_path), trainer))
    return out


def test_plane_through_two_checkpoints(checkpoints, capsys, tmp_path):
    (w, trainer), (a, trainer_a), (b, _) = checkpoints
    figure = tmp_path / "plane.png"
    out = json.loads(_run(capsys, "landscape_2d", "--checkpoint", w, "--through", a, "--through", b,
                          "--batch-size", "16", "--json", "--figure", str(figure),
                          "--options", '{"alphas": [0, 1], "betas": [0, 1]}'))
    assert out["probe"] == "landscape_2d" and out["directions"] == "checkpoints"
    x, y = trainer.data.x_train, trainer.data.y_train
    index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:16]
    with torch.no_grad():
        at_a = F.cross_entropy(trainer_a.model.train()(x[index]), y[index]).item()
        at_w = F.cross_entropy(trainer.model.train()(x[index]), y[index]).item()
    assert out["losses"][0][0] == pytest.approx(at_w, rel=1e-5)
    assert out["losses"][1][0] == pytest.approx(at_a, rel=1e-5)
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_density_table_and_svg_figure(checkpoints, capsys, tmp_path):
    figure = tmp_path / "density.svg"
    out = _run(capsys, "hessian_density", "--checkpoint", checkpoints[0][0], "--batch-size", "16",
               "--figure", str(figure), "--options", '{"iterations": 8, "runs": 2}')
    assert "hessian_density (mode: train)" in out and "trace" in out and f"figure: {figure}" in out
    assert b"<svg" in figure.read_bytes()[:2000]


def test_plane_and_figure_bad_input(checkpoints, capsys, tmp_path):
    w = checkpoints[0][0]
    assert "--through needs exactly two checkpoints (A and B), got 1" in _error(
        capsys, "landscape_2d", "--checkpoint", w, "--through", w)
    assert "--through goes with probe landscape_2d, not hessian" in _error(
        capsys, "hessian", "--checkpoint", w, "--through", w, "--through", w)
    assert "--figure draws hessian_density, landscape_2d; probe ics has no figure" in _error(
        capsys, "ics", "--checkpoint", w, "--figure", str(tmp_path / "x.png"))
    assert f"--figure '{tmp_path / 'x.gif'}' must end in .png or .svg" in _error(
        capsys, "landscape_2d", "--checkpoint", w, "--figure", str(tmp_path / "x.gif"))
    other = tmp_path / "cnn"
    config = TrainConfig(model="cnn", norm="bn", dataset="synthetic", steps=1, batch_size=8,
                         checkpoint_dir=str(other))
    trainer = Trainer(config, progress=False)
    trainer.fit()
    assert "holds a 'cnn' model, the probed model a 'mlp'; the plane needs checkpoints of the same model" in (
        _error(capsys, "landscape_2d", "--checkpoint", w, "--through", str(trainer.checkpoint_path),
               "--through", w))
