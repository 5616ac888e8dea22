"""Every probe leaves parameters, buffers, .grad, train/eval flags and the RNG exactly as it found them,
on a residual net with BatchNorm and dropout measured in training mode (the hard case), and says its mode."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab import probes


class Block(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm1d(ch), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv1d(ch, ch, 3, padding=1), nn.Dropout(0.3), nn.Conv1d(ch, ch, 1))
        self.skip_scale = nn.Identity()
        self.shortcut = nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.skip_scale(self.branch(self.preact(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1)
        self.stage = nn.Sequential(Block(4), Block(4))
        self.classifier = nn.Linear(4, 3)

    def blocks(self):
        yield from ((f"stage.{i}", b) for i, b in enumerate(self.stage))

    def forward(self, x):
        return self.classifier(self.stage(self.stem(x)).mean(2))


PROBES = {
    "train_eval_gap": lambda m, o, x, y: probes.train_eval_gap(m, x, y, batch_size=4),
    "activation_stats": lambda m, o, x, y: probes.activation_stats(m, x),
    "ics": lambda m, o, x, y: probes.ics(m, o, (x, y)),
    "landscape": lambda m, o, x, y: probes.landscape(m, (x, y), optimizer=o, num_points=2),
    "landscape_random": lambda m, o, x, y: probes.landscape(m, (x, y), lr=0.1, direction="random"),
    "hessian": lambda m, o, x, y: probes.hessian(m, (x, y), max_iter=3, trace_samples=2, per_layer=True),
    "hessian_density": lambda m, o, x, y: probes.hessian_density(m, (x, y), iterations=3, runs=2),
    "landscape_2d": lambda m, o, x, y: probes.landscape_2d(m, (x, y), num_points=2),
    "signal_propagation": lambda m, o, x, y: probes.signal_propagation(m, x),
    "example_similarity": lambda m, o, x, y: probes.example_similarity(m, x),
    "residual_scale": lambda m, o, x, y: probes.residual_scale(m, x),
    "batch_dependence": lambda m, o, x, y: probes.batch_dependence(m, x, num_examples=2),
}


@pytest.mark.parametrize("name", list(PROBES))
@pytest.mark.parametrize("mode_flag", [True, False], ids=["model-in-train", "model-in-eval"])
def test_probe_changes_nothing(name, mode_flag):
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 1, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # BN running stats, Adam moments and .grad all populated
    model.train(mode_flag)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    opt_state = {(id(p), k): v.clone() for p, s in opt.state.items() for k, v in s.items()}
    rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    result = PROBES[name](model, opt, x, y)

    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is g and torch.equal(g, saved) for p, (g, saved) in zip(model.parameters(), grads,
                                                                                 strict=True))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(opt_state[id(p), k], v) for p, s in opt.state.items() for k, v in s.items())
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert np.array_equal(np.random.get_state()[1], np_rng)
    assert result.to_dict()["mode"] in ("train", "eval", "train_vs_eval")
