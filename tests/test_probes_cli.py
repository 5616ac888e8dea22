import json

import pytest
import torch

from normlab.cli import main
from normlab.probes import landscape
from normlab.train import TrainConfig, Trainer


def _run(capsys, *args):
    try:
        main(["probe", *args])
    except SystemExit as exc:  # typer's standalone mode exits 0 after a command
        assert exc.code in (0, None)
    return capsys.readouterr().out


def _error(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(["probe", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    config = TrainConfig(model="mlp", norm="bn", dataset="synthetic", steps=6, batch_size=16, log_every=3,
                         checkpoint_dir=str(folder))
    trainer = Trainer(config, progress=False)
    trainer.fit()
    return trainer.checkpoint_path, trainer


def test_probe_from_checkpoint_json(checkpoint, capsys):
    path, trainer = checkpoint
    out = json.loads(_run(capsys, "landscape", "--checkpoint", str(path), "--batch-size", "16", "--json",
                          "--options", '{"num_points": 3}'))
    assert out["probe"] == "landscape" and out["mode"] == "train" and len(out["losses"]) == 3
    # The CLI loaded the trained weights: the same batch through the trained model gives the same numbers.
    x, y = trainer.data.x_train, trainer.data.y_train
    index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:16]
    # It steps at the run's base lr the checkpoint records, not the optimizer's last (scheduled) one.
    direct = landscape(trainer.model, (x[index], y[index]), lr=trainer.config.lr, num_points=3)
    assert out["loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert out["lr"] == trainer.config.lr and out["etas"] == pytest.approx(direct.etas)
    evald = json.loads(_run(capsys, "ics", "--checkpoint", str(path), "--mode", "eval", "--json"))
    assert evald["mode"] == "eval" and set(evald["l2"]) == set(evald["cos"])


def test_probe_fresh_model_table_and_residual(capsys):
    out = _run(capsys, "signal_propagation", "--model", "resnet20", "--dataset", "synthetic", "--batch-size",
               "8")
    assert "signal_propagation" in out and "(mode: train)" in out and "stages.2.2" in out
    gap = json.loads(_run(capsys, "train_eval_gap", "--model", "mlp", "--norm", "gn", "--dataset",
                          "synthetic", "--batch-size", "16", "--json"))
    assert gap["kl"] == pytest.approx(0.0, abs=1e-7) and gap["acc_gap"] == 0.0


def test_probe_cli_bad_input(checkpoint, capsys):
    path, _ = checkpoint
    assert "unknown probe 'icz'; valid probes: activation_stats" in _error(capsys, "icz")
    assert "mode must be 'train' or 'eval', got 'both'" in _error(capsys, "ics", "--mode", "both")
    assert "--model 'cnn' conflicts with the checkpoint, which is a 'mlp' model" in _error(
        capsys, "ics", "--checkpoint", str(path), "--model", "cnn"
    )
    assert "too small for mode='train'" in _error(
        capsys, "landscape", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "1"
    )
    assert "residual_scale needs a residual model" in _error(
        capsys, "residual_scale", "--model", "mlp", "--dataset", "synthetic"
    )
    assert "unknown --options key(s) foo for probe ics; valid: grad_transform, include_norm" in _error(
        capsys, "ics", "--model", "mlp", "--dataset", "synthetic", "--options", '{"foo": 1}'
    )
    assert "--options must be a JSON object" in _error(capsys, "ics", "--options", "[1]")
    assert "does not exist" in _error(capsys, "ics", "--checkpoint", str(path) + ".missing")
