"""TrainConfig validation and TOML loading; the learning-rate schedule; optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.train import TrainConfig, field_names, learning_rate
from normlab.train.optimizer import build_optimizer, param_groups


def test_defaults_and_round_trip():
    config = TrainConfig()
    assert (config.model, config.norm, config.dataset, config.optimizer) == ("cnn", "bn", "mnist1d", "sgd")
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.replace(lr=0.5).lr == 0.5 and config.lr == 0.1
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": -0.1}, "lr=-0.1 is out of range; allowed: >= 0.0"),
        ({"batch_size": 0}, "batch_size=0 is out of range; allowed: >= 1"),
        ({"momentum": 1.0}, "momentum=1.0 is out of range; allowed: >= 0.0 and <= 0.999999"),
        ({"optimizer": "lamb"}, "optimizer='lamb' is not allowed; valid values: sgd, adamw"),
        ({"schedule": "poly"}, "schedule='poly' is not allowed; valid values: constant, step, cosine"),
        ({"batch_size": 3.5}, "batch_size must be an int, got float 3.5"),
        ({"nesterov": 1}, "nesterov must be a bool, got int 1"),
        ({"lr": math.inf}, "lr=inf must be a finite number"),
        ({"agc_clip": 0.0}, "agc_clip=0.0 is out of range; allowed: > 0"),
        ({"device": "tpu"}, "device='tpu' is not a device; allowed: cpu, cuda, cuda:N, mps, auto"),
        ({"epochs": None}, "set epochs or steps: both are None"),
        ({"schedule": "step"}, "schedule 'step' needs milestones"),
        ({"milestones": [5, 3], "schedule": "step"}, r"milestones must be increasing, got \[5, 3\]"),
        ({"milestones": [0]}, r"milestones must be a list of positive step numbers, got \[0\]"),
        ({"nesterov": True, "optimizer": "adamw"}, "nesterov=True needs optimizer 'sgd' with momentum > 0"),
        ({"checkpoint_every": 5}, "checkpoint_every=5 needs a checkpoint_dir"),
        ({"norm_options": [1]}, r"norm_options must be a table/dict of options, got \[1\]"),
        ({"model": None}, "model must not be None"),
    ],
)
def test_impossible_values_name_field_value_and_range(changes, message):
    with pytest.raises(NormlabError, match=message):
        TrainConfig(**changes)


def test_toml_loading(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "mlp"\nlr = 1\nmilestones = [10, 20]\nschedule = "step"\n'
                    "[norm_options]\ngroups = 4\n")
    config = TrainConfig.from_toml(path)
    got = (config.model, config.lr, config.milestones, config.norm_options)
    assert got == ("mlp", 1.0, [10, 20], {"groups": 4})
    table = tmp_path / "table.toml"
    table.write_text('[train]\nnorm = "gn"\n')
    assert TrainConfig.from_toml(table).norm == "gn"


def test_toml_errors_name_the_file(tmp_path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("lr = 0.1\nlearning_rate = 0.2\nbatchsize = 3\n")
    message = (
        r"unknown TrainConfig field\(s\) batchsize, learning_rate in .*unknown\.toml; "
        r"valid fields: model, norm, norm_options"
    )
    with pytest.raises(NormlabError, match=message):
        TrainConfig.from_toml(unknown)
    corrupt = tmp_path / "corrupt.toml"
    corrupt.write_text("lr = = 0.1\n")
    with pytest.raises(NormlabError, match=r"config file '.*corrupt\.toml' is not valid TOML: .*line 1"):
        TrainConfig.from_toml(corrupt)
    with pytest.raises(NormlabError, match=r"config file '.*missing\.toml' does not exist"):
        TrainConfig.from_toml(tmp_path / "missing.toml")
    assert "checkpoint_dir" in field_names()


def test_key_ignores_labels_and_locations_only():
    base = TrainConfig()
    assert base.key() == TrainConfig(name="x", group="g", checkpoint_dir="/tmp/c", data_root="/d").key()
    assert base.key() != TrainConfig(lr=0.1000001).key()
    assert base.key() != TrainConfig(seed=1).key()


def test_schedule_values():
    kw = dict(lr=1.0, total_steps=100)
    assert learning_rate(37, schedule="constant", **kw) == 1.0
    # warmup: lr * (step + 1) / W
    assert learning_rate(0, schedule="constant", warmup_steps=4, **kw) == 0.25
    assert learning_rate(3, schedule="constant", warmup_steps=4, **kw) == 1.0
    # step: gamma ** (number of milestones <= step)
    step = dict(schedule="step", milestones=[10, 20], gamma=0.1, **kw)
    assert [learning_rate(s, **step) for s in (9, 10, 19, 20, 99)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    # cosine after warmup: 0.5 * (1 + cos(pi * (s - W) / (T - W)))
    cos = dict(schedule="cosine", warmup_steps=20, **kw)
    assert learning_rate(20, **cos) == 1.0
    assert learning_rate(60, **cos) == pytest.approx(0.5)
    assert learning_rate(80, **cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 60 / 80)))
    assert learning_rate(100, **cos) == pytest.approx(0.0)


def test_weight_decay_excludes_one_dim_parameters():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 2))
    groups = param_groups(model, 5e-4, True)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 4  # conv bias, BN weight and bias, linear bias
    assert len(param_groups(model, 5e-4, False)) == 1
    opt = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.5, nesterov=True))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.5
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adamw")), torch.optim.AdamW)
