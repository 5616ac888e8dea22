"""The 2-D loss landscape against the loss-landscapes package (same model, same directions) and by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab.errors import NormlabError
from normlab.probes import landscape_2d
from normlab.probes.loss_landscape import filter_normalize

loss_landscapes = pytest.importorskip("loss_landscapes")
from loss_landscapes.metrics import Loss  # noqa: E402
from loss_landscapes.model_interface.model_parameters import (  # noqa: E402
    ModelParameters,
    orthogonal_to,
    rand_u_like,
)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3),
    ).double()
    with torch.no_grad():  # as after training: BN's beta is not 0 (loss-landscapes divides by its norm)
        net[1].bias.normal_()
    return net


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 2, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (10,), generator=gen)


def _package_column(i: int, j: int) -> int:
    # loss-landscapes walks the plane column by column, alternating direction with in-place steps: the
    # even columns (i = 0, 2, ...) are evaluated after 1..steps steps along d2, the odd ones at 0..steps-1.
    return j + 1 if i % 2 == 0 else j


def test_plane_through_two_checkpoints_matches_planar_interpolation():
    model, (x, y) = _net(), _batch()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for p in b.parameters():
            p.mul_(1.5)
    steps = 6
    ours = landscape_2d(model, (x, y), through=(a, b), alphas=[i / steps for i in range(steps)],
                        betas=[j / steps for j in range(steps + 1)])
    with torch.no_grad():
        theirs = loss_landscapes.planar_interpolation(copy.deepcopy(model).train(), a, b,
                                                      Loss(F.cross_entropy, x, y), steps=steps)
    assert theirs.shape == (steps, steps)
    for i in range(steps):
        for j in range(steps):
            assert ours.losses[i][_package_column(i, j)] == pytest.approx(theirs[i][j], rel=1e-10)
    assert ours.directions == "checkpoints" and ours.mode == "train"
    # (0, 0) is the model itself, (1, 0) checkpoint A, (0, 1) checkpoint B.
    end = landscape_2d(model, (x, y), through=(a, b), alphas=[0.0, 1.0], betas=[0.0, 1.0])
    assert end.losses[0][0] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-12)
    assert end.losses[1][0] == pytest.approx(F.cross_entropy(a.train()(x), y).item(), rel=1e-10)
    assert end.losses[0][1] == pytest.approx(F.cross_entropy(b.train()(x), y).item(), rel=1e-10)


def test_random_plane_matches_loss_landscapes_on_its_own_directions():
    model, (x, y) = _net(), _batch()
    steps, distance = 6, 1.0
    torch.manual_seed(5)
    with torch.no_grad():
        theirs = loss_landscapes.random_plane(copy.deepcopy(model), Loss(F.cross_entropy, x, y),
                                              distance=distance, steps=steps, normalization="filter")
    # The same draws, rebuilt with the package's own functions (random_plane's first lines).
    torch.manual_seed(5)
    start = ModelParameters([p.detach().clone() for p in model.parameters()])
    d1 = rand_u_like(start)
    d2 = orthogonal_to(d1)
    for d in (d1, d2):
        d.filter_normalize_(start)
        d.mul_(((start.model_norm() / distance) / steps) / d.model_norm())
    axis = [k - steps / 2 for k in range(steps + 1)]
    ours = landscape_2d(model, (x, y), directions=(d1.parameters, d2.parameters), alphas=axis, betas=axis)
    assert ours.directions == "given"
    for i in range(steps):
        for j in range(steps):
            assert ours.losses[i][_package_column(i, j)] == pytest.approx(theirs[i][j], rel=1e-8)


def test_filter_normalization_matches_loss_landscapes_for_weights():
    torch.manual_seed(2)
    for shape in [(4, 2, 3), (3, 24), (8, 4, 3, 3)]:
        w, d = torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
        theirs = ModelParameters([d.clone()])
        theirs.filter_normalize_(ModelParameters([w]))
        assert torch.allclose(filter_normalize(d, w), theirs.parameters[0], rtol=1e-12, atol=0)
    # 1-D parameters: Li et al.'s ignore='biasbn' (loss-landscapes rescales them element by element).
    assert torch.equal(filter_normalize(torch.ones(4), torch.randn(4)), torch.zeros(4))


def test_random_directions_are_filter_normalized_seeded_and_leave_the_model_alone():
    model, batch = _net(), _batch()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    one = landscape_2d(model, batch, num_points=5, seed=3)
    assert torch.equal(rng, torch.get_rng_state())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert one.alphas == [-1.0, -0.5, 0.0, 0.5, 1.0] == one.betas
    assert one.losses[2][2] == pytest.approx(one.loss, rel=1e-12)
    assert one.loss == pytest.approx(F.cross_entropy(model.train()(batch[0]), batch[1]).item(), rel=1e-12)
    assert landscape_2d(model, batch, num_points=5, seed=3).losses == one.losses
    assert landscape_2d(model, batch, num_points=5, seed=4).losses != one.losses
    # Each filter of both directions has the norm of the weight's filter: ||d|| = ||W|| over weights only.
    weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.dim() > 1])
    assert one.direction_norms == pytest.approx([weights.norm().item()] * 2, rel=1e-10)
    assert abs(one.direction_cosine) < 0.5


def test_eval_mode_uses_running_statistics():
    model, batch = _net(), _batch()
    result = landscape_2d(model, batch, num_points=3, mode="eval")
    assert result.mode == "eval"
    assert result.loss == pytest.approx(F.cross_entropy(model.eval()(batch[0]), batch[1]).item(), rel=1e-12)


def test_bad_inputs():
    model, batch = _net(), _batch()
    with pytest.raises(NormlabError, match=r"span must be two finite numbers low < high, got \(1, 1\)"):
        landscape_2d(model, batch, span=(1, 1))
    with pytest.raises(NormlabError, match="give through= \\(two checkpoints\\) or directions=, not both"):
        landscape_2d(model, batch, through=(model, model), directions=([], []))
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(NormlabError, match=r"through\[0\] does not match the model: parameter '0.weight' of "
                                           r"shape \(4, 2, 3\) is \(3, 3\) there"):
        landscape_2d(model, batch, through=(other, model))
    with pytest.raises(NormlabError, match=r"directions\[0\] must hold one tensor per trainable parameter"):
        landscape_2d(model, batch, directions=([torch.zeros(1)], [torch.zeros(1)]))
    with pytest.raises(NormlabError, match="num_points must be a positive int, got 0"):
        landscape_2d(model, batch, num_points=0)
    with pytest.raises(NormlabError, match="landscape_2d needs a batch \\(x, y\\) with targets"):
        landscape_2d(model, batch[0])
